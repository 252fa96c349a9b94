"""Eval/bench's side of coverage and average bits (``diffquant.bits`` defines them, one function for every row):
the float reference's :class:`~diffquant.bits.LayerTable` on one denoiser call of the bench's sampling settings (its
latent size, sequence length and guidance batch; quantization does not change it), and the size of the denoiser
file that would ship (:func:`shipped_mib`: for diffquant, the denoiser files ``diffquant.save`` writes; for OpenVINO,
the IR's weight file; for a peer, its state dict as safetensors, tensor subclasses flattened to what they store).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ..bits import LayerTable, count_table
from ..sampling import SamplingSettings, is_unconditional, sample, unconditional_prompts
from ..wrap import get_denoiser


def layer_table(pipe, settings: SamplingSettings, prompt: str = "a red circle") -> LayerTable:
    """:func:`count_table` of ``pipe``'s float denoiser on one call of ``settings`` (one sampling step of one prompt:
    the bench's latent size, text length and guidance batch)."""
    prompts = unconditional_prompts(1) if is_unconditional(pipe) else [prompt]
    with contextlib.suppress(AttributeError):
        pipe.set_progress_bar_config(disable=True)
    return count_table(get_denoiser(pipe), lambda: sample(pipe, prompts, settings.replace(steps=1, seed=0)))


def shipped_mib(pipe, reference: bool = False) -> float:
    """MiB of the denoiser as it would ship: what ``diffquant.save`` writes for a diffquant model, the IR's weight
    file for an OpenVINO denoiser (``OVDenoiser.ir_bytes``), else its state dict as safetensors. The float
    ``reference`` ships as the files it was loaded from (e.g. fp16 safetensors run in float32), when on disk."""
    from .peers import saved_size_bytes

    denoiser = get_denoiser(pipe)
    origin = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    if reference and origin and Path(origin).is_dir():
        return denoiser_bytes(Path(origin)) / 2**20
    if isinstance(getattr(denoiser, "ir_bytes", None), int):
        return denoiser.ir_bytes / 2**20
    if getattr(denoiser, "diffquant", None) is not None:
        import diffquant

        with tempfile.TemporaryDirectory() as folder:
            diffquant.save(pipe, folder)
            return denoiser_bytes(Path(folder)) / 2**20
    return saved_size_bytes(denoiser) / 2**20


def denoiser_bytes(folder: Path, denoiser_names: tuple[str, ...] = ("unet", "transformer")) -> int:
    """Bytes of the denoiser's weight files inside a saved pipeline folder (all weight files if none is named so)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")]
    denoiser_files = [p for p in files if any(part in denoiser_names for part in p.relative_to(folder).parts)]
    return sum(p.stat().st_size for p in (denoiser_files or files))
