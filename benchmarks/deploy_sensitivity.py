"""Is a deployed graph's distance from its fake-quant model an export error, or the model's own sensitivity?

    .venv/bin/python benchmarks/deploy_sensitivity.py --variants w8a8,w8a8_grp,w4a4_grp

One mini-sd denoiser call (runtime.py's ``build``: the zoo UNet, random latents and text states, batch 2), RTN
quantized per variant (runtime.py's tags: ``w8a8`` static per-tensor activations, ``_grp`` dynamic per group of 64
channels). Per variant the table gives the relative error of the fake-quant output to FP32, of each OpenVINO form
(int and float graph, f32 and bf16 precision hint) to the fake-quant output, and of the fake-quant model itself
when every activation quantizer's input is multiplied by ``1 + eps * N(0, 1)`` (eps from ``--jitter``): float
rounding of that size (f32 is ~1e-7, a reordered sum more) is all an engine adds, so an OpenVINO distance no larger
than the jittered one is the model's sensitivity (a code flipped by one ulp moves the next layers), not a fault of
the export. ``int/f32/exact`` is the int graph with OpenVINO's own dynamic quantization of FullyConnected inputs
off (on by default where the CPU has int8 dot products; it re-quantizes per-group inputs in groups of 32). Writes
``--json`` and ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime as rb  # noqa: E402  (build, quantize, rel_err: the runtime benchmark's own set-up)

from diffquant.io import atomic_write_text  # noqa: E402
from diffquant.quant import ActivationQuantizer  # noqa: E402
from diffquant.runtime.openvino import OVDenoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (graph, precision hint, OpenVINO's own dynamic quantization of FullyConnected inputs left on): the int graph keeps
# it on (its speed), the float graph turns it off (OVDenoiser); "int/f32/exact" turns it off in the int graph too
FORMS = {"int/f32": ("int", "f32", True), "int/bf16": ("int", "bf16", True), "int/f32/exact": ("int", "f32", False),
         "float/f32": ("float", "f32", False), "float/bf16": ("float", "bf16", False)}


def jittered(model: torch.nn.Module, inputs: dict, eps: float, seed: int) -> torch.Tensor:
    """The model's output with every activation quantizer's input scaled by ``1 + eps * N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    hooks = [m.register_forward_pre_hook(lambda m, a: (a[0] * (1 + eps * torch.randn(a[0].shape, generator=g)), *a[1:]))
             for m in model.modules() if isinstance(m, ActivationQuantizer)]
    try:
        with torch.no_grad():
            return model(**inputs)[0]
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="w8a8,w8a8_grp,w4a4_grp")
    p.add_argument("--jitter", default="1e-7,1e-6,1e-5", help="relative input jitters, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="jitter draws per eps (the table gives their median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "deploy-sensitivity.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results-deploy-sensitivity.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet, inputs, calib, label = rb.build("mini-sd")
    traced = {k: v for k, v in inputs.items() if k != "return_dict"}
    traced["timestep"] = traced["timestep"].expand(traced["sample"].shape[0])  # OpenVINO's graph takes t per sample
    eps_list = [float(e) for e in args.jitter.split(",")]
    with torch.no_grad():
        fp = unet(**inputs)[0]
    rows = {}
    for tag in args.variants.split(","):
        model = rb.quantize(unet, calib, tag)
        with torch.no_grad():
            fake = model(**inputs)[0]
        row = {"fake_vs_fp32": rb.rel_err(fake, fp), "openvino_vs_fake": {}, "jitter_vs_fake": {}}
        for form, (graph, precision, dynamic_quantization) in FORMS.items():
            properties = None if dynamic_quantization else {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
            deployed = OVDenoiser.from_denoiser(model, inputs=traced, graph=graph, precision=precision, threads=args.threads,
                                                properties=properties)
            with torch.no_grad():
                row["openvino_vs_fake"][form] = rb.rel_err(deployed(**inputs)[0], fake)
        for eps in eps_list:
            draws = sorted(rb.rel_err(jittered(model, inputs, eps, seed), fake) for seed in range(args.seeds))
            row["jitter_vs_fake"][f"{eps:g}"] = draws[len(draws) // 2]
        rows[tag] = row
        print(tag, json.dumps(row), flush=True)
    result = {"label": label, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "torch": torch.__version__, "threads": args.threads},
              "command": " ".join(sys.argv[1:]), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=1))
    head = ["variant", "fake quant vs FP32"] + [f"OpenVINO {f} vs fake quant" for f in FORMS] \
        + [f"fake quant, inputs x(1+{e:g}N) vs fake quant" for e in eps_list] + ["worst f32 form / worst jitter"]
    lines = ["# Deployed vs fake quant: export error or the model's own sensitivity?", "",
             f"Command: `python benchmarks/deploy_sensitivity.py {result['command'] or '(defaults)'}`; {label}; relative L2 error of one "
             f"denoiser call; jitter: median of {args.seeds} draws. The module docstring says how to read it.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag, row in rows.items():
        cells = [tag, f"{row['fake_vs_fp32']:.4f}"] + [f"{v:.4f}" for v in row["openvino_vs_fake"].values()] \
            + [f"{v:.4f}" for v in row["jitter_vs_fake"].values()]
        f32 = max(v for k, v in row["openvino_vs_fake"].items() if "/f32" in k)
        cells.append(f"{f32 / max(max(row['jitter_vs_fake'].values()), 1e-12):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(args.markdown, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
