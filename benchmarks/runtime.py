"""Denoiser step latency and memory: FP32, BF16 autocast, fake-quant, converted W8A8/W4A8, ONNX Runtime, torchao.

    .venv/bin/python benchmarks/runtime.py --models mini-sd,sd15 --repeats 5

Every variant runs in this one process on the same inputs; the table reports the median of
``--repeats`` timed denoiser calls after one warm-up, the ratio to FP32, the weight bytes held in
memory and the peak RSS growth during a call (sampled every 5 ms). ``sd15`` is a full-size SD 1.5
UNet built from its config with random weights (64x64 latents, batch 2); it is RTN-quantized from two
recorded calls of random latents (timesteps 900 and 300) and random text states scaled like CLIP's,
so its speed is real and its image quality meaningless. ``mini-sd`` falls back to the tiny test
UNet when the mini zoo's weights are not installed (the JSON says which ran).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

import diffquant
from diffquant import QuantConfig
from diffquant.calibration import CalibrationSet, DenoiserCall
from diffquant.io import atomic_write_json, atomic_write_text
from diffquant.runtime import convert

ROOT = Path(__file__).resolve().parents[1]
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)


class PeakRSS:
    """Peak resident memory growth over a block, sampled by a thread (torch allocations are not traced)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def weight_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers (oneDNN's packed copies of int8 weights are not visible here)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def time_call(fn, repeats: int) -> dict:
    with torch.no_grad():
        fn()  # warm-up (packs weights, compiles)
        times = []
        with PeakRSS() as mem:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times), "peak_rss_growth_mb": mem.growth_mb}


def build(model: str):
    """(float UNet, call kwargs, calibration set, label)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        unet, size, batch, seq, label = UNet2DConditionModel(**SD15), 64, 2, 77, "SD 1.5 UNet (random weights), 64x64 latents, batch 2"
    else:
        try:
            from diffquant import zoo

            unet = zoo.load_pipeline("mini-sd").unet
            label = "mini-sd"
        except (FileNotFoundError, ImportError, ValueError):
            from diffquant.models.tiny import tiny_unet

            unet, label = tiny_unet(32), "tiny SD UNet (mini-sd weights not installed)"
        size, batch, seq = unet.config.sample_size, 2, 77 if model == "sd15" else 16
    unet.eval()
    g = torch.Generator().manual_seed(0)

    def call(t: float) -> dict:
        return dict(
            sample=torch.randn(batch, unet.config.in_channels, size, size, generator=g), timestep=torch.tensor(t),
            encoder_hidden_states=torch.randn(batch, seq, unet.config.cross_attention_dim, generator=g),
        )

    calib = CalibrationSet([DenoiserCall(call(900.0), 0, 2), DenoiserCall(call(300.0), 1, 2)])
    return unet, {**call(500.0), "return_dict": False}, calib, label


def quantize(unet: nn.Module, calib: CalibrationSet, wbits: int, attention: bool) -> nn.Module:
    cfg = QuantConfig(method="rtn", wbits=wbits, abits=8, quantize_attention=attention)
    return diffquant.quantize(copy.deepcopy(unet), cfg, calibration=calib, progress=False)


def onnx_session(model: nn.Module, inputs: dict, folder: Path, quantized: bool):
    import onnxruntime as ort

    from diffquant.runtime.onnx import _UNetCall, export_onnx

    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    path = folder / ("int8.onnx" if quantized else "fp32.onnx")
    if quantized:
        export_onnx(model, path, inputs=args)
    else:
        torch.onnx.export(_UNetCall(model).eval(), args, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["noise_pred"], dynamo=True, external_data=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"sample": args[0].numpy(), "timestep": args[1].numpy(), "encoder_hidden_states": args[2].numpy()}
    return lambda: session.run(None, feeds)


def torchao_int8(unet: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(unet)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_model(name: str, variants: list[str], repeats: int, out: dict, save) -> None:
    t0 = time.perf_counter()
    unet, inputs, calib, label = build(name)
    result = {"label": label, "build_s": time.perf_counter() - t0, "variants": {}, "notes": {}}
    out["models"][name] = result
    with torch.no_grad():
        ref = unet(**inputs)[0]

    def record(variant: str, model_or_fn, *, output=None, weights=None) -> None:
        fn = model_or_fn if not isinstance(model_or_fn, nn.Module) else (lambda: model_or_fn(**inputs))
        row = time_call(fn, repeats)
        row["weights_mb"] = weights if weights is not None else (weight_mb(model_or_fn) if isinstance(model_or_fn, nn.Module) else None)
        if output is not None:
            row["rel_err_vs_fp32"] = rel_err(output, ref)
        row["load_avg_1m"] = os.getloadavg()[0]
        result["variants"][variant] = row
        print(f"  {name} {variant}: {row['median_s'] * 1e3:.1f} ms (load {row['load_avg_1m']:.1f})", flush=True)
        save()

    def attempt(variant: str, body) -> None:
        if variant not in variants:
            return
        try:
            body()
        except Exception as e:  # a failing peer or compile variant is reported, not fatal
            result["notes"][variant] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  {name} {variant}: {result['notes'][variant]}", flush=True)
            save()

    attempt("fp32", lambda: record("fp32", unet, output=ref))

    def bf16():
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return unet(**inputs)[0]
        with torch.no_grad():
            out_bf16 = fn()
        record("bf16_autocast", fn, output=out_bf16, weights=weight_mb(unet))

    attempt("bf16_autocast", bf16)
    quantized: dict[str, nn.Module] = {}
    for wbits in (8, 4):
        for attention in (False, True):
            tag = f"w{wbits}a8" + ("_attn" if attention else "")
            if not any(v.endswith(tag) for v in variants):
                continue
            start = time.perf_counter()
            fq = quantize(unet, calib, wbits, attention)
            result["notes"][f"quantize_{tag}_s"] = time.perf_counter() - start
            with torch.no_grad():
                fq_out = fq(**inputs)[0]
            attempt(f"fake_quant_{tag}", lambda: record(f"fake_quant_{tag}", fq, output=fq_out))
            start = time.perf_counter()
            conv = convert(copy.deepcopy(fq), example_inputs=inputs, repeats=1, progress=False)
            result["notes"][f"convert_{tag}_s"] = time.perf_counter() - start
            runtime = diffquant.quant_record(conv).report["runtime"]
            result["notes"][f"converted_{tag}"] = {
                "backends": {b: sum(v == b for v in runtime["backends"].values()) for b in set(runtime["backends"].values())},
                "float_fallback": len(runtime["float_fallback"]),
                "max_layer_rel_err_vs_fake_quant": runtime["max_rel_error_vs_fake_quant"],
                "slowest_layers_ms": sorted(((n, t) for n, t in runtime["timings_ms"].items()), key=lambda x: -min(x[1].values()))[:8],
            }
            with torch.no_grad():
                conv_out = conv(**inputs)[0]
            result["notes"][f"converted_{tag}_rel_err_vs_fake_quant"] = rel_err(conv_out, fq_out)
            attempt(f"converted_{tag}", lambda: record(f"converted_{tag}", conv, output=conv_out))
            with tempfile.TemporaryDirectory() as tmp:
                diffquant.save(conv, Path(tmp) / "q")
                fp16 = Path(tmp) / "fp16"
                copy.deepcopy(unet).half().save_pretrained(fp16)
                result["notes"][f"file_ratio_{tag}_vs_fp16"] = (
                    (Path(tmp) / "q" / "diffquant_model.safetensors").stat().st_size
                    / (fp16 / "diffusion_pytorch_model.safetensors").stat().st_size
                )
            quantized[tag] = conv
            del fq
    attempt("converted_w8a8_compiled", lambda: record("converted_w8a8_compiled", _compiled(quantized["w8a8"], inputs), weights=weight_mb(quantized["w8a8"])))
    attempt("fp32_compiled", lambda: record("fp32_compiled", _compiled(unet, inputs), weights=weight_mb(unet)))
    attempt("torchao_int8_dynamic", lambda: record("torchao_int8_dynamic", torchao_int8(unet)))
    attempt("torchao_int8_dynamic_compiled", lambda: record("torchao_int8_dynamic_compiled", _compiled(torchao_int8(unet), inputs)))
    with tempfile.TemporaryDirectory() as tmp:
        attempt("onnxruntime_fp32", lambda: record("onnxruntime_fp32", onnx_session(unet, inputs, Path(tmp), False), weights=weight_mb(unet)))
        attempt("onnxruntime_int8_qdq", lambda: record("onnxruntime_int8_qdq", onnx_session(quantized["w8a8"], inputs, Path(tmp), True),
                                                      weights=weight_mb(quantized["w8a8"])))


def _compiled(model: nn.Module, inputs: dict):
    compiled = torch.compile(model)
    return lambda: compiled(**inputs)


DEFAULT_VARIANTS = (
    "fp32,bf16_autocast,fake_quant_w8a8,converted_w8a8,converted_w4a8,fake_quant_w8a8_attn,converted_w8a8_attn,"
    "torchao_int8_dynamic,onnxruntime_fp32,onnxruntime_int8_qdq"
)


def markdown(out: dict) -> str:
    lines = [
        "# Runtime benchmark (issue 8)", "",
        f"Machine: {out['machine']}; torch {out['torch']}; {out['threads']} threads; load average at start {out['load_avg_start']}.",
        "Median of the timed denoiser calls after one warm-up; x FP32 = FP32 median / variant median (higher is faster).",
        "Weights MB = parameters and buffers held (oneDNN keeps a packed copy of int8 weights on top); peak = RSS growth during the calls.",
        "", f"Command: `{out['command']}`", "",
    ]
    for name, res in out["models"].items():
        lines += [f"## {res['label']}", "", "| variant | ms / step | x FP32 | x BF16 | weights MB | peak RSS growth MB | rel. err vs FP32 | load |", "|---|---|---|---|---|---|---|---|"]
        fp32 = res["variants"].get("fp32", {}).get("median_s")
        bf16 = res["variants"].get("bf16_autocast", {}).get("median_s")
        for variant, row in res["variants"].items():
            err = row.get("rel_err_vs_fp32")
            lines.append(
                f"| {variant} | {row['median_s'] * 1e3:.1f} | {fp32 / row['median_s']:.2f} | {bf16 / row['median_s']:.2f} | "
                f"{row['weights_mb']:.1f} | {row['peak_rss_growth_mb']:.0f} | {'' if err is None else f'{err:.4f}'} | {row['load_avg_1m']:.1f} |"
                if fp32 and bf16 else f"| {variant} | {row['median_s'] * 1e3:.1f} | | | {row['weights_mb']:.1f} | {row['peak_rss_growth_mb']:.0f} | | |"
            )
        lines += ["", "Notes:", "", "```json", json.dumps(res["notes"], indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mini-sd,sd15")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "runtime.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results-runtime.md")
    args = parser.parse_args()
    if args.repeats < 5:
        print("note: fewer than 5 repeats; the issue asks for medians of >= 5", file=sys.stderr)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = {
        "command": " ".join(["python"] + sys.argv), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(), "models": {},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        atomic_write_json(args.json, out)
        atomic_write_text(args.markdown, markdown(out))

    variants = args.variants.split(",")
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        bench_model(name, variants, args.repeats, out, save)
    save()


if __name__ == "__main__":
    main()
