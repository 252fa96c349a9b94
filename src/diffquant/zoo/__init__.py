"""The mini zoo: small text-to-image models trained in this repo, the default for demo, tests and benchmarks.

Nothing here can download a model, and random weights cannot show whether a quantization method
keeps images faithful. These models are real (trained on procedural captioned scenes, see
:mod:`diffquant.zoo.data`), ship inside the package as fp16 diffusers folders, and load with the
stock ``from_pretrained`` code paths:

- ``mini-sd``: AutoencoderKL + CLIPTextModel + UNet2DConditionModel + DDIM (SD 1.x layout).
- ``mini-sd3``: AutoencoderKL + two CLIPTextModelWithProjection + SD3Transformer2DModel + flow matching.
- ``mini-flux``: AutoencoderKL + CLIPTextModel + T5EncoderModel + FluxTransformer2DModel + flow matching.
- ``mini-ddim``: an unconditional pixel-space UNet2DModel + DDIM (Q-Diffusion's CIFAR-10 setting), no text.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..registry import BundledModel, register_model, register_prompt_set
from .data import calibration_prompts, heldout_prompts

if TYPE_CHECKING:
    import torch

MODEL_NAMES: tuple[str, ...] = ("mini-sd", "mini-sd3", "mini-flux", "mini-ddim")
MODELS_DIR = Path(__file__).parent / "models"

DEFAULTS: dict[str, dict] = {
    "mini-sd": dict(num_inference_steps=25, guidance_scale=5.0, height=32, width=32),
    "mini-sd3": dict(num_inference_steps=25, guidance_scale=2.5, height=32, width=32),
    "mini-flux": dict(num_inference_steps=25, guidance_scale=4.0, height=32, width=32, max_sequence_length=24),
    "mini-ddim": dict(num_inference_steps=100),  # Q-Diffusion's CIFAR-10 DDIM steps; unconditional: no guidance
}

__all__ = ["MODEL_NAMES", "DEFAULTS", "model_path", "load_pipeline", "load_pipeline_folder", "calibration_prompts", "heldout_prompts"]


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown mini-zoo model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def model_path(name: str) -> Path:
    """The installed pipeline folder of ``name`` (raises a clear error when its weights are missing)."""
    _check_name(name)
    folder = MODELS_DIR / name
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"mini-zoo weights for {name!r} are missing from {folder}; "
                                f"reinstall diffquant or run `diffquant zoo train {name}`")
    return folder


def load_pipeline(name: str, torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load ``name`` with the real ``from_pretrained`` on its installed folder (offline, progress bar off);
    ``torch_dtype`` None is float32 (torch is imported here, not with the package: the CLI's --help stays light)."""
    return load_pipeline_folder(name, model_path(name), torch_dtype).to(device)


def load_pipeline_folder(name: str, folder: Path, torch_dtype: torch.dtype | None = None):
    """Load a mini-zoo pipeline of kind ``name`` from any folder (the installed one, or a run's ``pipeline``) with
    its pipeline class, offline, progress bar off; ``torch_dtype`` None is float32."""
    import torch
    from diffusers import DDIMPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if not (Path(folder) / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (model_index.json missing)")
    cls = {"mini-sd": StableDiffusionPipeline, "mini-flux": FluxPipeline,
           "mini-ddim": DDIMPipeline}.get(name, StableDiffusion3Pipeline)
    kw = dict(safety_checker=None, requires_safety_checker=False) if name == "mini-sd" else {}
    pipe = cls.from_pretrained(str(folder), torch_dtype=torch.float32 if torch_dtype is None else torch_dtype,
                               local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def float32_text_encoders(folder: Path) -> None:
    """Mark the text encoders' configs float32 (weights stay fp16): transformers loads a model in its config's
    dtype, diffusers in float32, so plain ``from_pretrained(folder)`` would otherwise mix fp16 and fp32."""
    for config in sorted(Path(folder).glob("text_encoder*/config.json")):
        data = json.loads(config.read_text())
        data["dtype"] = "float32"
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _no_prompts() -> list[str]:
    """mini-ddim is unconditional: it calibrates from seeds (``diffquant.quantize`` never asks it for prompts)."""
    return []


# The core finds the bundled models, their defaults and prompt sets here (the package root imports the zoo).
for _name in MODEL_NAMES:
    register_model(BundledModel(
        name=_name, folder=functools.partial(model_path, _name), load=functools.partial(load_pipeline, _name),
        sampling=DEFAULTS[_name], calibration_prompts=_no_prompts if _name == "mini-ddim" else calibration_prompts,
    ))
for _split, _prompts in (("heldout", heldout_prompts), ("eval", heldout_prompts), ("test", heldout_prompts),
                         ("calibration", calibration_prompts), ("calib", calibration_prompts),
                         ("train", calibration_prompts)):
    register_prompt_set(f"zoo:{_split}", _prompts)
