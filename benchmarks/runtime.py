"""Denoiser step latency and memory: torch FP32/BF16, diffquant's runtime, OpenVINO (float, NNCF, diffquant's export), peers.

    .venv/bin/python benchmarks/runtime.py --models mini-sd,sd15 --repeats 5 --threads 2

Every variant runs in this one process on the same inputs; the table reports the median of
``--repeats`` timed denoiser calls after one warm-up, the ratio to FP32 and BF16, the weight bytes
held (oneDNN's packed copies of integer weights included) and the peak RSS growth during the calls
(sampled every 5 ms). ``sd15`` is a full-size SD 1.5 UNet built from its config with random weights
(64x64 latents, batch 2); it is RTN-quantized from two recorded calls of random latents (timesteps
900 and 300) and random text states, so its speed is real and its image quality meaningless.
``mini-sd`` is the bundled zoo model at its own latent size (the tiny test UNet when its weights are
not installed; the label says which ran).

Variants (``--variants``, comma-separated; ``bf16_weights`` = the float model cast to bf16, without
autocast's per-call weight casts; ``*_bf16`` = the converted model under CPU bf16 autocast: integer
kernels write bf16 and the float ops run in bf16; ``*_compiled`` = ``torch.compile``, cold compile
excluded from the timings). For the converted W8A8 model (fp32 and bf16) the notes hold the
top operators of one profiled call (``torch.profiler``), so the time split between integer kernels,
attention and glue is visible.

Other engines (runtime_engines.py): ``openvino_fp32`` / ``openvino_bf16`` = the float UNet on OpenVINO
(``INFERENCE_PRECISION_HINT`` f32 / bf16, bf16 being its default on this CPU); ``openvino_nncf_int8`` =
NNCF's INT8 (the ``nncf-int8`` peer's recipe) calibrated on the same recorded calls as diffquant's RTN,
bf16 hint; ``openvino_w8a8`` / ``openvino_w4a8`` = diffquant's ``export_openvino`` of the RTN model (its own
scales), int8 graph, bf16 hint (``*_float``: its float graph, f32 hint); ``pt2e_x86_int8_compiled`` = PyTorch's static int8
(PT2E ``X86InductorQuantizer`` calibrated on those calls, then ``torch.compile``). Their notes name the
kernel precision OpenVINO chose per layer type. Weights MB of an OpenVINO row is its IR weight file (``ir_bytes``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch
from torch import nn

import diffquant
from diffquant import QuantConfig
from diffquant.calibration import CalibrationSet, DenoiserCall
from diffquant.io import atomic_write_json, atomic_write_text
from diffquant.models.fullsize import SD15_UNET as SD15
from diffquant.runtime import convert
from diffquant.runtime.modules import IntLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_engines as engines  # noqa: E402  (sibling module: benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (
    "fp32", "bf16_autocast", "bf16_weights", "fp32_compiled", "bf16_autocast_compiled",
    "fake_quant_w8a8", "converted_w8a8", "converted_w8a8_bf16", "converted_w8a8_compiled",
    "fake_quant_w4a8", "converted_w4a8", "converted_w4a8_bf16",
    "fake_quant_w8a8_attn", "converted_w8a8_attn", "converted_w8a8_attn_bf16",
    "fake_quant_w8a8_tok", "converted_w8a8_tok", "openvino_w8a8_tok", "openvino_w8a8_tok_float",
    "fake_quant_w8a8_tokfc", "converted_w8a8_tokfc", "openvino_w8a8_tokfc", "openvino_w8a8_tokfc_float",
    "openvino_w8a8_toksm", "openvino_w8a8_toksm_float", "openvino_w8a8_sym", "openvino_w8a8_qk", "openvino_w8a8_symqk",
    "torchao_int8_dynamic", "torchao_int8_dynamic_compiled", "onnxruntime_fp32", "onnxruntime_int8_qdq",
    "converted_w8a8_grp", "openvino_w8a8_grp", "openvino_w4a4_grp", "converted_w4a4_grplr2", "openvino_w4a4_grplr2",
) + engines.ENGINE_VARIANTS
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not any(k in v for k in ("attn", "tok", "sym", "qk", "grp")) and v != "fake_quant_w4a8")
# _tok: dynamic per-token activation scales (issue 22); _tokfc: per token on Linear inputs, static per-tensor on
# convolutions (``conv_act_granularity``), which then keep their int8 kernels; _toksm: the convolutions' inputs
# smoothed per channel instead (static too)
# _sym: symmetric activations; _qk: q and k of the attention quantized too (symmetric), its fused op kept
# _grp: dynamic per-group (64-channel) activation scales, the faithful recipe's; _grplr2: with a rank-2 low-rank float
# branch beside every layer too (issue 19's 4-bit-activation form)
QUANT_TAGS = ("w8a8", "w4a8", "w8a8_attn", "w8a8_tok", "w8a8_tokfc", "w8a8_toksm", "w8a8_sym", "w8a8_qk", "w8a8_symqk",
              "w8a8_grp", "w4a4_grp", "w4a4_grplr2")
# per-token tag suffix -> the convolutions' own granularity (None: per-token too)
PER_TOKEN = {"tok": None, "tokfc": "per_tensor", "toksm": "per_channel_smooth"}


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
    """Bytes of parameters and buffers, plus the kernel-ready weight copies integer layers cache (oneDNN packing)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for m in model.modules():
        if isinstance(m, IntLayer):
            for entry in m._cache.values():
                for t in entry if isinstance(entry, tuple) else (entry,):
                    if isinstance(t, torch.Tensor):
                        tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def time_call(fn, repeats: int) -> tuple[dict, torch.Tensor]:
    """Timings of ``repeats`` calls after a warm-up call (packs weights, compiles), and the warm-up's output."""
    with torch.no_grad():
        start = time.perf_counter()
        output = fn()
        warmup = time.perf_counter() - start
        times = []
        with PeakRSS() as mem:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    row = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times),
           "warmup_s": warmup, "peak_rss_growth_mb": mem.growth_mb}
    return row, output


def top_ops(fn, rows: int = 15) -> list[dict]:
    """The operators of one call by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:rows]]


def build(model: str):
    """(float UNet, call kwargs, calibration set, label)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        unet, label = UNet2DConditionModel(**SD15), "SD 1.5 UNet (random weights), 64x64 latents, batch 2"
        size, seq = 64, 77
    elif model == "mini-sd":
        try:
            from diffquant import zoo

            unet = zoo.load_pipeline("mini-sd").unet
            label = "mini-sd"
        except (FileNotFoundError, ImportError, ValueError):
            from diffquant.models.tiny import tiny_unet

            unet, label = tiny_unet(32), "tiny SD UNet (mini-sd weights not installed)"
        size, seq = unet.config.sample_size, 16
        label += f", {size}x{size} latents, batch 2"
    elif model == "mini-flux":  # the bundled Flux transformer: 16x16 latents -> 64 packed tokens, 24 T5 tokens
        from diffquant import zoo

        return flux_case(zoo.load_pipeline("mini-flux").transformer, 2, 16, 24, "mini-flux, 64 image + 24 text tokens, batch 2")
    elif model == "flux-slice":  # FLUX.1's widths, 1 double- + 2 single-stream blocks: 256x256 px, 128 T5 tokens
        from diffusers import FluxTransformer2DModel

        from diffquant.models.fullsize import FLUX1_TRANSFORMER

        flux = FluxTransformer2DModel(**{**FLUX1_TRANSFORMER, "num_layers": 1, "num_single_layers": 2})
        params = sum(p.numel() for p in flux.parameters()) / 1e6
        return flux_case(flux, 1, 32, 128, f"FLUX.1 slice ({params:.0f}M parameters, random weights): 256 image + 128 text tokens, batch 1")
    else:
        raise SystemExit(f"unknown model {model!r}; choose mini-sd, mini-flux, flux-slice or sd15")
    unet.eval()
    g = torch.Generator().manual_seed(0)

    def call(t: float) -> dict:
        return dict(
            sample=torch.randn(2, unet.config.in_channels, size, size, generator=g), timestep=torch.tensor(t),
            encoder_hidden_states=torch.randn(2, seq, unet.config.cross_attention_dim, generator=g),
        )

    calib = CalibrationSet([DenoiserCall(call(900.0), 0, 2), DenoiserCall(call(300.0), 1, 2)])
    return unet, {**call(500.0), "return_dict": False}, calib, label


def flux_case(flux: nn.Module, batch: int, size: int, seq_len: int, label: str):
    """``build``'s tuple for a Flux transformer: the adapter's example call at ``size`` latents and ``seq_len`` T5 tokens,
    calibrated at t = 900 and 300, timed at 500 (FluxPipeline passes t / 1000)."""
    from diffquant.models.adapters import get_adapter

    adapter = get_adapter(flux.eval())

    def call(t: float) -> dict:
        return {**adapter.example_inputs(batch=batch, size=size, seq_len=seq_len), "timestep": torch.full((batch,), t / 1000)}

    calib = CalibrationSet([DenoiserCall(call(900.0), 0, batch), DenoiserCall(call(300.0), 1, batch)])
    return flux, {**call(500.0), "return_dict": False}, calib, label


def quantize(unet: nn.Module, calib: CalibrationSet, tag: str) -> nn.Module:
    suffix = tag.partition("_")[2]
    granularity = "per_token" if suffix in PER_TOKEN else "per_group" if suffix.startswith("grp") else "per_tensor"
    cfg = QuantConfig(method="rtn", wbits=int(tag[1]), abits=int(tag[3]), quantize_attention=tag.endswith(("_attn", "qk")),
                      attention_quantizers="qk" if suffix.endswith("qk") else "qkv_softmax", act_symmetric=suffix.startswith("sym"),
                      act_granularity=granularity, conv_act_granularity=PER_TOKEN.get(suffix),
                      lowrank_rank=2 if suffix.endswith("lr2") else 0)
    return diffquant.quantize(copy.deepcopy(unet), cfg, calibration=calib, progress=False)


def onnx_session(model: nn.Module, inputs: dict, folder: Path, quantized: bool, threads: int):
    import onnxruntime as ort

    from diffquant.runtime.flat import FlatCall
    from diffquant.runtime.onnx import export_onnx

    names = ["sample", "timestep", "encoder_hidden_states"]
    args = {k: inputs[k] for k in names}
    path = folder / ("int8.onnx" if quantized else "fp32.onnx")
    if quantized:
        export_onnx(model, path, inputs=args)
    else:
        torch.onnx.export(FlatCall(model, names).eval(), tuple(args.values()), str(path), input_names=names,
                          output_names=["noise_pred"], dynamo=True, external_data=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in args.items()}
    return lambda: torch.from_numpy(session.run(None, feeds)[0])


def torchao_int8(unet: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(unet)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_model(name: str, variants: list[str], args, out: dict, save) -> None:
    t0 = time.perf_counter()
    unet, inputs, calib, label = build(name)
    result = {"label": label, "build_s": time.perf_counter() - t0, "variants": {}, "notes": {}, "profiles": {}}
    out["models"][name] = result
    with torch.no_grad():
        ref = unet(**inputs)[0]

    def caller(model: nn.Module, autocast: bool = False):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                return model(**inputs)[0]
        return fn

    def record(variant: str, fn, weights: float | None, reference: torch.Tensor | None = None) -> None:
        row, output = time_call(fn, args.repeats)
        row["weights_mb"] = weights
        row["rel_err_vs_fp32"] = rel_err(output, ref)
        if reference is not None:
            row["rel_err_vs_fake_quant"] = rel_err(output, reference)
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
            result["notes"][variant] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {name} {variant}: {result['notes'][variant]}", flush=True)
            save()

    fp32_mb = weight_mb(unet)
    attempt("fp32", lambda: record("fp32", caller(unet), fp32_mb))
    attempt("bf16_autocast", lambda: record("bf16_autocast", caller(unet, True), fp32_mb))

    def bf16_weights() -> None:
        model = copy.deepcopy(unet).to(torch.bfloat16)
        cast = {k: v.to(torch.bfloat16) if k != "timestep" and torch.is_tensor(v) else v for k, v in inputs.items()}
        record("bf16_weights", lambda: model(**cast)[0], weight_mb(model))

    attempt("bf16_weights", bf16_weights)
    attempt("fp32_compiled", lambda: record("fp32_compiled", caller(torch.compile(unet)), fp32_mb))
    attempt("bf16_autocast_compiled", lambda: record("bf16_autocast_compiled", caller(torch.compile(unet), True), fp32_mb))
    torch._dynamo.reset()

    def engine(variant: str, build, reference: torch.Tensor | None = None) -> None:
        fn, weights, note = build()
        result["notes"][variant] = note
        record(variant, fn, weights, reference)

    for precision in ("fp32", "bf16"):
        attempt(f"openvino_{precision}", lambda: engine(
            f"openvino_{precision}", lambda: engines.openvino_float(unet, calib, inputs, precision.replace("fp", "f"))))
    attempt("openvino_nncf_int8", lambda: engine("openvino_nncf_int8", lambda: engines.openvino_nncf(unet, calib, inputs)))
    gc.collect()

    keep: dict[str, nn.Module | torch.Tensor] = {}

    def quantized_variants(tag: str) -> None:
        start = time.perf_counter()
        model = quantize(unet, calib, tag)
        result["notes"][f"quantize_{tag}_s"] = time.perf_counter() - start
        with torch.no_grad():
            fake = model(**inputs)[0]
        attempt(f"fake_quant_{tag}", lambda: record(f"fake_quant_{tag}", caller(model), weight_mb(model)))
        with tempfile.TemporaryDirectory() as tmp:  # one export (of the frozen model) serves both graphs
            for suffix, graph, precision in (("", "int", "bf16"), ("_float", "float", "f32")):
                attempt(f"openvino_{tag}{suffix}", lambda: engine(
                    f"openvino_{tag}{suffix}", lambda: engines.openvino_export(model, Path(tmp) / "ov", inputs, graph, precision, args.ov_in_memory), fake))
        if not (any(f"converted_{tag}{s}" in variants for s in ("", "_bf16", "_compiled"))
                or (tag == "w8a8" and "onnxruntime_int8_qdq" in variants)):
            save()  # no torch-runtime row asked for: skip converting and its file-size note
            return
        start = time.perf_counter()
        convert(model, example_inputs=inputs, autotune=args.autotune, repeats=args.autotune_repeats, progress=False)
        result["notes"][f"convert_{tag}_s"] = time.perf_counter() - start
        runtime = diffquant.quant_record(model).report["runtime"]
        result["notes"][f"converted_{tag}"] = {
            "backends": {b: sum(v == b for v in runtime["backends"].values()) for b in sorted(set(runtime["backends"].values()))},
            "float_fallback": {n: r for n, r in runtime["float_fallback"].items() if "attention" not in r},
            "max_layer_rel_err_vs_fake_quant": runtime.get("max_rel_error_vs_fake_quant"),
        }
        held = weight_mb(model)
        attempt(f"converted_{tag}", lambda: record(f"converted_{tag}", caller(model), held, fake))
        attempt(f"converted_{tag}_bf16", lambda: record(f"converted_{tag}_bf16", caller(model, True), held, fake))
        if tag == "w8a8" and args.profile:
            for suffix, autocast in (("", False), ("_bf16", True)):
                if f"converted_{tag}{suffix}" in result["variants"]:
                    result["profiles"][f"converted_{tag}{suffix}"] = top_ops(caller(model, autocast))
        attempt(f"converted_{tag}_compiled", lambda: record(f"converted_{tag}_compiled", caller(torch.compile(model)), held, fake))
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as tmp:
            diffquant.save(model, Path(tmp) / "q")
            fp16 = Path(tmp) / "fp16"
            copy.deepcopy(unet).half().save_pretrained(fp16)
            result["notes"][f"file_ratio_{tag}_vs_fp16"] = (
                (Path(tmp) / "q" / "diffquant_model.safetensors").stat().st_size
                / (fp16 / "diffusion_pytorch_model.safetensors").stat().st_size
            )
        if tag == "w8a8" and "onnxruntime_int8_qdq" in variants:
            keep["w8a8"], keep["w8a8_fake"] = model, fake
        save()

    for tag in QUANT_TAGS:
        if any(v.endswith((tag, f"{tag}_bf16", f"{tag}_compiled")) for v in variants) or (
                tag == "w8a8" and "onnxruntime_int8_qdq" in variants):
            quantized_variants(tag)
            gc.collect()

    def torchao_variant(compiled: bool) -> None:
        model = torchao_int8(unet)
        variant = "torchao_int8_dynamic" + ("_compiled" if compiled else "")
        record(variant, caller(torch.compile(model) if compiled else model), weight_mb(model))

    attempt("torchao_int8_dynamic", lambda: torchao_variant(False))
    attempt("torchao_int8_dynamic_compiled", lambda: torchao_variant(True))
    torch._dynamo.reset()
    gc.collect()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        attempt("onnxruntime_fp32", lambda: record("onnxruntime_fp32", onnx_session(unet, inputs, Path(tmp), False, threads), fp32_mb))
        attempt("onnxruntime_int8_qdq", lambda: record(
            "onnxruntime_int8_qdq", onnx_session(keep["w8a8"], inputs, Path(tmp), True, threads), None, keep.get("w8a8_fake")))
    # last: its cold Inductor compile takes minutes, and every row above is saved before it starts
    attempt("pt2e_x86_int8_compiled", lambda: engine("pt2e_x86_int8_compiled", lambda: engines.pt2e_int8(unet, calib, inputs)))
    torch._dynamo.reset()
    result["total_s"] = time.perf_counter() - t0
    save()


def markdown(out: dict) -> str:
    lines = [
        "# Runtime benchmark (issues 8 and 14)", "",
        f"Machine: {out['machine']}; torch {out['torch']}; {out['threads']} threads; load average at start "
        f"{', '.join(f'{v:.1f}' for v in out['load_avg_start'])} (the machine is shared: compare rows of one run, "
        "the load column says how busy it was during each row).",
        "Median of the timed denoiser calls after one warm-up; x FP32 / x BF16 = that median / this one (higher is faster).",
        "Weights MB = parameters, buffers and packed integer weights held; peak = RSS growth during the timed calls.",
        "", f"Command: `{out['command']}`", "",
    ] + ([out["preface"], ""] if out.get("preface") else [])  # a reading of the run, kept in the JSON
    for name, res in out["models"].items():
        lines += [f"## {res['label']}", "",
                  "| variant | ms / step | x FP32 | x BF16 | rel. err vs FP32 | vs fake-quant | weights MB | peak RSS growth MB | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fp32 = res["variants"].get("fp32", {}).get("median_s")
        bf16 = res["variants"].get("bf16_autocast", {}).get("median_s")
        for variant, row in res["variants"].items():
            speedup = [f"{base / row['median_s']:.2f}" if base else "" for base in (fp32, bf16)]
            fake = row.get("rel_err_vs_fake_quant")
            weights = row.get("weights_mb")
            lines.append(
                f"| {variant} | {row['median_s'] * 1e3:.1f} | {speedup[0]} | {speedup[1]} | {row['rel_err_vs_fp32']:.4f} | "
                f"{'' if fake is None else f'{fake:.4f}'} | {'' if weights is None else f'{weights:.1f}'} | "
                f"{row['peak_rss_growth_mb']:.0f} | {row['load_avg_1m']:.1f} |"
            )
        for variant, ops in res.get("profiles", {}).items():
            lines += ["", f"Top operators of one `{variant}` call (self CPU time):", "", "| op | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_ms']} | {o['share']:.1%} | {o['calls']} |" for o in ops]
        lines += ["", "Notes:", ""] + [f"- {line}" for line in note_lines(res["notes"])] + [""]
        targets = engines.target_lines(name, res)
        lines += ["Targets (issues 14 and 22):", ""] + [f"- {line}" for line in targets] + [""] if targets else []
    return "\n".join(lines)


def note_lines(notes: dict) -> list[str]:
    """One line per note; a converted model's per-layer float fallbacks are counted here and named in the JSON."""
    lines = []
    for key, value in notes.items():
        if isinstance(value, dict) and "float_fallback" in value:
            backends = ", ".join(f"{n} {c}" for n, c in value.get("backends", {}).items())
            err = value.get("max_layer_rel_err_vs_fake_quant")
            lines.append(f"`{key}`: layers per backend: {backends}; {len(value['float_fallback'])} stay float because their "
                         "integer form timed slower (named in the JSON and by `diffquant info`)"
                         + ("" if err is None else f"; largest per-layer relative error vs fake quant {err:.1e}"))
        elif isinstance(value, dict) and "kernels" in value:
            kernels = ", ".join(f"{k} x{n}" for k, n in value["kernels"].items())
            rest = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items() if k != "kernels")
            lines.append(f"`{key}`: {rest}; compiled kernels: {kernels}")
        elif isinstance(value, float):
            lines.append(f"`{key}`: {value:.4g}")
        else:
            lines.append(f"`{key}`: {value}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mini-sd,sd15", help="comma-separated: mini-sd, mini-flux, flux-slice, sd15")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="intra-op threads (PyTorch and ONNX Runtime)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="convert without timing each layer (oneDNN everywhere) instead of diffquant.convert(example_inputs=...)")
    parser.add_argument("--ov-in-memory", action="store_true", help="trace each of diffquant's OpenVINO graphs on its "
                        "own in memory instead of exporting both (what fits SD 1.5 in 24 GB)")
    parser.add_argument("--autotune-repeats", type=int, default=2, help="timed calls per layer and form while converting")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler table of the converted model")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "runtime.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results-runtime.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite --markdown from an existing --json; time nothing")
    args = parser.parse_args()
    if args.render_only:
        atomic_write_text(args.markdown, markdown(json.loads(args.json.read_text())))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 5:
        print("note: fewer than 5 repeats; the issue asks for medians of >= 5", file=sys.stderr)
    torch.set_num_threads(args.threads)
    out = {
        "command": " ".join(["python"] + sys.argv), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(), "models": {},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        atomic_write_json(args.json, out)
        atomic_write_text(args.markdown, markdown(out))

    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        bench_model(name, variants, args, out, save)
    save()


if __name__ == "__main__":
    main()
