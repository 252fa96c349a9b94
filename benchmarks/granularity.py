"""Issue 22, item 4: RTN under each activation granularity on the mini zoo, from `diffquant bench` runs.

Run one `diffquant bench` per model and bit width (same prompts, seeds and initial noise for every row), e.g.

    diffquant bench --model mini-sd --methods rtn --bits w8a8 \\
        --act-granularity per_tensor,per_channel_smooth,per_token,per_group --peers none \\
        --prompts zoo:heldout:16 --calib-prompts zoo:calibration:8 --metrics psnr,fd_fp --batch-size 32 \\
        --cache-dir runs/gran-cache --out runs/granularity-mini-sd-w8a8

then collect them into one table (JSON + markdown) and check the issue's targets:

    python benchmarks/granularity.py runs/granularity-* --json benchmarks/results/granularity.json \\
        --markdown runs/granularity.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GRANULARITIES = ("per_tensor", "per_channel_smooth", "per_token", "per_group")
TARGETS_DB = {"mini-sd": 50.0, "mini-sd3": 45.0}  # W8A8, best granularity, PSNR to FP


def granularity_of(label: str) -> str:
    return next((g for g in GRANULARITIES[1:] if label.endswith(f"-{g}")), "per_tensor")


def collect(folders: list[Path]) -> dict:
    """``{model: {bits: {granularity: {psnr, fd_fp, calibration_s}}}}`` plus each run's settings."""
    table: dict = {}
    runs = []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        settings = results["settings"]
        model = settings.get("model") or folder.name.split("granularity-")[-1].rsplit("-", 1)[0]
        runs.append({"folder": str(folder), "model": model, "settings": settings, "created": results["created"]})
        for row in results["models"]:
            label = row["label"]
            bits = label.split("-")[1]
            summary = row.get("summary", {})
            table.setdefault(model, {}).setdefault(bits, {})[granularity_of(label)] = {
                "psnr": summary.get("psnr"), "fd_fp": summary.get("fd_fp"), "calibration_s": summary.get("calibration_s"),
            }
    return {"table": table, "runs": runs}


def targets(table: dict) -> dict:
    """Whether the best W8A8 granularity reaches the issue's PSNR target on each model."""
    out = {}
    for model, target in TARGETS_DB.items():
        rows = table.get(model, {}).get("w8a8", {})
        if not rows:
            continue
        best = max(rows, key=lambda g: rows[g]["psnr"] or float("-inf"))
        out[model] = {"target_db": target, "best": best, "psnr": rows[best]["psnr"], "met": rows[best]["psnr"] >= target}
    return out


def markdown(data: dict) -> str:
    lines = ["| model | activation granularity | W8A8 PSNR to FP (dB) | W8A8 FD to FP | W4A8 PSNR to FP (dB) | W4A8 FD to FP |",
             "|---|---|---|---|---|---|"]
    for model, by_bits in data["table"].items():
        for g in GRANULARITIES:
            cells = []
            for bits in ("w8a8", "w4a8"):
                row = by_bits.get(bits, {}).get(g)
                cells += ["–", "–"] if row is None else [f"{row['psnr']:.2f}", f"{row['fd_fp']:.2f}"]
            lines.append(f"| {model} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
    for model, t in data["targets"].items():
        verdict = "met" if t["met"] else "not met"
        lines.append(f"- {model}: best W8A8 granularity {t['best']} at {t['psnr']:.2f} dB; target >= {t['target_db']:.0f} dB {verdict}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`diffquant bench --out` folders (one per model and bit width)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/granularity.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table here.")
    args = parser.parse_args()
    data = collect([f for f in args.runs if (f / "results.json").is_file()])
    data["targets"] = targets(data["table"])
    if args.json.is_file():  # benchmarks/granularity_probe.py results, added by hand, survive a re-collection
        data["probes"] = json.loads(args.json.read_text()).get("probes", {})
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    if args.markdown is not None:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
