"""Where the error comes from: per-timestep denoiser error and per-layer sensitivity.

Both feed the quantized denoiser exactly the inputs the FP denoiser sees along the FP sampling
trajectory, so the numbers isolate one denoiser call's error from the drift that accumulates
over steps (the paired images measure that drift).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..sampling import DenoiserStep, SamplingSettings, denoiser_calls, paired_noise, prediction, sample
from ..wrap import get_denoiser
from .prompts import PromptItem


def _rel_mse(q: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((q - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-20))


def _run_fp(pipe, items: list[PromptItem], settings: SamplingSettings) -> None:
    sample(pipe, [it.prompt for it in items], settings, **paired_noise(pipe, [it.seed for it in items], settings))


@torch.no_grad()
def timestep_error(fp_pipe, q_denoiser: torch.nn.Module, items: list[PromptItem], settings: SamplingSettings,
                   batch_size: int = 4) -> dict[str, list[float]]:
    """Relative MSE ||ε_q − ε_fp||² / ||ε_fp||² of one denoiser call per sampling step, averaged over ``items``.

    The quantized denoiser is called after each FP denoiser call, with the FP call's own arguments.
    """
    records: dict[int, list[tuple[float, float, float]]] = {}

    def compare(call: DenoiserStep) -> None:
        ref, q = call.prediction.float(), prediction(q_denoiser(*call.args, **call.kwargs)).float()
        records.setdefault(call.step, []).append((call.timestep, float(((q - ref) ** 2).mean()), _rel_mse(q, ref)))

    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="per-timestep error", unit="batch"):
        with denoiser_calls(fp_pipe, after=compare):
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
def layer_sensitivity(fp_pipe, q_denoiser: torch.nn.Module, items: list[PromptItem], settings: SamplingSettings,
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

    def keep_call(call: DenoiserStep) -> None:
        if call.step in keep:
            captured.append((_clone(call.args), _clone(call.kwargs), call.prediction.float().clone()))

    fp_denoiser = get_denoiser(fp_pipe)
    with denoiser_calls(fp_denoiser, after=keep_call):
        _run_fp(fp_pipe, items, settings)

    def error() -> float:
        return sum(_rel_mse(prediction(q_denoiser(*a, **k)).float(), ref) for a, k, ref in captured) / len(captured)

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
