"""Which fully connected path pays on this CPU under OpenVINO: f32, int8 weights, static u8, diffquant's per-token.

    python benchmarks/openvino_fc_kernels.py [--rows 8192 --features 1280 --repeats 5 --json out.json]

One FC layer (``rows`` x ``features`` input, ``features`` x ``features`` weight) compiled five ways at one thread
with the f32 precision hint: f32 weights; int8 weight codes (``Convert -> Multiply``, what diffquant's graphs and
NNCF's weight compression emit) with OpenVINO's dynamic input quantization at its default, off, and one group per
row; a static FakeQuantize before the int8 weights (the u8 kernel diffquant's static graph gets); and diffquant's
per-token rendering (per-row fake quantization computed in the graph, then the FC), plus that fake quantization
alone. Prints the median ms per call and the kernel precision OpenVINO chose; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    import openvino as ov
    from openvino import Type, opset13 as ops

    from diffquant.quant import ActivationQuantizer, QuantSpec
    from diffquant.runtime.ovgraph import trace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--features", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, k = args.rows, args.features
    rng = np.random.default_rng(0)
    x = ops.parameter([n, k], Type.f32, name="x")
    scale = ops.constant(np.full((k, 1), 0.01, np.float32))
    w_int8 = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 128, size=(k, k)).astype(np.int8)), Type.f32), scale)
    bound = [ops.constant(np.float32(v)) for v in (-4, 4, -4, 4)]
    models = {
        "f32 weights": ov.Model([ops.matmul(x, ops.constant(rng.standard_normal((k, k)).astype(np.float32)), False, True)], [x]),
        "int8 weights": ov.Model([ops.matmul(x, w_int8, False, True)], [x]),
        "static FakeQuantize + int8 weights": ov.Model([ops.matmul(ops.fake_quantize(x, *bound, 256), w_int8, False, True)], [x]),
    }
    quantizer = ActivationQuantizer(QuantSpec(bits=8, symmetric=False, granularity="per_token"), channel_axis=-1)
    quantizer.mode = "quantize"

    class PerToken(torch.nn.Module):
        def __init__(self, layer: torch.nn.Module | None) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():  # the out-of-place fake quantization OpenVINO's frontend accepts (as ovgraph)
                codes = quantizer.fake_quant(inputs, 0)
            return codes if self.layer is None else self.layer(codes)

    example = (torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)),)
    models["per-token fake quant + FC"] = trace(PerToken(torch.nn.Linear(k, k, bias=False)).eval(), ["x"], example)
    models["per-token fake quant alone"] = trace(PerToken(None).eval(), ["x"], example)
    cases = [(name, model, {}) for name, model in models.items()]
    cases[2:2] = [("int8 weights, dynamic quantization off", models["int8 weights"], {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}),
                  ("int8 weights, one group per row", models["int8 weights"], {"DYNAMIC_QUANTIZATION_GROUP_SIZE": k})]
    core, feed = ov.Core(), example[0].numpy()
    rows = {}
    print(f"OpenVINO {ov.__version__}; CPU capabilities {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    print("| case | ms / call | kernel |\n|---|---|---|")
    for name, model, props in cases:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", **props})
        compiled(feed)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(feed)
            times.append(time.perf_counter() - start)
        kernels = sorted({op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                          if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"})
        rows[name] = {"ms": statistics.median(times) * 1e3, "kernel": ",".join(kernels) or "-"}
        print(f"| {name} | {rows[name]['ms']:.1f} | {rows[name]['kernel']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": n, "features": k, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
