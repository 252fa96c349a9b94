"""Issue 22, item 4: diffquant's methods under each activation granularity and coverage beside the peers, from
`diffquant bench` runs.

Run `diffquant bench` per model (same prompts, seeds and initial noise for every row of a model; the FP images are
shared through --cache-dir), e.g.

    diffquant bench --model mini-sd --methods rtn --bits w8a8,w4a8 \\
        --act-granularity per_tensor,per_channel_smooth,per_token,per_group \\
        --peers torchao-w8a8,quanto-w8a8,torchao-w4,quanto-w4 --prompts zoo:heldout:64 \\
        --calib-prompts zoo:calibration:32 --metrics psnr,fd_fp --batch-size 32 \\
        --cache-dir runs/gran-cache --out runs/granularity-mini-sd-full
    diffquant bench --model mini-sd --methods rtn --bits w8a8 --act-granularity per_tensor,per_token,per_group \\
        --layers linear --peers none ... --out runs/granularity-mini-sd-linear

then collect them into one table (JSON + markdown) and check the issue's targets:

    python benchmarks/granularity.py runs/granularity-* --json benchmarks/results/granularity.json \\
        --markdown runs/granularity.md

Every row carries the coverage and average bits ``diffquant bench`` computes for it (``evaluation.coverage``, the
same function for diffquant and peer rows), its prompt count and its run's folder. Targets: the best full-coverage
W8A8 row reaches ``TARGETS_DB``; at a peer's coverage and bits (``PEER_COVERAGE``) diffquant's best row beats the peer
on PSNR and on FD to FP. The ``probes`` of an existing ``--json`` (``granularity_probe.py``) are kept.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GRANULARITIES = ("per_tensor", "per_channel_smooth", "per_token", "per_group")
TARGETS_DB = {"mini-sd": 50.0, "mini-sd3": 45.0}  # W8A8, best granularity, full coverage, PSNR to FP
# A peer's coverage and bits in diffquant's --layers terms: torchao quantizes Linear layers only; quanto every Linear
# and Conv2d (attention matmuls float; diffquant's "all" adds them); quanto W4 is weight-only, met by diffquant's
# weight-only rows (`--bits w4`, label w4af). SDNQ quantizes the large Linear layers' weights only (coverage "sdnq":
# diffquant rows run with `--layers` set to the names SDNQ replaced; their labels carry a digest of that list, named
# with --coverage-name DIGEST=sdnq). bitsandbytes quantizes every Linear's weights: NF4 weight-only, and LLM.int8
# weight-only too on the CPU (its images equal diffquant's RTN W8 weight-only Linear rows to the last digit on both
# mini models, 2026-12-02: its int8 activation path does not run here).
PEER_COVERAGE = {"torchao-w8a8": ("linear", "w8a8"), "quanto-w8a8": ("linear+conv", "w8a8"), "quanto-w4": ("all", "w4af"),
                 "bnb-int8": ("linear", "w8af"), "bnb-nf4": ("linear", "w4af"), "sdnq-int8": ("sdnq", "w8af"),
                 "sdnq-uint4": ("sdnq", "w4af")}
# A diffquant row at a coverage that includes the peer's counts too: quantizing more is a harder setting, not an easier one.
COVERS = {"sdnq": ("sdnq", "linear", "linear+conv", "all"), "linear": ("linear", "linear+conv", "all"),
          "linear+conv": ("linear+conv", "all"), "all": ("all",)}
TIE_DB = 0.05  # PSNR differences below this are read as a tie, not a win (no paired interval here)
ROW_KEYS = ("psnr", "fd_fp", "calibration_s", "weight_coverage", "mac_coverage", "avg_wbits", "avg_abits", "denoiser_mib")
LABEL = re.compile(r"^(?P<method>[a-z0-9_]+)-(?P<bits>w\d+a(?:\d+|f))(?:-(?P<gran>" + "|".join(GRANULARITIES[1:])
                   + r"))?(?:-conv_(?P<conv>" + "|".join(GRANULARITIES) + r"))?(?:-r(?P<rank>\d+))?(?:-(?P<layers>[^\[]+))?"
                   r"(?:\[(?P<options>[^\]]*)\])?$")


def parse_label(label: str, spec: str) -> dict:
    """What a bench row is: a diffquant row's method, bits, granularity and coverage, or a peer."""
    match = LABEL.match(label)
    if not spec.startswith("diffquant") or match is None:
        layers, bits = PEER_COVERAGE.get(label, (None, label.split("-")[-1]))
        return {"kind": "peer", "method": label, "bits": bits, "granularity": None, "layers": layers}
    weight_only = match["bits"].endswith("af")  # no activation quantizer: no granularity
    granularity = None if weight_only else match["gran"] or "per_tensor"
    if granularity is not None and match["conv"]:  # --conv-act-granularity: the convolutions' own
        granularity += f" (conv {match['conv']})"
    return {"kind": "diffquant", "method": match["method"], "bits": match["bits"], "granularity": granularity,
            "layers": match["layers"] or "all", "options": match["options"] or ""}


def collect(folders: list[Path], names: dict[str, str] | None = None) -> dict:
    """Every row of every run: ``{"rows": [{model, label, kind, method, bits, granularity, layers, metrics...}], "runs"}``."""
    rows: dict[tuple[str, str], dict] = {}  # (model, label) -> row: a later run's row replaces an earlier one
    runs = []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        settings = results["settings"]
        model = results["reference"]["spec"]  # the FP model as given to --model (a zoo name or a folder)
        runs.append({"folder": str(folder), "model": model, "settings": settings, "created": results["created"]})
        for row in results["models"]:
            summary = row.get("summary", {})
            kind = parse_label(row["label"], row.get("spec", "diffquant"))
            kind["layers"] = (names or {}).get(kind["layers"], kind["layers"])
            entry = {"model": model, "label": row["label"], **kind,
                     **{k: summary.get(k) for k in ROW_KEYS}, "prompts": settings.get("n_images"), "run": str(folder)}
            rows.pop((model, row["label"]), None)
            rows[model, row["label"]] = entry
    return {"rows": list(rows.values()), "runs": runs}


def _best(rows: list[dict], bits: str, layers: tuple[str, ...]) -> dict | None:
    pool = [r for r in rows if r["kind"] == "diffquant" and r["psnr"] is not None and r["bits"] == bits and r["layers"] in layers]
    return max(pool, key=lambda r: r["psnr"]) if pool else None


def targets(rows: list[dict]) -> dict:
    """The issue's targets per model: full-coverage W8A8 PSNR, and diffquant's best row against each peer at its coverage and bits."""
    out: dict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        best = _best(mine, "w8a8", ("all",))
        entry: dict = {}
        if best is not None and model in TARGETS_DB:
            entry["full_w8a8"] = {"target_db": TARGETS_DB[model], "best": best["label"], "psnr": best["psnr"],
                                  "prompts": best["prompts"], "met": best["psnr"] >= TARGETS_DB[model]}
        for peer in (r for r in mine if r["kind"] == "peer" and r["layers"] is not None and r["psnr"] is not None):
            ours = _best(mine, peer["bits"], COVERS[peer["layers"]])
            if ours is None:
                continue
            entry[f"vs_{peer['label']}"] = {
                "coverage": peer["layers"], "bits": peer["bits"], "diffquant": ours["label"],
                "diffquant_coverage": ours["layers"], "psnr": ours["psnr"], "fd_fp": ours["fd_fp"],
                "peer_psnr": peer["psnr"], "peer_fd_fp": peer["fd_fp"],
                "tie": abs(ours["psnr"] - peer["psnr"]) < TIE_DB,
                "met": ours["psnr"] > peer["psnr"] + TIE_DB and None not in (ours["fd_fp"], peer["fd_fp"])
                and ours["fd_fp"] < peer["fd_fp"]}
        out[model] = entry
    return out


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _order(row: dict) -> tuple:
    gran = GRANULARITIES.index(row["granularity"]) if row["granularity"] in GRANULARITIES else len(GRANULARITIES)
    weights = re.match(r"w(\d+)", row["bits"])
    wbits = int(weights[1]) if weights else 0
    return (row["model"], row["kind"] != "diffquant", -wbits, row["bits"].endswith("af"), row["layers"] != "all", row["method"], gran,
            row["label"])


def markdown(data: dict) -> str:
    lines = ["| model | row | coverage | activation granularity | prompts | PSNR to FP (dB) | FD to FP | weights quantized "
             "| MACs quantized | avg weight bits | avg act. bits | denoiser MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(data["rows"], key=_order):
        coverage = row["layers"] or "own"
        cells = [coverage, row["granularity"] or ("(peer's own)" if row["kind"] == "peer" else "– (weight-only)"), _cell(row.get("prompts"), "{}"), _cell(row["psnr"], "{:.2f}"),
                 _cell(row["fd_fp"], "{:.3f}"), _cell(row.get("weight_coverage"), "{:.1%}"),
                 _cell(row.get("mac_coverage"), "{:.1%}"), _cell(row.get("avg_wbits"), "{:.2f}"),
                 _cell(row.get("avg_abits"), "{:.2f}"), _cell(row.get("denoiser_mib"), "{:.2f}")]
        lines.append(f"| {row['model']} | {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    for model, entry in data["targets"].items():
        for key, t in entry.items():
            verdict = "met" if t["met"] else "tie (within 0.05 dB): not met" if t.get("tie") else "not met"
            if key == "full_w8a8":
                lines.append(f"- {model}: best full-coverage W8A8 row {t['best']} at {t['psnr']:.2f} dB ({t['prompts']} prompts); "
                             f"target >= {t['target_db']:.0f} dB {verdict}.")
            else:
                lines.append(f"- {model}, at {key[3:]}'s coverage ({t['coverage']}, {t['bits']}) or more: {t['diffquant']} {t['psnr']:.2f} dB / FD "
                             f"{_cell(t['fd_fp'], '{:.3f}')} vs {t['peer_psnr']:.2f} / {_cell(t['peer_fd_fp'], '{:.3f}')}: "
                             f"beats the peer on both: {verdict}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`diffquant bench --out` folders")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/granularity.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table here.")
    parser.add_argument("--coverage-name", action="append", default=[], metavar="LAYERS_DIGEST=NAME",
                        help="name a coverage given as a layer list (label part layersXXXXXX), e.g. layers1a2b3c=sdnq")
    args = parser.parse_args()
    names = dict(pair.split("=", 1) for pair in args.coverage_name)
    data = collect([f for f in args.runs if (f / "results.json").is_file()], names)
    if args.json.is_file():  # granularity_probe.py results survive
        data["probes"] = json.loads(args.json.read_text()).get("probes", {})
    data["targets"] = targets(data["rows"])
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    if args.markdown is not None:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
