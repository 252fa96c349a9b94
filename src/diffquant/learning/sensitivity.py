"""Which layers matter most: output error when only one layer is fake-quantized, on serial-dataset rows.

EMF distils the features of the sensitive layers, freezes their oscillating weights first and may
keep the very most sensitive ones at higher precision. The measurement needs no FP copy: the
wrapped model's float weights are still the FP ones before training, so "only layer L quantized"
is the wrapped model with every other layer's fake quantization switched off.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import broadcast_from_main, is_main
from ..io import atomic_write_json
from ..nn import quantized_layers, set_quant_enabled
from .dataset import SerialDataset


def _rel_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out.float() - ref.float()) ** 2).mean() / (ref.float() ** 2).mean().clamp_min(1e-20))


@torch.no_grad()
def measure_layer_sensitivity(denoiser: nn.Module, dataset: SerialDataset, rows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Relative MSE of the denoiser output against the FP output with only layer L quantized (weights and
    input), for every quantized layer with a weight. The model must be in the learning (or frozen) state.
    Under a multi-process launch every process gets the main process's numbers (so all rank layers alike)."""
    param = next(denoiser.parameters())
    kwargs = dataset.kwargs(rows, param.device, param.dtype)
    reference = dataset.output[rows].to(param.device)
    names = [n for n, m in quantized_layers(denoiser).items() if m.weight_quantizer is not None]
    errors: dict[str, float] = {}
    set_quant_enabled(denoiser, False)
    try:
        for name in tqdm(names, desc="emf: per-layer sensitivity", disable=not progress):
            set_quant_enabled(denoiser, True, names=[name])
            errors[name] = _rel_mse(denoiser(**kwargs)[0], reference)
            set_quant_enabled(denoiser, False, names=[name])
    finally:
        set_quant_enabled(denoiser, True)
    values = torch.tensor([errors[n] for n in names], dtype=torch.float64, device=param.device)
    broadcast_from_main([values])
    return dict(zip(names, values.tolist()))


def rank_layers(errors: dict[str, float]) -> list[str]:
    return sorted(errors, key=errors.get, reverse=True)


def save_sensitivity(errors: dict[str, float], folder: str | Path, label: str = "emf", key: str = "") -> dict[str, Path]:
    """Write ``sensitivity.json`` (with ``key``, naming the setting it was measured under) and a bar chart
    ``sensitivity.png`` (the evaluation report's plot). Only the main process writes."""
    from ..plots import sensitivity_plot

    folder = Path(folder)
    paths = {"json": folder / "sensitivity.json", "png": folder / "sensitivity.png"}
    if not is_main():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths["json"], {"key": key, "layers": errors, "ranked": rank_layers(errors)})
    tmp = paths["png"].with_name(".sensitivity.png.tmp")
    tmp.write_bytes(base64.b64decode(sensitivity_plot(label, {"layers": errors})))
    tmp.replace(paths["png"])
    return paths
