"""The sampling core: what to sample (``SamplingSettings``), how (``sample``) and what the denoiser saw (``denoiser_calls``).

Every place that runs a diffusers pipeline goes through here: calibration recording, progressive
calibration, per-step sensitivity, the serial dataset, paired evaluation and its curves, the demo,
``diffquant generate``, the benchmarks and the zoo's quality floor. So one settings type, one
defaults policy and one denoiser hook serve them all, and a check on what the denoiser returns
(e.g. a NaN guard) has one place to go: an ``after`` callback of ``denoiser_calls`` or ``sample``.

Defaults policy (``default_settings``): a value set in the settings wins; then the defaults
registered for the pipeline (``diffquant.registry``: a bundled mini-zoo model's, or those a quantized
model recorded when it was quantized); then the pipeline's own: its ``__call__`` defaults for steps and
guidance (SD 1.x 50 steps at 7.5, SDXL 50 at 5.0, SD3 and Flux 28 at 7.0 and 3.5) and its native size
(``default_sample_size`` or the denoiser's ``sample_size``, times ``vae_scale_factor``). Extras the family's
adapter needs (``sampling_extras``: PixArt/SANA without resolution bins for their size get
``use_resolution_binning=False``) come under the extras the settings set.

Unconditional pipelines (DDPM, DDIM, LDM: ``is_unconditional``) sample from seeds alone: their samples are
empty prompts (``unconditional_prompts(n)``), so every prompt-batched caller runs them unchanged, and
``sample`` refuses real prompts, guidance and a size for them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .models.adapters import get_adapter, get_denoiser
from .registry import sampling_defaults

DEFAULT_STEPS = 50  # only for a pipeline whose __call__ names no default step count
_REGISTERED_KEYS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "height": "height", "width": "width"}


@dataclass
class SamplingSettings:
    """How a pipeline samples: steps, guidance, size, seed, and family-specific pipeline kwargs in ``extras``
    (e.g. SDXL's ``original_size``, SD3/Flux's ``max_sequence_length``). ``None`` means the defaults policy's
    value (module docstring); ``resolve`` fills them in. Plain JSON: ``to_dict`` / ``from_dict``."""

    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"sampling steps must be an integer >= 1, got {self.steps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"sampling {name} must be a positive number of pixels, got {value!r}")
        reserved = {"prompt", "latents", "generator", "output_type", *_REGISTERED_KEYS}
        clash = sorted(reserved & set(self.extras))
        if clash:
            raise ValueError(f"sampling extras {clash} are set by the settings' own fields or by sample(); "
                             "use steps/guidance/height/width instead")
        self.extras = dict(self.extras)

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def resolve(self, pipe: Any, registered: dict | None = None) -> SamplingSettings:
        """These settings with every unset value taken from ``default_settings(pipe, registered)``."""
        base = default_settings(pipe, registered)
        return self.replace(**{name: getattr(base, name) for name in ("steps", "guidance", "height", "width")
                               if getattr(self, name) is None}, extras={**base.extras, **self.extras})

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pipe(...)``; unset values are left to the pipeline."""
        named = {"num_inference_steps": self.steps, "guidance_scale": self.guidance, "height": self.height, "width": self.width}
        return {**{k: v for k, v in named.items() if v is not None}, **self.extras}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON; ``extras`` only when set, so records written before extras existed keep their keys."""
        data = dataclasses.asdict(self)
        if not data["extras"]:
            del data["extras"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SamplingSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**data)


def _call_default(pipe: Any, name: str) -> Any:
    try:
        param = inspect.signature(pipe.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def native_size(pipe: Any) -> int | None:
    """The pipeline's default image side in pixels (what it samples when no height/width is given)."""
    if "height" not in inspect.signature(pipe.__call__).parameters:
        return None
    base = getattr(pipe, "default_sample_size", None) or get_denoiser(pipe).config.sample_size
    return int(base) * int(getattr(pipe, "vae_scale_factor", 8))


def registered_defaults(pipe: Any) -> dict:
    """Defaults registered for ``pipe`` (keys as pipeline kwargs: ``num_inference_steps`` ...): its bundled model's,
    else those recorded in its quantized denoiser's report (the source model's, at quantization time), else {}."""
    found = sampling_defaults(pipe)
    if not found and pipe is not None:
        denoiser = get_denoiser(pipe)
        report = getattr(getattr(denoiser, "diffquant", None), "report", None) or getattr(denoiser, "report", {})  # OVDenoiser
        found = dict(report.get("sampling_defaults") or {})
    return found


def default_settings(pipe: Any, registered: dict | None = None) -> SamplingSettings:
    """The one defaults policy (module docstring). ``registered`` replaces ``registered_defaults(pipe)`` when given
    (a caller that knows more, e.g. the zoo name a user typed)."""
    registered = registered_defaults(pipe) if registered is None else registered
    given = {_REGISTERED_KEYS[k]: v for k, v in registered.items() if k in _REGISTERED_KEYS and v is not None}
    side = native_size(pipe)
    steps = given.get("steps", _call_default(pipe, "num_inference_steps") or DEFAULT_STEPS)
    extras = {k: v for k, v in registered.items() if k not in _REGISTERED_KEYS}  # e.g. mini-flux's max_sequence_length
    return SamplingSettings(
        steps=int(steps), guidance=given.get("guidance", _call_default(pipe, "guidance_scale")),
        height=given.get("height", side), width=given.get("width", side),
        extras={**get_adapter(get_denoiser(pipe), warn=False).sampling_extras(pipe), **extras},
    )


def is_unconditional(pipe: Any) -> bool:
    """True for a pipeline that samples from noise alone (DDPM, DDIM, LDM): its ``__call__`` takes a
    ``batch_size`` and no ``prompt``."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "prompt" not in params and "batch_size" in params


def unconditional_prompts(n: int) -> list[str]:
    """The prompt list of ``n`` samples of an unconditional pipeline: one empty prompt each, so every
    prompt-batched path (calibration, paired evaluation, EMF's dataset) batches samples unchanged."""
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}; pass --num-samples N")
    return [""] * n


def check_prompts(pipe: Any, prompts: list[str] | None) -> None:
    """Refuse prompts for an unconditional pipeline and no prompts for a text-conditioned one (one line)."""
    name = type(pipe).__name__
    if is_unconditional(pipe):
        if prompts and any(p.strip() for p in prompts):
            raise ValueError(f"{name} is unconditional and takes no prompts; drop --prompts and pass --num-samples N or --seeds")
    elif not prompts or not all(p.strip() for p in prompts):
        raise ValueError(f"{name} is text-conditioned and needs prompts; pass --prompts FILE (or --prompt TEXT)")


def _generator(settings: SamplingSettings, seeds: list[int] | None, n: int) -> Any:
    if seeds is None:
        return torch.Generator("cpu").manual_seed(settings.seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def sample(pipe: Any, prompts: list[str], settings: SamplingSettings, *, latents: torch.Tensor | None = None,
           seeds: list[int] | None = None, output_type: str = "latent", **runtime: Any) -> Any:
    """Run ``pipe`` once over ``prompts`` (one batch) and return its ``images`` (latents with the default
    ``output_type``). The initial noise: ``latents`` when given; else one CPU generator per prompt from
    ``seeds``; else one CPU generator seeded with ``settings.seed`` for the whole batch. ``runtime``: pipeline
    arguments that are not settings (``callback_on_step_end``). Unconditional pipelines: see ``_sample_unconditional``."""
    if is_unconditional(pipe):
        return _sample_unconditional(pipe, prompts, settings, latents, seeds, output_type, runtime)
    generator = None if latents is not None else _generator(settings, seeds, len(prompts))
    out = pipe(prompt=list(prompts), latents=latents, generator=generator, output_type=output_type,
               **settings.pipeline_kwargs(), **runtime)
    return out.images


def _sample_unconditional(pipe: Any, prompts: list[str], settings: SamplingSettings, latents: torch.Tensor | None,
                          seeds: list[int] | None, output_type: str, runtime: dict) -> Any:
    """DDPM/DDIM/LDM: ``len(prompts)`` samples (``unconditional_prompts``), noise from the seeds' generators (these
    pipelines take no latents), no guidance, the model's own size. They decode always, so ``"latent"`` and ``"pt"``
    give the images as float [B, 3, H, W] in [0, 1], like a text pipeline's ``"pt"``."""
    check_prompts(pipe, prompts)
    if latents is not None:
        raise ValueError(f"{type(pipe).__name__} takes no initial latents; pass seeds (paired_noise gives the right one)")
    params = inspect.signature(pipe.__call__).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    kwargs = {**settings.pipeline_kwargs(), **runtime}
    refused = sorted(set(kwargs) - named)
    if refused:
        raise ValueError(f"{type(pipe).__name__} is unconditional and samples at its model's size; it takes no "
                         f"{', '.join(refused)}: leave guidance, size and extras unset")
    out = pipe(batch_size=len(prompts), generator=_generator(settings, seeds, len(prompts)),
               output_type="pil" if output_type == "pil" else "np", **kwargs)
    if output_type in ("pt", "latent"):
        return torch.from_numpy(np.asarray(out.images)).permute(0, 3, 1, 2).contiguous()
    return out.images


def paired_noise(pipe: Any, seeds: list[int], settings: SamplingSettings) -> dict[str, Any]:
    """``sample`` arguments that draw row i's initial noise from ``seeds[i]`` alone, the same for every model of one
    architecture: ``latents`` (``initial_noise``) for text pipelines; the seeds themselves for unconditional ones,
    which take no latents (each row's own generator draws the same noise, and then DDPM's per-step noise)."""
    if is_unconditional(pipe):
        return {"seeds": list(seeds)}
    return {"latents": initial_noise(pipe, seeds, settings)}


def initial_noise(pipe: Any, seeds: list[int], settings: SamplingSettings) -> torch.Tensor:
    """Initial latents [B, C, h, w] for ``sample(latents=...)``, each row drawn from its own seed so batching never
    changes an image. Needs ``settings.height``/``width`` (``resolve`` them first)."""
    if settings.height is None or settings.width is None:
        raise ValueError("initial noise needs the image size; resolve the sampling settings first (settings.resolve(pipe))")
    denoiser = get_denoiser(pipe)
    noise = get_adapter(denoiser, warn=False).initial_noise(pipe, list(seeds), settings.height, settings.width)
    dtype = next(p.dtype for p in pipe.vae.parameters() if p.is_floating_point())
    device = next((p.device for p in denoiser.parameters()), getattr(denoiser, "device", torch.device("cpu")))  # OpenVINO: none
    return noise.to(dtype).to(device)


@dataclass
class DenoiserStep:
    """One denoiser call during sampling: its index since the context was entered, its timestep (the first
    element, read by the family's adapter), the call's ``args``/``kwargs`` and, in ``after``, its ``output``."""

    step: int
    timestep: float | None
    args: tuple
    kwargs: dict
    output: Any = None

    @property
    def prediction(self) -> torch.Tensor:
        return prediction(self.output)


def prediction(output: Any) -> torch.Tensor:
    """The predicted noise/velocity in a denoiser's output (a tuple or a diffusers ``*Output``)."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


@dataclass
class CallCount:
    calls: int = 0


@contextmanager
def denoiser_calls(pipe_or_denoiser: Any, before: Callable[[DenoiserStep], None] | None = None,
                   after: Callable[[DenoiserStep], None] | None = None) -> Iterator[CallCount]:
    """Call ``before(call)`` before and ``after(call)`` after every denoiser forward while the context is open.

    ``step`` counts calls from 0 at entry (one per sampling step for single-call schedulers: enter once
    per sampling run). Hooks are registered last, so ``wrap_denoiser``'s timestep context is set when
    ``before`` runs. A callback that runs the same denoiser again must call ``denoiser.forward`` (no hooks).
    Yields a ``CallCount`` whose ``calls`` is the number of calls seen so far.
    """
    denoiser: nn.Module = get_denoiser(pipe_or_denoiser)
    adapter = get_adapter(denoiser, warn=False)
    count = CallCount()
    pending: list[DenoiserStep] = []

    def pre(module, args, kwargs):
        t = adapter.timestep(args, kwargs)
        call = DenoiserStep(count.calls, None if t is None else float(torch.as_tensor(t).flatten()[0]), args, kwargs)
        count.calls += 1
        pending.append(call)
        if before is not None:
            before(call)

    def post(module, args, kwargs, output):
        call = pending.pop()
        call.output = output
        if after is not None:
            after(call)

    handles = [denoiser.register_forward_pre_hook(pre, with_kwargs=True), denoiser.register_forward_hook(post, with_kwargs=True)]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
