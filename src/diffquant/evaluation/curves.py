"""Where the error comes from: per-timestep denoiser error and per-layer sensitivity.

Both feed the quantized denoiser exactly the inputs the FP denoiser sees along the FP sampling
trajectory, so the numbers isolate one denoiser call's error from the drift that accumulates
over steps (the paired images measure that drift).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .paired import GenSettings, get_denoiser, initial_noise
from .prompts import PromptItem


def _out(output) -> torch.Tensor:
    """The predicted noise/velocity from a denoiser's output (tuple or ``*Output`` dataclass)."""
    return (output[0] if isinstance(output, (tuple, list)) else output.sample).float()


def _rel_mse(q: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((q - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-20))


def _timestep(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


@contextmanager
def _hook(module: torch.nn.Module, fn) -> Iterator[None]:
    handle = module.register_forward_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _run_fp(pipe, items: list[PromptItem], settings: GenSettings) -> None:
    latents = initial_noise(pipe, [it.seed for it in items], settings).to(next(get_denoiser(pipe).parameters()).device)
    pipe(prompt=[it.prompt for it in items], num_inference_steps=settings.steps, guidance_scale=settings.guidance,
         height=settings.height, width=settings.width, latents=latents, output_type="latent")


@torch.no_grad()
def timestep_error(fp_pipe, q_denoiser: torch.nn.Module, items: list[PromptItem], settings: GenSettings,
                   batch_size: int = 4) -> dict[str, list[float]]:
    """Relative MSE ||ε_q − ε_fp||² / ||ε_fp||² of one denoiser call per sampling step, averaged over ``items``.

    The quantized denoiser is called inside a hook on the FP denoiser, with the FP call's own arguments.
    """
    records: dict[int, list[tuple[float, float, float]]] = {}
    calls = [0]

    def hook(module, args, kwargs, output):
        ref, q = _out(output), _out(q_denoiser(*args, **kwargs))
        records.setdefault(calls[0], []).append((_timestep(args, kwargs), float(((q - ref) ** 2).mean()), _rel_mse(q, ref)))
        calls[0] += 1

    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with _hook(get_denoiser(fp_pipe), hook):
        for batch in tqdm(batches, desc="per-timestep error", unit="batch"):
            calls[0] = 0
            _run_fp(fp_pipe, batch, settings)
    steps = sorted(records)
    return {
        "step": steps,
        "timestep": [records[s][0][0] for s in steps],
        "mse": [sum(r[1] for r in records[s]) / len(records[s]) for s in steps],
        "rel_mse": [sum(r[2] for r in records[s]) / len(records[s]) for s in steps],
    }


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


@torch.no_grad()
def layer_sensitivity(fp_pipe, q_denoiser: torch.nn.Module, items: list[PromptItem], settings: GenSettings,
                      n_steps: int = 3, max_layers: int | None = None) -> dict:
    """Relative output error of the denoiser when only one layer is quantized, per quantized layer.

    "Only layer L quantized" means: every weight is the FP model's except L's own weight and bias (as stored
    in the quantized model, which after ``diffquant.load`` are the dequantized values), and only L's fake
    quantization is on. So the numbers mean the same for in-memory and reloaded models, and
    ``none_quantized`` is 0 when the swap restores the FP model exactly. Inputs are the FP denoiser's at
    ``n_steps`` evenly spaced sampling steps for ``items`` (one batch); the reference is the FP output.
    The quantized model is restored (its weights, all quantization on) afterwards.
    """
    import diffquant

    layers = list(diffquant.quantized_layers(q_denoiser))
    if not layers:
        raise ValueError("the model has no diffquant-quantized layers to toggle")
    if max_layers:
        layers = layers[:max_layers]
    keep = {round(i * (settings.steps - 1) / max(n_steps - 1, 1)) for i in range(min(n_steps, settings.steps))}
    captured: list[tuple[tuple, dict, torch.Tensor]] = []
    calls = [0]

    def hook(module, args, kwargs, output):
        if calls[0] in keep:
            captured.append((_clone(args), _clone(kwargs), _out(output).clone()))
        calls[0] += 1

    fp_denoiser = get_denoiser(fp_pipe)
    with _hook(fp_denoiser, hook):
        _run_fp(fp_pipe, items, settings)

    def error() -> float:
        return sum(_rel_mse(_out(q_denoiser(*a, **k)), ref) for a, k, ref in captured) / len(captured)

    q_state = q_denoiser.state_dict()
    fp_weights = {k: v for k, v in fp_denoiser.state_dict().items()
                  if k in q_state and q_state[k].shape == v.shape and q_state[k].dtype == v.dtype}
    q_weights = {k: q_state[k].detach().clone() for k in fp_weights}
    errors: dict[str, float] = {}
    try:
        q_denoiser.load_state_dict(fp_weights, strict=False)
        diffquant.set_quant_enabled(q_denoiser, False)
        baseline = error()
        for name in tqdm(layers, desc="per-layer sensitivity", unit="layer"):
            own = [k for k in (f"{name}.weight", f"{name}.bias") if k in q_weights]
            q_denoiser.load_state_dict({k: q_weights[k] for k in own}, strict=False)
            diffquant.set_quant_enabled(q_denoiser, True, names=[name])
            errors[name] = error()
            diffquant.set_quant_enabled(q_denoiser, False, names=[name])
            q_denoiser.load_state_dict({k: fp_weights[k] for k in own}, strict=False)
    finally:
        q_denoiser.load_state_dict(q_weights, strict=False)
        diffquant.set_quant_enabled(q_denoiser, True)
    return {"layers": errors, "all_quantized": error(), "none_quantized": baseline, "n_inputs": len(captured),
            "steps": sorted(keep)}
