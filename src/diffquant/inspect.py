"""``diffquant info``: what a saved quantized model holds, read from its files without building it."""

from __future__ import annotations

import math
from pathlib import Path

from safetensors import safe_open

from .serialization import MANIFEST, QUANT_CONFIG, QUANT_WEIGHTS, read_denoiser_meta, verify


OLD_CONVENTION = "quantized layers only, float layers at 16 bits (saved by an earlier diffquant)"


def _denoiser_dir(folder: Path) -> Path:
    for sub in ("unet", "transformer", "."):
        if (folder / sub / QUANT_CONFIG).is_file():
            return folder / sub
    raise ValueError(f"{folder} holds no quantized denoiser ({QUANT_CONFIG} missing)")


def describe(folder: str | Path) -> dict:
    """A summary dict (and its text rendering under ``"text"``) of a saved quantized model."""
    folder = Path(folder)
    manifest = verify(folder)
    den = _denoiser_dir(folder)
    meta = read_denoiser_meta(den)
    cfg = meta["quant_config"]
    layers: dict[str, dict] = {}
    float_params = code_params = 0
    act_bits: list[int] = []
    with safe_open(str(den / QUANT_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            numel = math.prod(shape) if shape else 1
            if key.endswith(".weight_codes"):
                name = key[: -len(".weight_codes")]
                layers[name] = {"weight_bits": cfg["wbits"], "params": numel}
                code_params += numel
            elif key.endswith(".qweight"):  # converted: int8 codes, or int4 packed two per byte
                name = key[: -len(".qweight")]
                params = numel * (2 if cfg["wbits"] <= 4 else 1)
                layers[name] = {"weight_bits": cfg["wbits"], "params": params}
                code_params += params
            elif key.endswith(".bits"):
                act_bits.extend(f.get_tensor(key).tolist())
            elif not key.endswith((".scale", ".zero_point")):
                float_params += numel
    weight_file = (den / QUANT_WEIGHTS).stat().st_size
    fp16_bytes = 2 * (float_params + code_params)
    plan = meta["plan"]
    saved = meta.get("average_bits") or {}
    summary = {
        "folder": str(folder),
        "class": meta["class"],
        "family": plan["family"],
        "method": cfg["method"],
        "label": f"{cfg['method']}-w{cfg['wbits']}a{cfg['abits'] if cfg['abits'] is not None else 'f'}",
        "timestep_groups": len(plan["groups"]["centers"]),
        "quantized_layers": len(layers),
        "float_layers": plan["float_layers"],
        "skip_splits": plan["skip_splits"],
        # Written at save time by diffquant.average_bits (the whole-denoiser convention eval/bench use, diffquant.bits).
        # Older folders carry, or are estimated in, the earlier one: quantized layers only, float layers at 16 bits.
        "average_bits_convention": saved.get("convention", OLD_CONVENTION),
        "average_weight_bits": saved.get(
            "weight_bits", (cfg["wbits"] * code_params + 16 * float_params) / max(code_params + float_params, 1)),
        "average_activation_bits": saved.get(
            "activation_bits", sum(act_bits) / len(act_bits) if act_bits else None),
        "weight_coverage": saved.get("weight_coverage"),
        "mac_coverage": saved.get("mac_coverage"),
        "denoiser_file_bytes": weight_file,
        "fp16_denoiser_bytes": fp16_bytes,
        "size_ratio_vs_fp16": weight_file / max(fp16_bytes, 1),
        "report": meta.get("report", {}),
        "versions": manifest.get("versions", {}),
    }
    lines = [
        f"{folder}: {summary['class']} ({summary['family']}), {summary['label']}",
        f"  quantized layers: {len(layers)}; kept float: {len(plan['float_layers'])}; timestep groups: {summary['timestep_groups']}",
        f"  average bits ({summary['average_bits_convention']}): weights {summary['average_weight_bits']:.2f}"
        + (f", activations {summary['average_activation_bits']:.2f}" if summary["average_activation_bits"] else ", activations float"),
        f"  denoiser file: {weight_file / 1e6:.2f} MB ({summary['size_ratio_vs_fp16']:.2f}x of fp16 {fp16_bytes / 1e6:.2f} MB)",
    ]
    if summary["weight_coverage"] is not None:
        macs = f"{summary['mac_coverage']:.1%}" if summary["mac_coverage"] is not None else "n/a"
        lines.append(f"  quantized share: {summary['weight_coverage']:.1%} of weights, {macs} of MACs")
    if plan["skip_splits"]:
        lines.append(f"  split-input layers: {len(plan['skip_splits'])}")
    for name, reason in sorted(plan["float_layers"].items()):
        lines.append(f"  float: {name} ({reason})")
    runtime = summary["report"].get("runtime")
    if meta.get("converted") and runtime:
        backends = runtime.get("backends", {})
        counts = {b: sum(v == b for v in backends.values()) for b in sorted(set(backends.values()))}
        summary["converted"] = {"backends": counts, "float_fallback": runtime.get("float_fallback", {})}
        lines.append("  converted: " + ", ".join(f"{n} on {b}" for b, n in counts.items()))
        for name, reason in sorted(runtime.get("float_fallback", {}).items()):
            lines.append(f"  runs float: {name} ({reason})")
    if "calibration_seconds" in summary["report"]:
        lines.append(f"  calibration: {summary['report']['calibration_seconds']:.1f} s")
    summary["text"] = "\n".join(lines)
    return summary


__all__ = ["MANIFEST", "describe"]
