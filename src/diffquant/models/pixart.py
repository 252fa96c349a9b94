"""PixArt-α/Σ (``PixArtTransformer2DModel``) and SANA (``SanaTransformer2DModel``): adaLN-single DiTs.

adaLN-single: one shared projection ``adaln_single`` turns the timestep (and, for PixArt-α at 1024 px,
resolution and aspect ratio) into the modulation of every block; each block adds its own learned
``scale_shift_table`` (a parameter, not a layer: nothing to quantize). So the time-dependent layers are
``adaln_single``'s linears, and EMF's precalculation runs ``adaln_single`` alone.

Their pipelines bin the requested size to the nearest trained resolution and refuse models whose
``sample_size`` has no bin table ("Invalid sample size"); ``sampling_extras`` turns binning off for
those, so calibration and evaluation sample the size they ask for.
"""

from __future__ import annotations

import torch

from .adapters import DenoiserAdapter, register_adapter


class _AdaLNSingleAdapter(DenoiserAdapter):
    binned_sizes: tuple[int, ...] = ()  # denoiser sample sizes the pipeline has resolution bins for
    io_names: tuple[str, ...] = ()

    def time_layers(self) -> list[str]:
        return [n for n in self.layers() if n.startswith(("adaln_single.", "time_embed."))]

    def io_layers(self) -> list[str]:
        return [n for n in self.io_names if n in self.layers()]

    def sampling_extras(self, pipe) -> dict:
        return {} if self.model.config.sample_size in self.binned_sizes else {"use_resolution_binning": False}


@register_adapter
class PixArtTransformerAdapter(_AdaLNSingleAdapter):
    family = "pixart-transformer"
    model_class = "PixArtTransformer2DModel"
    block_types = ("BasicTransformerBlock",)
    binned_sizes = (32, 64, 128, 256)
    io_names = ("pos_embed.proj", "proj_out")
    time_condition = ("added_cond_kwargs",)

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        added = {k.split(".", 1)[1]: v for k, v in cond.items() if k.startswith("added_cond_kwargs.")}
        dtype = next(self.model.parameters()).dtype
        self.model.adaln_single(t, added or {"resolution": None, "aspect_ratio": None}, batch_size=t.shape[0], hidden_dtype=dtype)
