"""How should OpenVINO serve timestep-indexed activation scales? A stack of quantized linear layers, one run.

    .venv/bin/python benchmarks/openvino_groups.py --rows 1024 --width 1280 --layers 8 --groups 4 [--wmax 63]

Forms (each compiled once, f32 hint, ``--threads``; the fastest of ``--repeats`` calls, forms interleaved so
they share the machine's load; rel. error to the group's fake-quant arithmetic in torch). ``--wmax 63``
keeps weight codes within +-63: x86 CPUs without VNNI sum u8 x s8 pairs in int16, which saturates on
full-range codes, so the design's exactness shows only below that:
- ``const``: FakeQuantize with constant scales (one group: the int8 baseline);
- ``scalar``: the design of runtime/ovgraph.py: constant grid of group 0, ``x / r + d`` before and
  ``r * (y - d * rowsum)`` after, r and d gathered by a ``timestep_group`` input (every group, one model);
- ``inputs``: the scales fed as graph inputs (gathered, then FakeQuantize-free float arithmetic: the float graph);
- ``per_group``: one compiled model per group (RSS growth for all ``--groups`` compiled copies reported).
Also reports which precision OpenVINO picked for the FullyConnected ops and whether the CPU has VNNI.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn


def build(layers: int, width: int, groups: int, wmax: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(-wmax, wmax + 1, (width, width), generator=g, dtype=torch.int8) for _ in range(layers)]
    w_scale = [torch.rand(width, generator=g) * 0.002 + 0.001 for _ in range(layers)]
    a_scale = [torch.rand(groups, generator=g) * 0.02 + 0.02 for _ in range(layers)]
    a_zero = [torch.randint(100, 156, (groups,), generator=g).float() for _ in range(layers)]
    return codes, w_scale, a_scale, a_zero


class Stack(nn.Module):
    def __init__(self, params, form: str, group: int = 0) -> None:
        super().__init__()
        self.codes, self.w_scale, self.a_scale, self.a_zero = params
        self.form, self.group = form, group

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        for codes, ws, s, z in zip(self.codes, self.w_scale, self.a_scale, self.a_zero):
            w = codes.float() * ws[:, None]
            if self.form in ("const", "per_group"):
                k = self.group
                x = F.linear(torch.fake_quantize_per_tensor_affine(x, float(s[k]), int(z[k]), 0, 255), w)
            elif self.form == "scalar":
                r, d = (s / s[0]).index_select(0, g), (s[0] * (z - z[0])).index_select(0, g)
                xq = torch.fake_quantize_per_tensor_affine(x / r + d, float(s[0]), int(z[0]), 0, 255)
                x = (F.linear(xq, w) - d * w.sum(1)) * r
            else:  # inputs: gathered scales, float arithmetic
                sg, zg = s.index_select(0, g), z.index_select(0, g)
                x = F.linear((torch.clamp(torch.round(x / sg) + zg, 0, 255) - zg) * sg, w)
            x = torch.tanh(x)
        return x


def reference(params, x: torch.Tensor, group: int) -> torch.Tensor:
    codes, w_scale, a_scale, a_zero = params
    for c, ws, s, z in zip(codes, w_scale, a_scale, a_zero):
        q = (torch.clamp(torch.round(x / s[group]) + z[group], 0, 255) - z[group]) * s[group]
        x = torch.tanh(F.linear(q, c.float() * ws[:, None]))
    return x


def fc_precisions(compiled) -> list[str]:
    return sorted({o.get_rt_info()["runtimePrecision"].astype(str) for o in compiled.get_runtime_model().get_ordered_ops()
                   if o.get_rt_info()["layerType"].astype(str) == "FullyConnected"})


def main() -> None:
    import openvino as ov

    from diffquant.runtime.openvino import cpu_has_vnni

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wmax", type=int, default=127)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = build(args.layers, args.width, args.groups, args.wmax)
    x = torch.randn(args.rows, args.width)
    core = ov.Core()
    props = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
    proc = psutil.Process()
    rows = []

    group = args.groups - 1
    ref = reference(params, x, group)
    runs = {}
    for form in ("const", "scalar", "inputs", "per_group"):
        with torch.no_grad():
            if form in ("scalar", "inputs"):
                model = ov.convert_model(Stack(params, form), example_input=(x, torch.tensor([group])))
                feeds = (x.numpy(), np.array([group]))
            else:
                model = ov.convert_model(Stack(params, form, group), example_input=(x,))
                feeds = (x.numpy(),)
        rss = proc.memory_info().rss
        compiled = [core.compile_model(model, "CPU", props) for _ in range(args.groups if form == "per_group" else 1)]
        grown = (proc.memory_info().rss - rss) / 2**20
        out = torch.from_numpy(compiled[0](feeds)[0])
        runs[form] = (compiled[0], feeds)
        rows.append({"form": form, "rel_err": float((out - ref).norm() / ref.norm()), "fc": fc_precisions(compiled[0]),
                     "compile_rss_mb": round(grown, 1)})
    w = [c.float() * ws[:, None] for c, ws in zip(params[0], params[1])]

    def torch_fp32():
        with torch.no_grad():
            y = x
            for wi in w:
                y = torch.tanh(F.linear(y, wi))

    best = {form: float("inf") for form in list(runs) + ["torch_fp32"]}
    for _ in range(args.repeats):
        for form in best:
            start = time.perf_counter()
            torch_fp32() if form == "torch_fp32" else runs[form][0](runs[form][1])
            best[form] = min(best[form], 1e3 * (time.perf_counter() - start))
    for row in rows:
        row["ms"] = round(best[row["form"]], 1)
    rows.append({"form": "torch_fp32", "ms": round(best["torch_fp32"], 1)})
    print(json.dumps({"vnni": cpu_has_vnni(), "args": vars(args), "weights_mb": args.layers * args.width**2 / 2**20,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
