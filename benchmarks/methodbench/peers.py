"""The methods-and-peers table: the peers (torchao, quanto, SDNQ, bitsandbytes, NNCF) beside diffquant's rows.

The peers run through ``diffquant.evaluation.bench.run_bench`` on the first ``--peer-prompts`` held-out prompts of
the methods table (prompt i with seed i, the same steps, guidance and size) and calibrate on the same calibration
prompts; diffquant RTN is quantized again in the same run, so the table has fresh diffquant rows with every
column. The methods table's stored rows (Q-Diffusion, PCR, EMF) join from their per-image results on the same
prompts (PSNR, SSIM, attribute accuracy: exact, the images are the same), their Fréchet distance from the
evaluator features the methods run saves per row, their coverage and bits from the row's summary. Every row's coverage,
average bits and file size come from ``diffquant.bits`` through the harness, one computation for all.
The result is the model's ``peers`` entry in methods.json, kept when the methods rows are rerun.
"""

from __future__ import annotations

import time
from pathlib import Path

PEERS = "torchao-w8a8,quanto-w8a8,sdnq-int8,nncf-int8,bnb-int8,quanto-w4,sdnq-uint4,sdnq-uint4-svd,sdnq-int8-svd,bnb-nf4"
COVERAGE = ("weight_coverage", "mac_coverage", "avg_wbits", "avg_abits", "denoiser_mib")
KEEP = ("psnr", "ssim", "fd_fp", "attr_all", "weight_coverage", "mac_coverage", "avg_wbits", "avg_abits", "denoiser_mib",
        "calibration_s", "peak_memory_mib")


def subset_row(row: dict, n: int, features_dir: Path | None = None) -> dict | None:
    """A stored methods row on its first ``n`` prompts: PSNR, SSIM and attribute accuracy from its per-image lists,
    FD to FP from the evaluator features the methods run saved (``<work-dir>/<model>/features/<key>.pt``, rows in
    prompt order, FP in ``FP.pt``), coverage and bits from its summary (the harness computes them for every row)."""
    per = row.get("per_image", {})
    if len(per.get("psnr", [])) < n:
        return None
    summary = {k: sum(per[k][:n]) / n for k in ("psnr", "ssim", "attr_all") if len(per.get(k, [])) >= n}
    summary.update({k: row["summary"][k] for k in COVERAGE if row.get("summary", {}).get(k) is not None})
    feats = features_dir / f"{row.get('key')}.pt" if features_dir is not None else None
    if feats is not None and feats.is_file() and (features_dir / "FP.pt").is_file():
        import torch

        from diffquant.evaluation.metrics import frechet_distance

        fp, own = (torch.load(p, weights_only=True) for p in (features_dir / "FP.pt", feats))
        if len(fp) >= n and len(own) >= n:
            summary["fd_fp"] = frechet_distance(own[:n], fp[:n])
    summary["calibration_s"] = row.get("quantize_s")
    return {"label": f"diffquant {row['label']}", "source": f"methods table, first {n} of its prompts", "summary": summary}


def _row(m: dict) -> dict:
    if m.get("unavailable"):
        return {"label": m["label"], "unavailable": m["unavailable"]}
    label = f"diffquant {m['label']}" if m["label"].startswith("rtn") else m["label"]
    return {"label": label, "spec": m["spec"], "source": "this run", "fingerprint": m["fingerprint"],
            "summary": {k: m["summary"].get(k) for k in KEEP if m["summary"].get(k) is not None}}


def run_peer_table(name: str, args, store) -> None:
    """Peers and diffquant RTN on ``args.peer_prompts`` held-out prompts of model ``name``, stored as its ``peers``
    entry after every row (a rerun skips finished rows; FP and row images come from the cache)."""
    from diffquant import zoo
    from diffquant.evaluation import EvalOptions, PromptItem
    from diffquant.evaluation.bench import parse_bits, run_bench
    from diffquant.evaluation.peers import parse_peers

    from .runner import load_fp

    model = store.data["models"].get(name)
    if model is None:
        raise SystemExit(f"{name} has no methods table in {store.json_path}; run the methods rows first")
    started = time.time()
    fp, settings, source = load_fp(name, args.model_paths.get(name))
    if args.steps:
        settings = type(settings)(args.steps, settings.guidance, settings.height, settings.width)
    n = args.peer_prompts
    items = [PromptItem(p, i) for i, p in enumerate(zoo.heldout_prompts(n))]
    calib = zoo.calibration_prompts(model["calib_prompts"])  # the methods table's calibration set
    options = EvalOptions(metrics=["psnr", "ssim", "fd_fp", "attributes"], cache_dir=Path(args.cache_dir) / name,
                          batch_size=args.batch_size)
    bits, peers = parse_bits(args.bits), parse_peers(args.peers)
    plan = [("rtn", b, None) for b in sorted(bits, reverse=True)] + [(None, None, p) for p in peers]
    table = model.get("peers") or {}
    if table.get("n_images") != n or args.fresh:
        table = {"rows": []}
    done = {r["label"] for r in table["rows"] if r.get("source") == "this run" or r.get("unavailable")}
    features = Path(args.work_dir) / name / "features"
    ran = False
    print(f"[{name}] peers: {n} prompts, {len(calib)} calibration prompts", flush=True)
    for method, b, peer in plan:
        label = f"diffquant rtn-w{b[0]}a{b[1]}" if method else peer
        if label in done:
            print(f"[{name}] {label}: finished in an earlier run, reused", flush=True)
            continue
        print(f"[{name}] {label}", flush=True)
        ev = run_bench(fp, name, items, settings, options, methods=[method] if method else [], bits=[b] if method else [],
                       peers=[peer] if peer else [], calibration=calib, prompts_spec=f"zoo:heldout:{n}")
        res = ev.results()
        row = _row(res["models"][0])
        print(f"[{name}] {label}: {row.get('summary', row.get('unavailable'))}", flush=True)
        rows = [r for r in table["rows"] if (r.get("source") == "this run" or r.get("unavailable")) and r["label"] != label] + [row]
        order = {lab: i for i, lab in enumerate(f"diffquant rtn-w{x[0]}a{x[1]}" if m else p for m, x, p in plan)}
        rows.sort(key=lambda r: order.get(r["label"], len(order)))
        table = {
            "command": f".venv/bin/python benchmarks/methods.py {args.line}".strip(), "n_images": n, "source": source,
            "settings": res["settings"], "feature_space": res["feature_space"], "calib_prompts": len(calib),
            "reference": {k: res["reference"]["summary"].get(k) for k in KEEP if res["reference"]["summary"].get(k) is not None},
            "rows": rows, "skipped": res["skipped"],
            "started": table.get("started") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "wall_s": table.get("wall_s", 0.0) + time.time() - started, "machine": model.get("machine"),
        }
        started, ran = time.time(), True
        _save(name, model, table, n, features, store)
    if not ran and table.get("rows"):  # the stored methods rows may have changed (a --redo) although no peer row ran
        _save(name, model, table, n, features, store)
    print(f"[{name}] peers done", flush=True)


def _save(name: str, model: dict, table: dict, n: int, features: Path, store) -> None:
    """Store ``table`` (this run's rows) with the methods table's Q-Diffusion/PCR/EMF/faithful rows joined on the same prompts,
    and the fresh RTN rows checked against the stored ones (do the two runs agree?)."""
    rows = [r for r in table["rows"] if r.get("source") == "this run" or r.get("unavailable")]
    stored = [subset_row(r, n, features) for r in model["rows"] if r["variant"] in ("qdiffusion", "pcr", "emf", "faithful")]
    fresh_rtn = {r["label"]: r["summary"]["psnr"] for r in rows if r["label"].startswith("diffquant rtn") and "summary" in r}
    stored_rtn = {f"diffquant {r['label']}": subset_row(r, n)["summary"]["psnr"] for r in model["rows"] if r["variant"] == "rtn"}
    table.update(rows=rows + [r for r in stored if r is not None],
                 rtn_check={k: {"fresh": v, "stored": stored_rtn.get(k)} for k, v in fresh_rtn.items()})
    model["peers"] = table
    store.touched.add(name)
    store.save()


COLUMNS = [("weight_coverage", "quantized weights", "{:.0%}"), ("mac_coverage", "quantized MACs", "{:.0%}"),
           ("avg_wbits", "avg W bits", "{:.2f}"), ("avg_abits", "avg A bits", "{:.2f}"), ("psnr", "PSNR ↑ (dB)", "{:.2f}"),
           ("ssim", "SSIM ↑", "{:.4f}"), ("fd_fp", "FD to FP ↓", "{:.2f}"), ("attr_all", "attr. all ↑", "{:.3f}"),
           ("denoiser_mib", "denoiser file (MiB)", "{:.2f}"), ("calibration_s", "quantize (s)", "{:.0f}")]


def markdown(name: str, table: dict) -> list[str]:
    """The model's methods-and-peers section of the page."""
    s = table["settings"]
    lines = [f"### {name}: diffquant and the peers on {table['n_images']} held-out prompts", "",
             f"Reproduce: `{table['command']}`. Prompts 0–{table['n_images'] - 1} of the table above (seed = index), "
             f"{s['steps']} steps, guidance {s['guidance']}, {s['height']}x{s['width']}; {table['calib_prompts']} calibration prompts "
             f"for every row that calibrates. Run {table['started']}, {table['wall_s'] / 60:.0f} min on {table.get('machine')}. "
             f"FD to FP on {table['n_images']} images is biased upward against the 256-image table: compare it within this table.", "",
             "| row | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]

    def cells(summary: dict) -> str:
        return " | ".join("–" if summary.get(k) is None else f.format(summary[k]) for k, _, f in COLUMNS)

    lines.append(f"| FP | {cells(table['reference'])} |")
    for row in table["rows"]:
        if row.get("unavailable"):
            lines.append(f"| {row['label']} | unavailable: {row['unavailable']} |" + " |" * (len(COLUMNS) - 1))
        else:
            mark = " ¹" if row.get("source", "").startswith("methods table") else ""
            lines.append(f"| {row['label']}{mark} | {cells(row['summary'])} |")
    check = "; ".join(f"{k}: {v['fresh']:.2f} dB here, {v['stored']:.2f} dB in the stored row" for k, v in table["rtn_check"].items()
                      if v["stored"] is not None)
    lines += ["", ("¹ From the methods table's stored per-image results on the same prompts (same images): PSNR, SSIM and "
                   "attribute accuracy are exact; FD to FP from the evaluator features the methods run saved for those prompts, "
                   "coverage and bits from the row's summary (– where a row predates them); `quantize` is the "
                   "methods table's time. RTN rerun here against its stored row on the same prompts: " + (check or "no stored row") + "."),
              "", ("Coverage and bits over the whole denoiser (`diffquant.bits`, the one convention: `diffquant.average_bits` "
                   "and `diffquant info` report the same): quantized share of all parameter "
                   "elements and of the MACs of one denoiser call whose two operands are both quantized (weight-only quantization "
                   "counts 0 MACs); bits per parameter and per MAC with float parts at 32 (float32); rows of the methods table "
                   "above marked ² were stored in the earlier convention (quantized layers, float layers at 16). `denoiser file` is what would "
                   "ship: diffquant's saved folder (int codes), OpenVINO's IR weights, a peer's state dict as safetensors. "
                   "`quantize` is wall time (quantization and calibration) on that machine, shared with other jobs: "
                   "compare it within one run only."), ""]
    return lines
