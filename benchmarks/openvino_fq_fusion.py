"""Which activation quantizers OpenVINO runs as standalone FakeQuantize nodes: diffquant's int graph beside NNCF INT8.

    .venv/bin/python benchmarks/openvino_fq_fusion.py --model mini-sd --threads 2

Both graphs compile with the bf16 precision hint, as ``benchmarks/runtime.py`` times them. A FakeQuantize that
OpenVINO fuses into the layer it feeds disappears from the compiled runtime model; what is left runs on its own
(in f32, between layout Reorders on AMX CPUs) and costs a pass over the activation. Prints, per graph, the count of
standalone FakeQuantize nodes by (producer, consumers) and each of diffquant's by the layer it quantizes, and writes
JSON.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402  (sibling module: benchmarks/ is not a package)
import runtime_engines as engines  # noqa: E402

from diffquant.io import atomic_write_json  # noqa: E402
from diffquant.runtime.openvino import OVDenoiser  # noqa: E402


def standalone_fake_quantize(denoiser: OVDenoiser) -> list[dict]:
    """Every FakeQuantize left in ``denoiser``'s compiled runtime models, with its producer and consumers' layer types."""
    def kind(node) -> str:
        info = node.get_rt_info()
        return info["layerType"].astype(str) if "layerType" in info else node.get_type_name()

    found = []
    for compiled in denoiser.compiled.values():
        for op in compiled.get_runtime_model().get_ordered_ops():
            if kind(op) == "FakeQuantize":
                consumers = sorted({kind(t.get_node()) for t in op.output(0).get_target_inputs()})
                found.append({"name": op.get_friendly_name(), "producer": kind(op.input(0).get_source_output().get_node()),
                              "consumers": consumers})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-sd", choices=("mini-sd", "sd15"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("runs/openvino-fq-fusion.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet, _, calib, _ = runtime.build(args.model)
    ours = OVDenoiser.from_denoiser(runtime.quantize(unet, calib, "w8a8"), graph="int", precision="bf16")
    nncf = OVDenoiser(engines.nncf_int8(unet, calib), dict(unet.config), type(unet).__name__, precision="bf16")  # as runtime.py
    out = {"model": args.model, "graphs": {}}
    for label, denoiser in (("diffquant_w8a8", ours), ("nncf_int8", nncf)):
        nodes = standalone_fake_quantize(denoiser)
        pattern = collections.Counter(f"{n['producer']} -> {'/'.join(n['consumers'])}" for n in nodes)
        out["graphs"][label] = {"standalone": len(nodes), "by_pattern": dict(pattern.most_common()), "nodes": nodes}
        print(f"{label}: {len(nodes)} standalone FakeQuantize")
        for key, count in pattern.most_common():
            print(f"  {count:3d}  {key}")
    layers = collections.Counter(n["name"].split("/aten::")[0].rsplit(".", 1)[-1] if "/aten::" in n["name"] else "(unnamed)"
                                 for n in out["graphs"]["diffquant_w8a8"]["nodes"])
    print("diffquant's, by the layer they feed:", dict(layers.most_common()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
