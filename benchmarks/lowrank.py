"""Issue 19, items 3-4: the low-rank float branch and W4A4 on the mini zoo, from `diffquant bench` runs.

Each run is one `diffquant bench` (same prompts, seeds and initial noise as every other run on that model: the
image cache shares the FP images), e.g.

    diffquant bench --model mini-sd --methods rtn --bits w4a4 --lowrank-rank 8 --act-granularity per_group \\
        --prompts zoo:heldout:32 --calib-prompts zoo:calibration:8 --peers none --metrics psnr,ssim,fd_fp \\
        --cache-dir runs/cache --batch-size 8 --out runs/sd-w4a4-pg-r8

then collect them into one table (JSON + markdown) with the issue's targets checked:

    python benchmarks/lowrank.py runs/sd-* runs/sd3-* --json benchmarks/results/lowrank.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("psnr", "ssim", "fd_fp", "avg_wbits", "avg_abits", "calibration_s")


def collect(folders: list[Path]) -> dict:
    """Every row of every run: ``{model, label, run folder, settings, KEYS...}``."""
    rows = []
    for folder in folders:
        if not (folder / "results.json").is_file():
            continue
        results = json.loads((folder / "results.json").read_text())
        model = results["reference"]["spec"]
        for row in results["models"]:
            summary = row.get("summary", {})
            rows.append({"model": model, "label": row["label"], "run": str(folder), "settings": results["settings"],
                         **{k: summary.get(k) for k in KEYS}})
    return {"rows": rows}


def targets(rows: list[dict]) -> list[str]:
    """The issue's claims, each holds / does not hold with its numbers (rows missing: not measured)."""
    by = {(r["model"], r["label"]): r for r in rows}
    out = []
    w4a8 = [r for r in rows if r["model"] == "mini-sd" and "-w4a8" in r["label"] and r["avg_wbits"] <= 4.5]
    best = max(w4a8, key=lambda r: r["psnr"], default=None)
    if best:
        ok = best["psnr"] >= 41.7 and best["fd_fp"] <= 1.5
        out.append(f"mini-sd W4A8 at <= 4.5 avg weight bits: PSNR >= 41.7 dB and FD <= 1.5: {'holds' if ok else 'does not hold'} "
                   f"(best {best['label']}: {best['psnr']:.2f} dB, FD {best['fd_fp']:.2f}, {best['avg_wbits']:.2f} bits)")
    for model in ("mini-sd", "mini-sd3"):
        rtn = by.get((model, "rtn-w4a8"))
        for r in (r for r in rows if r["model"] == model and "-w4a4" in r["label"]):
            if rtn:
                ok = r["psnr"] > rtn["psnr"] and r["fd_fp"] < rtn["fd_fp"]
                out.append(f"{model} {r['label']} beats rtn-w4a8 on PSNR and FD: {'holds' if ok else 'does not hold'} "
                           f"({r['psnr']:.2f} vs {rtn['psnr']:.2f} dB, FD {r['fd_fp']:.2f} vs {rtn['fd_fp']:.2f}; "
                           f"{r['avg_wbits']:.2f} vs {rtn['avg_wbits']:.2f} avg weight bits)")
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | row | PSNR to FP (dB) | SSIM | FD to FP | avg weight bits | avg act. bits | calibration (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['label']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fd_fp']:.2f} | "
                     f"{r['avg_wbits']:.2f} | {r['avg_abits']:.2f} | {r['calibration_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    data = collect(args.runs)
    data["targets"] = targets(data["rows"])
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data["rows"]))
    print("\n".join(f"- {t}" for t in data["targets"]))


if __name__ == "__main__":
    main()
