"""Memory and time of the methods on full-size denoisers (random weights), projected to the paper presets.

    PYTHONPATH=src python benchmarks/fullsize.py --model sd15 --methods profile,rtn,qdiffusion --device cpu \\
        --prompts 1 --steps 2 --iterations 2 --act-iterations 2 --out benchmarks/results/fullsize-sd15-cpu.json

Each entry of ``--methods`` runs in a fresh subprocess (so its peak RSS, VmHWM, is its own) on the
``models.fullsize`` pipeline: the published SD 1.5 / SDXL UNet config with random weights and tiny text encoders
and VAE (``--model tiny``: the tiny test pipeline, for smoke runs). Entries:

- ``profile``: one forward of one sample on the meta device (shapes only: no memory, no time), counting FLOPs
  (``torch.utils.flop_counter``; on the meta device attention is counted, which CPU flash attention is not) and
  the bytes per sample of every reconstruction unit's inputs and outputs (what block reconstruction caches per
  calibration sample) in ``--dtype``.
- ``rtn`` / ``qdiffusion`` / ``pcr`` / ``emf``: ``diffquant.quantize`` at the given (cut) sizes, with wall and CPU time
  and peak RSS per stage (a thread samples VmRSS every 20 ms; Q-Diffusion's recording / ranges / reconstruction
  windows come from its report's durations), CUDA peak memory on a GPU, and for Q-Diffusion the time per
  AdaRound / LSQ iteration and per captured sample (timers around the reconstruction's own functions), from
  which the paper preset (50 steps, every 2nd kept, 64 prompts with guidance = 3200 samples; 20k + 5k
  iterations at batch 32) is projected, scaling per-iteration time linearly with batch.
- ``speed``: one denoiser step (batch 2, as with guidance) at each ``--latents`` size: the float model in
  ``--dtype``, torchao's int8 dynamic quantization (``--torchao``: eager or compiled), and diffquant's RTN W8A8
  converted with the ``int_mm`` backend (median of ``--repeats`` after a warm-up; CUDA synchronised).

Peak memory is reported twice: VmRSS, and RssAnon (process memory without file-backed pages: Q-Diffusion's and
PCR's float reference is memory-mapped from disk, page cache the kernel drops under pressure). ``--save-pipeline
FOLDER`` only saves the built pipeline, for trying the CLI on it (``diffquant quantize --model FOLDER``).

Results are written after every entry (atomically), so a run stopped early keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 2**30
PAPER = {"samples": 3200, "record_calls_rows": 64 * 50 * 2, "iterations": 20000, "act_iterations": 5000, "batch": 32}
ASSUMED_GPU_TFLOPS = 100.0  # sustained on small-batch block training: an assumption (~13 % of H100/H200 dense bf16)


def _statuses(*fields: str) -> tuple[int, ...]:
    """Bytes of each ``/proc/self/status`` field (0 where absent), from one read of the file."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            found[name] = int(rest.split()[0]) * 1024
    return tuple(found.get(f, 0) for f in fields)


def _status(field: str) -> int:
    return _statuses(field)[0]


class Monitor:
    """VmRSS sampled every 20 ms (a timeline) and per-stage wall and CPU time (``process_time``), peak RSS and CUDA peak allocation.
    Every 20 s ``partial()`` is written to ``dump`` (a run stopped early still says how far it got)."""

    def __init__(self, device: str, dump: Path | None = None) -> None:
        self.device, self.timeline, self.stages, self.current = device, [], {}, None
        self.t0, self.running, self.dump, self.extra = time.perf_counter(), True, dump, {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        last = 0.0
        while self.running:
            now = time.perf_counter() - self.t0
            self.timeline.append((now, *_statuses("VmRSS", "RssAnon")))
            if self.dump is not None and now - last > 20:
                last = now
                _write(self.dump, self.partial())
            time.sleep(0.02)

    def partial(self) -> dict:
        now = time.perf_counter() - self.t0
        out = {"partial": True, "stages": {k: {kk: vv for kk, vv in v.items() if kk != "start"} for k, v in self.stages.items()},
               "peak_rss_gib": round(_status("VmHWM") / GIB, 3), "peak_anon_gib": round(self.peak(0, now, anon=True), 3),
               **self.extra}
        if self.current is not None:
            out["running_stage"] = {"name": self.current[0], "seconds": round(now - self.current[1], 1),
                                    "peak_rss_gib": round(self.peak(self.current[1], now), 3)}
        return out

    def peak(self, start: float, end: float, anon: bool = False) -> float:
        """Peak VmRSS (or, with ``anon``, RssAnon: process memory without file pages such as a memory-mapped float
        reference, which the kernel can drop) between two times."""
        window = [sample[2 if anon else 1] for sample in self.timeline if start <= sample[0] <= end]
        return max(window, default=_status("RssAnon" if anon else "VmRSS")) / GIB

    @contextmanager
    def stage(self, name: str):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, cpu = time.perf_counter() - self.t0, time.process_time()
        self.current = (name, start)
        yield
        self.current = None
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter() - self.t0
        self.timeline.append((end, *_statuses("VmRSS", "RssAnon")))
        self.stages[name] = {"seconds": round(end - start, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
                             "peak_rss_gib": round(self.peak(start, end), 3),
                             "peak_anon_gib": round(self.peak(start, end, anon=True), 3), "start": start}
        if cuda:
            self.stages[name]["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)

    def windows(self, parent: str, parts: list[tuple[str, float]]) -> None:
        """Sub-stages of ``parent`` from consecutive durations (a method's report), with their peak RSS."""
        start = self.stages[parent]["start"]
        for name, seconds in parts:
            self.stages[f"{parent}/{name}"] = {"seconds": round(seconds, 2),
                                               "peak_rss_gib": round(self.peak(start, start + seconds), 3),
                                               "peak_anon_gib": round(self.peak(start, start + seconds, anon=True), 3)}
            start += seconds


def build(args):
    """The pipeline, cast and moved as asked."""
    from diffquant.models.fullsize import fullsize_pipeline
    from diffquant.models.tiny import tiny_sd_pipeline

    with torch.device(args.device):  # random initialisation on the GPU itself: seconds instead of a minute
        pipe = tiny_sd_pipeline() if args.model == "tiny" else fullsize_pipeline(args.model)
    return pipe.to(args.device, dtype=getattr(torch, args.dtype))


def _prompts(n: int) -> list[str]:
    words = ["a red circle on the left", "a blue square at the top", "a large green star", "a small yellow triangle"]
    return [words[i % len(words)] for i in range(n)]


def _latent_size(args, pipe) -> int:
    return args.latents[0] * pipe.vae_scale_factor


def profile(args, monitor: Monitor) -> dict:
    """FLOPs of one sample's forward and the bytes per sample each reconstruction unit caches (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffquant.models.adapters import get_adapter
    from diffquant.models.fullsize import fullsize_unet
    from diffquant.models.tiny import tiny_unet

    with monitor.stage("build"), torch.device("meta"):
        unet = (tiny_unet(32) if args.model == "tiny" else fullsize_unet(args.model)).to(getattr(torch, args.dtype))
    size = args.latents[0]
    units = get_adapter(unet).blocks()
    cached: dict[str, int] = {}
    prefix: dict[str, int] = {}  # FLOPs run before the unit starts (what capturing its inputs costs)
    own: dict[str, int] = {}
    counter = FlopCounterMode(display=False)

    def pre(name):
        def fn(mod, a, kw):
            prefix[name] = counter.get_total_flops()
        return fn

    def post(name):
        def fn(mod, a, kw, out):
            own[name] = counter.get_total_flops() - prefix[name]
            tensors = [t for t in [*a, *kw.values()] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == 1]
            outs = [out] if torch.is_tensor(out) else [o for o in out if torch.is_tensor(o)]
            cached[name] = sum(t.numel() * t.element_size() for t in tensors + outs)
        return fn

    handles = [h for n in units for h in (unet.get_submodule(n).register_forward_pre_hook(pre(n), with_kwargs=True),
                                          unet.get_submodule(n).register_forward_hook(post(n), with_kwargs=True))]
    inputs = _inputs(unet, 1, size, "meta", getattr(torch, args.dtype))
    with monitor.stage("forward_1_sample_meta"), torch.no_grad(), counter:
        unet(**inputs)
    for h in handles:
        h.remove()
    total = counter.get_total_flops()
    return {"forward_flops_per_sample": total, "params": sum(p.numel() for p in unet.parameters()),
            "units": len(units), "unit_cache_bytes_per_sample": {"max": max(cached.values()), "sum": sum(cached.values()),
                                                                  "largest": max(cached, key=cached.get)},
            "unit_flops_sum": sum(own.values()), "prefix_flops_sum": sum(prefix.values()),
            "dtype_bytes": torch.finfo(getattr(torch, args.dtype)).bits // 8,
            "paper_preset": paper_flops(total, sum(own.values()), sum(prefix.values()))}


def paper_flops(forward: int, units: int, prefixes: int) -> dict:
    """FLOPs of Q-Diffusion's paper preset by stage, from one sample's forward: recording 6400 sample-forwards;
    ranges 3200; capture: for every unit, the quantized and the float model run up to it (plus the unit itself for its
    targets) on 3200 samples; four evaluations of each unit on 3200 samples; 25k iterations x batch 32 x 3
    (forward + backward) of every unit. Fake quantization's elementwise work is not counted (a lower bound)."""
    n = PAPER["samples"]
    flops = {"record": PAPER["record_calls_rows"] * forward, "activation_ranges": n * forward,
             "capture": n * (2 * prefixes + units), "evaluate": 4 * n * units,
             "train": (PAPER["iterations"] + PAPER["act_iterations"]) * PAPER["batch"] * 3 * units}
    total = sum(flops.values())
    return {"pflop": {k: round(v / 1e15, 1) for k, v in flops.items()}, "total_pflop": round(total / 1e15, 1),
            **{f"gpu_hours_at_{r}_tflops": round(total / (r * 1e12) / 3600, 2) for r in (100, 400)}}


def _inputs(unet, batch: int, size: int, device: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    kwargs = dict(sample=torch.randn(batch, cfg.in_channels, size, size, generator=g),
                  timestep=torch.tensor(500.0), encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)}
    cast = {k: (v.to(device, dtype) if k != "timestep" else v.to(device)) for k, v in kwargs.items() if torch.is_tensor(v)}
    if "added_cond_kwargs" in kwargs:
        cast["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in kwargs["added_cond_kwargs"].items()}
    return {**cast, "return_dict": False}


class _Timers:
    """Seconds, calls and work units spent in the reconstruction's capture, evaluation and training functions."""

    def __init__(self) -> None:
        from diffquant.learning import reconstruction as rec

        self.data = {k: {"seconds": 0.0, "calls": 0, "units": 0} for k in ("capture", "evaluate", "train_weights", "train_acts")}
        self.rec = rec
        run_until, dataset_loss, train = rec._run_until, rec._dataset_loss, rec._train

        def timed(key, fn, units):
            def wrapper(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    entry = self.data[key(a, kw) if callable(key) else key]
                    entry["seconds"] += time.perf_counter() - start
                    entry["calls"] += 1
                    entry["units"] += units(a, kw)
            return wrapper

        rec._run_until = timed("capture", run_until, lambda a, kw: a[2].num_samples())
        rec._dataset_loss = timed("evaluate", dataset_loss, lambda a, kw: a[1].num_samples)
        rec._train = timed(lambda a, kw: "train_acts" if kw.get("step_sizes") is not None else "train_weights", train,
                           lambda a, kw: a[6])


def method(args, name: str, monitor: Monitor) -> dict:
    import diffquant
    from diffquant import CalibrationConfig, QuantConfig

    with monitor.stage("build"):
        pipe = build(args)
    options = {}
    if name == "qdiffusion":
        options = {"iterations": args.iterations, "act_iterations": args.act_iterations, "batch_size": args.batch_size,
                   "every_k": args.every_k}
    elif name == "emf":
        options = {"iterations": args.iterations, "batch_size": args.batch_size, "steps_per_prompt": 1,
                   "sensitive_layers": [args.emf_layer], "init_rows": args.batch_size, "weight_training": args.emf_weights,
                   "gradient_checkpointing": args.emf_checkpointing, **({"freeze_at": []} if args.emf_no_freezing else {})}
    elif name == "pcr":
        options = {"relax_steps": [0], "sensitivity_prompts": 0}
    size = _latent_size(args, pipe)
    cfg = QuantConfig(method=name, wbits=args.wbits, abits=8, max_memory=args.max_memory, options=options,
                      calibration=CalibrationConfig(num_prompts=args.prompts, num_inference_steps=args.steps, batch_size=args.prompts,
                                                    every_k=args.every_k, height=size, width=size, guidance_scale=7.5))
    timers = _Timers() if name in ("qdiffusion", "pcr") else None
    monitor.extra.update(config=cfg.to_dict(), settings_batch=args.batch_size, device=args.device)
    if timers is not None:
        monitor.extra["reconstruction_timers"] = timers.data
    with tempfile.TemporaryDirectory(dir=args.workdir) as work, monitor.stage("quantize"):
        diffquant.quantize(pipe, cfg, calibration=_prompts(args.prompts), workdir=work, progress=args.progress)
    report = diffquant.quant_record(pipe.unet).report
    out = {**monitor.extra, "calibration_calls": report.get("calibration_calls"),
           "calibration_samples": report.get("calibration_samples")}
    if name == "qdiffusion":
        q = report["qdiffusion"]
        monitor.windows("quantize", [("record", q["record_seconds"]), ("activation_ranges", q["activation_range_seconds"]),
                                     ("reconstruction", q["reconstruction_seconds"])])
        out["qdiffusion"] = {k: q[k] for k in ("record_seconds", "activation_range_seconds", "reconstruction_seconds",
                                                "calibration_samples", "memory")}
        out["qdiffusion"]["blocks"] = len(q["blocks"])
        out["forward_seconds_per_sample"] = q["record_seconds"] / (args.prompts * args.steps * 2)  # guidance: 2 rows
    elif name in ("pcr", "emf"):
        out[name] = _scalars(report[name])
    if timers is not None:
        out["reconstruction_timers"] = timers.data
    out["input_bytes_per_sample"] = _input_bytes(pipe, args)
    return out


def _scalars(data: dict) -> dict:
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str)) or k == "memory"}


def _input_bytes(pipe, args) -> int:
    """Bytes of one calibration sample's denoiser inputs (latent, text states, timestep) in the run's dtype."""
    inputs = _inputs(pipe.unet, 1, args.latents[0], "cpu", getattr(torch, args.dtype))
    flat = [v for v in inputs.values() if torch.is_tensor(v)] + list(inputs.get("added_cond_kwargs", {}).values())
    return sum(t.numel() * t.element_size() for t in flat if t.dim() > 0)


def _time(fn, repeats: int, device: str) -> dict:
    def run():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    with torch.no_grad():
        warmup, out = run()
        times = [run()[0] for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "warmup_s": warmup, "runs": repeats}, out


def speed(args, monitor: Monitor) -> dict:
    """A denoiser step at each latent size: float, torchao int8 dynamic, diffquant RTN W8A8 on int_mm."""
    import diffquant
    from diffquant import QuantConfig
    from diffquant.calibration import CalibrationSet, DenoiserCall
    from diffquant.runtime import convert

    dtype = getattr(torch, args.dtype)
    with monitor.stage("build"):
        unet = build(args).unet
    rows: dict[str, dict] = {}

    def record(variant: str, size: int, model) -> None:
        inputs = _inputs(unet, 2, size, args.device, dtype)
        with monitor.stage(f"{variant}@{size}"):
            row, out = _time(lambda: model(**inputs)[0], args.repeats, args.device)
        reference = rows.get(f"float@{size}", {}).get("_out")
        if reference is not None:
            row["rel_err_vs_float"] = float((out.float() - reference.float()).norm() / reference.float().norm())
        rows[f"{variant}@{size}"] = {**row, "_out": out.cpu() if variant == "float" else None}

    for size in args.latents:
        record("float", size, unet)
    if args.torchao != "none":
        variant = f"torchao_int8_dynamic_{args.torchao}"
        try:  # a peer's failure is a row of the table, not the end of the run
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            model = copy.deepcopy(unet)
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            model = torch.compile(model) if args.torchao == "compiled" else model
            for size in args.latents:
                record(variant, size, model)
            del model
        except Exception as e:  # noqa: BLE001
            rows[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    calls = [DenoiserCall({k: v.cpu() for k, v in _inputs(unet, 2, args.latents[0], "cpu", dtype).items()
                           if torch.is_tensor(v)} | {"timestep": torch.tensor(t)}, i, 2) for i, t in enumerate((900.0, 300.0))]
    with monitor.stage("rtn_w8a8_quantize"):
        diffquant.quantize(unet, QuantConfig(method="rtn", wbits=8, abits=8), calibration=CalibrationSet(calls), progress=False)
    with monitor.stage("convert_int_mm"):
        convert(unet, backend="int_mm", progress=False)
    for size in args.latents:
        record("diffquant_w8a8_int_mm", size, unet)
    return {k: {kk: vv for kk, vv in v.items() if kk != "_out"} for k, v in rows.items()}


def projection(runs: dict) -> dict | None:
    """Q-Diffusion's paper preset, from this run's measured per-sample and per-iteration times (see the docstring).

    A run stopped early (``partial``) is extrapolated from the blocks it finished to all units, linearly."""
    q, prof = runs.get("qdiffusion", {}), runs.get("profile", {})
    timers = q.get("reconstruction_timers")
    if not timers or not timers["train_weights"]["calls"]:
        return None
    run = q.get("qdiffusion")
    samples = run["calibration_samples"] if run else q.get("calibration_samples") or _planned_samples(q)
    per_sample = q.get("forward_seconds_per_sample") or prof.get("stages", {}).get("forward_1_sample", {}).get("seconds")
    if per_sample is None:
        return None
    blocks = run["blocks"] if run else prof.get("units")
    captured = timers["capture"]["calls"] // 2
    scale = 1.0 if run else blocks / max(timers["train_weights"]["calls"], 1)
    seconds = {
        "record": per_sample * PAPER["record_calls_rows"],
        "activation_ranges": (run["activation_range_seconds"] / samples if run else 1.3 * per_sample) * PAPER["samples"],
        "capture": timers["capture"]["seconds"] / samples * PAPER["samples"] * (blocks / max(captured, 1) if not run else 1.0),
        "evaluate": timers["evaluate"]["seconds"] / samples * PAPER["samples"] * scale,
    }
    batch = min(q["settings_batch"], samples)
    for key, iterations in (("train_weights", PAPER["iterations"]), ("train_acts", PAPER["act_iterations"])):
        t = timers[key]  # units: iterations summed over blocks; calls: blocks trained
        per_model_iteration = t["seconds"] / (t["units"] / t["calls"]) * scale if t["units"] else 0.0
        seconds[key] = per_model_iteration * iterations * PAPER["batch"] / batch
    total = sum(seconds.values())
    note = "" if run else (f"; stopped after {timers['train_weights']['calls']} of {blocks} blocks: block costs extrapolated "
                           "linearly to all blocks, activation ranges taken as 1.3 forward passes")
    out = {"assumptions": f"per-sample times scale with the sample count ({samples} -> {PAPER['samples']}), per-iteration "
                          f"time linearly with batch ({batch} -> {PAPER['batch']}); measured on {q.get('device')}{note}",
           "seconds": {k: round(v) for k, v in seconds.items()}, "total_hours_here": round(total / 3600, 1)}
    if "forward_flops_per_sample" in prof:
        rate = prof["forward_flops_per_sample"] / per_sample
        out["measured_forward_tflops_here"] = round(rate / 1e12, 4)
        out["gpu_hours_estimate"] = round(total * rate / (ASSUMED_GPU_TFLOPS * 1e12) / 3600, 2)
        out["gpu_assumption"] = f"{ASSUMED_GPU_TFLOPS:.0f} TFLOP/s sustained (not measured)"
    return out


def _planned_samples(q: dict) -> int:
    cal = q["config"]["calibration"]
    return cal["num_prompts"] * cal["num_inference_steps"] // cal["every_k"] * 2


def _write(path: Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    monitor = Monitor(args.device, Path(args.worker_out))
    entry = args.worker
    body = profile(args, monitor) if entry == "profile" else speed(args, monitor) if entry == "speed" else method(args, entry, monitor)
    monitor.running = False
    result = {"stages": {k: {kk: vv for kk, vv in v.items() if kk != "start"} for k, v in monitor.stages.items()},
              "peak_rss_gib": round(_status("VmHWM") / GIB, 3), "peak_anon_gib": round(monitor.peak(0, float("inf"), anon=True), 3),
              "device": args.device, **body}
    if args.device.startswith("cuda"):
        result["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    _write(Path(args.worker_out), result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"])
    parser.add_argument("--methods", default="profile,rtn,qdiffusion", help="profile, rtn, qdiffusion, pcr, emf, speed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--latents", default="64", help="latent sizes, comma-separated (the first is used for calibration)")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--every-k", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--act-iterations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--emf-layer", default="down_blocks.0.resnets.0.conv1")
    parser.add_argument("--emf-weights", default="full", choices=["full", "lowrank", "none"],
                        help="EMF's weight training (full: float32 masters, gradients and Adam moments of every weight)")
    parser.add_argument("--emf-checkpointing", action="store_true", help="EMF with gradient checkpointing (recompute blocks)")
    parser.add_argument("--emf-no-freezing", action="store_true", help="EMF without selective freezing (no per-weight flip statistics)")
    parser.add_argument("--torchao", default="none", choices=["none", "eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--workdir", default=None, help="where work folders (and spilled data) go; default: the temp folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fullsize.json"))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--save-pipeline", type=Path, help="only build the --model pipeline in --dtype and save it to this "
                        "folder (for `diffquant quantize --model FOLDER`), then exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.latents = [int(s) for s in str(args.latents).split(",")]
    if args.worker:
        return worker(args)
    if args.save_pipeline:
        build(args).save_pretrained(args.save_pipeline)
        print(f"saved the {args.model} pipeline ({args.dtype}, random weights) to {args.save_pipeline}")
        return
    from diffquant.io import atomic_write_json

    results = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": args.threads,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
               "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "out")}, "runs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        argv = [a for a in sys.argv[1:]]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *argv, "--worker", entry, "--worker-out", path])
        results["runs"][entry] = json.loads(Path(path).read_text()) if Path(path).stat().st_size else {}
        if proc.returncode != 0:  # the worker's last partial dump, if any, says how far it got
            results["runs"][entry].update(error=f"exit code {proc.returncode}", seconds=round(time.perf_counter() - start, 1))
        os.unlink(path)
        results["projection_qdiffusion_paper"] = projection(results["runs"])
        atomic_write_json(args.out, results)
        print(f"{entry}: {json.dumps(results['runs'][entry].get('stages', results['runs'][entry]))[:400]}", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
