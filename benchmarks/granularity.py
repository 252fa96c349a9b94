"""Issue 22, item 4: RTN under each activation granularity on the mini zoo, from `diffquant bench` runs.

Run `diffquant bench` per model and bit width (same prompts, seeds and initial noise for every row; one folder
may hold several granularities, or one each), e.g.

    diffquant bench --model mini-sd --methods rtn --bits w8a8 \\
        --act-granularity per_tensor,per_channel_smooth,per_token,per_group --peers none \\
        --prompts zoo:heldout:64 --calib-prompts zoo:calibration:8 --metrics psnr,fd_fp --batch-size 32 \\
        --cache-dir runs/gran-cache --out runs/granularity-mini-sd-w8a8

then collect them into one table (JSON + markdown) and check the issue's targets:

    python benchmarks/granularity.py runs/granularity-* --json benchmarks/results/granularity.json \\
        --markdown runs/granularity.md

Every row carries its coverage and average bits (``evaluation.coverage``: the bench computes them for every row)
and its prompt count. Rows of an existing ``--json`` that the new runs do not measure again are kept (with the
prompt count they were measured on), as are its ``probes``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GRANULARITIES = ("per_tensor", "per_channel_smooth", "per_token", "per_group")
TARGETS_DB = {"mini-sd": 50.0, "mini-sd3": 45.0}  # W8A8, best granularity, PSNR to FP


def granularity_of(label: str) -> str:
    return next((g for g in GRANULARITIES[1:] if label.endswith(f"-{g}")), "per_tensor")


ROW_KEYS = ("psnr", "fd_fp", "calibration_s", "weight_coverage", "mac_coverage", "avg_wbits", "avg_abits", "denoiser_mib")


def collect(folders: list[Path]) -> dict:
    """``{model: {bits: {granularity: {psnr, fd_fp, coverage and bits, prompts}}}}`` plus each run's settings."""
    table: dict = {}
    runs = []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        settings = results["settings"]
        model = settings.get("model") or folder.name.split("granularity-")[-1].split("-w")[0]
        runs.append({"folder": str(folder), "model": model, "settings": settings, "created": results["created"]})
        for row in results["models"]:
            label = row["label"]
            bits = label.split("-")[1]
            summary = row.get("summary", {})
            entry = {k: summary.get(k) for k in ROW_KEYS}
            entry["prompts"] = settings.get("n_images")
            # config version 2: the softmax output follows a dynamic granularity (rows measured before stay "static")
            entry["softmax"] = "per row" if granularity_of(label) in GRANULARITIES[2:] else "static"
            table.setdefault(model, {}).setdefault(bits, {})[granularity_of(label)] = entry
    return {"table": table, "runs": runs}


def merge_earlier(data: dict, earlier: dict) -> None:
    """Keep ``earlier``'s rows (and runs) that ``data`` does not measure again."""
    for model, by_bits in earlier.get("table", {}).items():
        for bits, rows in by_bits.items():
            for g, row in rows.items():
                mine = data["table"].setdefault(model, {}).setdefault(bits, {})
                if g not in mine:
                    mine[g] = {"prompts": _earlier_prompts(earlier, model), "softmax": "static", **row}
    seen = {r["folder"] for r in data["runs"]}
    data["runs"] += [r for r in earlier.get("runs", []) if r["folder"] not in seen and _still_used(data, r)]


def _earlier_prompts(earlier: dict, model: str) -> int | None:
    return next((r["settings"].get("n_images") for r in earlier.get("runs", []) if r["model"] == model), None)


def _still_used(data: dict, run: dict) -> bool:
    n = run["settings"].get("n_images")
    return any(row.get("prompts") == n for rows in data["table"].get(run["model"], {}).values() for row in rows.values())


def targets(table: dict) -> dict:
    """Whether the best W8A8 granularity reaches the issue's PSNR target on each model."""
    out = {}
    for model, target in TARGETS_DB.items():
        rows = table.get(model, {}).get("w8a8", {})
        if not rows:
            continue
        best = max(rows, key=lambda g: rows[g]["psnr"] or float("-inf"))
        out[model] = {"target_db": target, "best": best, "psnr": rows[best]["psnr"], "prompts": rows[best].get("prompts"),
                      "met": rows[best]["psnr"] >= target}
    return out


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(data: dict) -> str:
    lines = ["| model | bits | activation granularity | softmax | prompts | PSNR to FP (dB) | FD to FP | weights quantized | MACs quantized "
             "| avg weight bits | avg act. bits | denoiser MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, by_bits in data["table"].items():
        for bits in ("w8a8", "w4a8"):
            for g in GRANULARITIES:
                row = by_bits.get(bits, {}).get(g)
                if row is None:
                    continue
                cells = [row.get("softmax", "static"), _cell(row.get("prompts"), "{}"), _cell(row["psnr"], "{:.2f}"), _cell(row["fd_fp"], "{:.2f}"),
                         _cell(row.get("weight_coverage"), "{:.1%}"), _cell(row.get("mac_coverage"), "{:.1%}"),
                         _cell(row.get("avg_wbits"), "{:.2f}"), _cell(row.get("avg_abits"), "{:.2f}"),
                         _cell(row.get("denoiser_mib"), "{:.2f}")]
                lines.append(f"| {model} | {bits.upper()} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
    for model, t in data["targets"].items():
        verdict = "met" if t["met"] else "not met"
        lines.append(f"- {model}: best W8A8 granularity {t['best']} at {t['psnr']:.2f} dB ({t['prompts']} prompts); "
                     f"target >= {t['target_db']:.0f} dB {verdict}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`diffquant bench --out` folders (one per model and bit width)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/granularity.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table here.")
    args = parser.parse_args()
    data = collect([f for f in args.runs if (f / "results.json").is_file()])
    if args.json.is_file():  # earlier rows not measured again, and granularity_probe.py results, survive
        earlier = json.loads(args.json.read_text())
        merge_earlier(data, earlier)
        data["probes"] = earlier.get("probes", {})
    data["targets"] = targets(data["table"])
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    if args.markdown is not None:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
