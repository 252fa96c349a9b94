"""Per-step sensitivity: how much error one sampling step adds when only that step is quantized.

For every step s the pipeline samples with fake quantization switched on at step s alone (exact
float elsewhere, ``set_quant_enabled``). Two errors are measured against the float run with the
same prompts, seeds and noise:

- ``final``: relative MSE of the final decoded image, ||x_q − x_fp||² / ||x_fp||² — what the
  error of step s does to the picture after the remaining float steps;
- ``step``: relative MSE of the denoiser output at step s itself. Steps before s are float, so the
  quantized call sees exactly the float call's inputs.

Works on any frozen quantized denoiser (not only PCR's): the result is a plain JSON-ready dict.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.adapters import get_denoiser
from ..nn import set_quant_enabled
from ..sampling import DenoiserStep, SamplingSettings, denoiser_calls, sample

SENSITIVITY_METRICS = ("final", "step")


def _rel_mse(q: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((q.float() - ref.float()) ** 2).mean() / (ref.float() ** 2).mean().clamp_min(1e-20))


@torch.no_grad()
def step_sensitivity(pipe, prompts: list[str], settings: SamplingSettings, *, progress: bool = True,
                     seeds: list[int] | None = None) -> dict:
    """Sample ``prompts`` (one batch, resolved ``settings``, ``seeds`` as in ``sample``) once in float and once per
    step with only that step quantized.

    Returns ``{"metrics": {...}, "steps": [{"step", "timestep", "final_rel_mse", "step_rel_mse"}, ...]}``
    with one entry per sampling step. Costs (steps + 1) sampling runs of ``prompts``.
    """
    denoiser = get_denoiser(pipe)
    outputs: dict[int, torch.Tensor] = {}
    timesteps: dict[int, float] = {}

    def keep_output(watch: int | None):
        def after(call: DenoiserStep) -> None:
            if watch is None or call.step == watch:
                outputs[call.step] = call.prediction.detach().float()
                timesteps[call.step] = call.timestep
        return after

    try:
        set_quant_enabled(denoiser, False)
        with denoiser_calls(denoiser, after=keep_output(None)):
            reference = sample(pipe, prompts, settings, seeds=seeds, output_type="pt").float()
        fp_outputs = dict(outputs)
        entries = []
        for s in tqdm(range(settings.steps), desc="pcr: per-step sensitivity", disable=not progress):
            outputs.clear()

            def only_step_s(call: DenoiserStep, s: int = s) -> None:
                if call.step in (s, s + 1):
                    set_quant_enabled(denoiser, call.step == s)

            set_quant_enabled(denoiser, False)
            with denoiser_calls(denoiser, before=only_step_s, after=keep_output(s)):
                final = sample(pipe, prompts, settings, seeds=seeds, output_type="pt").float()
            entries.append({
                "step": s,
                "timestep": timesteps[s],
                "final_rel_mse": _rel_mse(final, reference),
                "step_rel_mse": _rel_mse(outputs[s], fp_outputs[s]),
            })
    finally:
        set_quant_enabled(denoiser, True)
    return {
        "metrics": {
            "final_rel_mse": "rel. MSE of the final image vs float when only this step is quantized",
            "step_rel_mse": "rel. MSE of this step's denoiser output vs float (same inputs)",
        },
        "prompts": list(prompts),
        "steps": entries,
    }


def most_sensitive_steps(sensitivity: dict, fraction: float, metric: str = "final") -> list[int]:
    """The ``round(fraction · steps)`` steps with the largest error (at least one when fraction > 0), sorted."""
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; choose one of {', '.join(SENSITIVITY_METRICS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"relax_fraction must be within [0, 1], got {fraction}")
    entries = sensitivity["steps"]
    count = 0 if fraction == 0 else max(1, round(fraction * len(entries)))
    ranked = sorted(entries, key=lambda e: e[f"{metric}_rel_mse"], reverse=True)
    return sorted(e["step"] for e in ranked[:count])


def sensitivity_figure(sensitivity: dict, relaxed_steps: list[int] | None = None, title: str = "per-step sensitivity"):
    """A matplotlib figure: both errors per step (log scale), relaxed steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in sensitivity["steps"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(steps, [e["final_rel_mse"] for e in sensitivity["steps"]], marker="o", label="final image")
    ax.plot(steps, [e["step_rel_mse"] for e in sensitivity["steps"]], marker="s", label="step output")
    for s in relaxed_steps or []:
        ax.axvspan(s - 0.4, s + 0.4, color="orange", alpha=0.25, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (0 = first, noisiest)" + ("; shaded: relaxed" if relaxed_steps else ""))
    ax.set_ylabel("rel. MSE vs float, only this step quantized")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
