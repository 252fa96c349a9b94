"""Did a rerun of the methods table reproduce the recorded rows? Paired per-image comparison of two methods.json files.

    git show <old commit>:benchmarks/results/methods.json > /tmp/old.json
    .venv/bin/python benchmarks/rerun_check.py --old /tmp/old.json --new benchmarks/results/methods.json \\
        --rows qdiffusion,pcr,emf --out benchmarks/results/methods-rerun-check.json --markdown docs/results-rerun.md

For every row of the chosen variants present in both files (same model, same label, same prompts): the mean of
new - old per-image PSNR and SSIM with its normal 95 % interval (``methodbench.claims.paired_interval``), the
share of images whose PSNR is unchanged to 1e-3 dB, the attribute accuracy of both, and FD to FP of both (the
old run's features are not kept, so FD is compared by value only). A row "matches" when each paired interval
contains zero or the whole interval lies within ``--tolerance`` (dB for PSNR, x1/100 for SSIM) of it. Text from the
page's "## What moved" heading on is written by hand and kept when the page is rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methodbench.claims import paired_interval  # noqa: E402
from methodbench.report import analysis  # noqa: E402

NOTES_HEADING = "## What moved"  # the hand-written findings below the tables, kept when the page is rewritten


def compare_row(old: dict, new: dict, tolerance: float) -> dict:
    """The paired comparison of one row's two runs on the same prompts."""
    out: dict = {"label": new["label"], "old_key": old.get("key"), "new_key": new.get("key")}
    verdict = True
    for metric, scale in (("psnr", 1.0), ("ssim", 100.0)):
        a, b = new["per_image"][metric], old["per_image"][metric]
        n = min(len(a), len(b))
        mean, lo, hi = paired_interval(a[:n], b[:n])
        ok = lo <= 0 <= hi or max(abs(lo), abs(hi)) * scale <= tolerance
        verdict &= ok
        out[metric] = {"old": sum(b[:n]) / n, "new": sum(a[:n]) / n, "diff": mean, "ci": [lo, hi], "matches": ok}
    same = sum(abs(x - y) < 1e-3 for x, y in zip(new["per_image"]["psnr"], old["per_image"]["psnr"], strict=False))
    out["unchanged_images"] = same / min(len(new["per_image"]["psnr"]), len(old["per_image"]["psnr"]))
    for key in ("fd_fp", "attr_all"):
        out[key] = {"old": old["summary"].get(key), "new": new["summary"].get(key)}
    out["matches"] = verdict
    return out


def compare(old: dict, new: dict, variants: list[str], tolerance: float) -> dict[str, list[dict]]:
    result: dict[str, list[dict]] = {}
    for model, entry in new["models"].items():
        before = {r["label"]: r for r in old["models"].get(model, {}).get("rows", []) if "per_image" in r}
        rows = [compare_row(before[r["label"]], r, tolerance) for r in entry["rows"]
                if r["variant"] in variants and r["label"] in before and "per_image" in r]
        if rows:
            result[model] = rows
    return result


def num(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(result: dict[str, list[dict]], command: str, tolerance: float) -> str:
    lines = ["# Methods table rerun against the recorded rows", "", f"Reproduce: `{command}`.", "",
             "Paired per-image differences new − old on the same held-out prompts (seed = index), normal 95 % intervals. "
             f"A row matches when each interval contains 0 or lies within {tolerance} dB (PSNR) / {tolerance / 100} (SSIM) of it.", ""]
    for model, rows in result.items():
        lines += [f"## {model}", "", "| row | PSNR old → new | ΔPSNR [95 % CI] | SSIM old → new | ΔSSIM [95 % CI] | "
                  "images unchanged | FD to FP old → new | attr. old → new | matches |", "|---" * 9 + "|"]
        for r in rows:
            p, s, fd, at = r["psnr"], r["ssim"], r["fd_fp"], r["attr_all"]
            lines.append(f"| {r['label']} | {p['old']:.2f} → {p['new']:.2f} | {p['diff']:+.2f} [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] | "
                         f"{s['old']:.4f} → {s['new']:.4f} | {s['diff']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] | "
                         f"{r['unchanged_images']:.0%} | {num(fd['old'], '{:.2f}')} → {num(fd['new'], '{:.2f}')} | "
                         f"{num(at['old'], '{:.3f}')} → {num(at['new'], '{:.3f}')} | {'yes' if r['matches'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="methods.json of the recorded run")
    p.add_argument("--new", required=True, help="methods.json after the rerun")
    p.add_argument("--rows", default="qdiffusion,pcr,emf", help="variants to compare")
    p.add_argument("--tolerance", type=float, default=0.1, help="dB of PSNR (and x1/100 of SSIM) counted as the same")
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    p.add_argument("--markdown", default=None, help="write the comparison page here")
    args = p.parse_args()
    result = compare(json.loads(Path(args.old).read_text()), json.loads(Path(args.new).read_text()),
                     [v for v in args.rows.split(",") if v], args.tolerance)
    page = markdown(result, "python benchmarks/rerun_check.py " + " ".join(sys.argv[1:]), args.tolerance)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        notes = analysis(Path(args.markdown), NOTES_HEADING)
        Path(args.markdown).write_text(page + "\n" + ("\n" + notes if notes else ""))
    print(page)


if __name__ == "__main__":
    main()
