"""RTN, Q-Diffusion, PCR and EMF on the same pairs: one table per model and the three papers' claims checked (issues 5-7).

For each model the FP pipeline renders ``--prompts`` held-out prompts (``zoo.heldout_prompts``, prompt i
with seed i, same initial noise for every row); then every (method, bits) row quantizes a copy of the FP
pipeline on the same calibration prompts and sampling settings and renders the same pairs. Metrics come
from the shared harness (``diffquant.evaluation``): PSNR/SSIM to the FP images, Fréchet distance to FP in
the mini-zoo evaluator's features, attribute accuracy, the per-timestep denoiser error along the FP
trajectory and the per-layer sensitivity. Each row also carries the quantization wall time and peak RSS
above its starting level. The verdict lines for each paper's claims are computed from the rows, with
paired 95 % intervals (per-image differences for PSNR/SSIM, a paired bootstrap over images for the
Fréchet distance) so "clearly closer" means the interval excludes zero.

    .venv/bin/python benchmarks/methods.py --models mini-sd3                  # the issues' setting, one model
    .venv/bin/python benchmarks/methods.py --models tiny-sd3 --prompts 8 --calib-prompts 2 \\
        --qdiffusion-options '{"iterations": 4, "act_iterations": 2}' --emf-options '{"iterations": 4}'   # smoke

Rows: rtn, qdiffusion, pcr at every ``--bits``; emf at ``--emf-bits`` (W4A8); ``--emf-ablation`` adds
``emf-serial`` (EMF with serial instead of parallel batches, same data and budget: seed 000's ablation)
and plots both training curves. ``--methods`` also takes the PCR ablations ``rtn-per-step`` and
``pcr-no-relax``; ``--calib-eval N`` additionally scores every row on N calibration prompts (PCR's
prompt-generalization protocol).

Persistence: ``benchmarks/results/methods.json`` and ``docs/results-methods.md`` are rewritten after every
row (other models already in the JSON are kept, and so are a model's rows this run does not reach: other
methods or bit widths, when the FP weights and settings match), so a killed run loses only the row in
progress; rerunning the same command reuses finished rows whose settings match (``--fresh`` to redo them,
``--redo VARIANTS`` for some), the FP and quantized
images cached under ``--cache-dir`` (keyed by model fingerprint), and Q-Diffusion's per-block / EMF's
checkpoints under ``--work-dir``. Text under the page's "## Analysis" heading is kept when it is rewritten;
``--render-only`` rewrites the page from the JSON alone. The parts live in ``benchmarks/methodbench/``.

``--peer-table`` adds the peers (torchao, quanto, SDNQ, bitsandbytes, NNCF) beside diffquant's rows on the first
``--peer-prompts`` of the same prompts, with every row's coverage, bits and file size (``methodbench/peers.py``):

    .venv/bin/python benchmarks/methods.py --models mini-sd,mini-sd3 --peer-table --peer-prompts 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from methodbench import claims
from methodbench.peers import PEERS, run_peer_table
from methodbench.runner import BUDGET_OPTIONS, VARIANTS, run_model, tune_allocator
from methodbench.store import Store

ROOT = Path(__file__).resolve().parents[1]


def parse_json(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{what} must be a JSON object, e.g. '{{\"iterations\": 100}}': {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{what} must be a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mini-sd,mini-sd3", help="mini-zoo names, or tiny-sd / tiny-sd3 (random weights) for smoke runs")
    p.add_argument("--model-path", action="append", default=[], metavar="NAME=FOLDER",
                   help="load NAME from this diffusers folder (NAME's zoo sampling settings); repeatable")
    p.add_argument("--bits", default="w4a8,w8a8", help="bit widths, W4A8 first: the three issues' main claims are there")
    p.add_argument("--methods", default="rtn,qdiffusion,pcr,emf", help=f"rows per bit width, from: {', '.join(VARIANTS)}")
    p.add_argument("--emf-bits", default="w4a8", help="bit widths that get EMF rows and its rtn-float-time control ('all': every --bits)")
    p.add_argument("--emf-ablation", action="store_true", help="add the emf-serial row (seed 000's serial-vs-parallel ablation)")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts, one image each, seed = prompt index")
    p.add_argument("--calib-prompts", type=int, default=8, help="calibration prompts (zoo calibration split), the same for every method")
    p.add_argument("--calib-draw", type=int, default=0, help="which disjoint calibration set (0, 1, ...): repeat a table over draws "
                   "to see how much of it the calibration draw decides (unconditional: seeds 1000000+100000*K..)")
    p.add_argument("--calib-eval", type=int, default=0, help="also score every row on this many calibration prompts (0: off)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for generation and calibration (default: the model's)")
    p.add_argument("--qdiffusion-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['qdiffusion'])}")
    p.add_argument("--pcr-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['pcr'])}")
    p.add_argument("--emf-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['emf'])}")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    p.add_argument("--calib-batch-size", type=int, default=8, help="prompts per calibration sampling batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-timestep error and per-layer sensitivity")
    p.add_argument("--fresh", action="store_true", help="redo rows already finished in --json")
    p.add_argument("--redo", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="variants to redo although finished (a library change their settings do not show); other rows are kept")
    p.add_argument("--diagnose", action="store_true",
                   help="for finished rows without the error-dynamics diagnostics (trajectory drift), quantize again and add them")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "methods-cache"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "methods-work"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "results-methods.md"))
    p.add_argument("--peer-table", action="store_true",
                   help="instead of the methods rows: the peers and diffquant RTN on --peer-prompts prompts (methodbench/peers.py)")
    p.add_argument("--peers", default=PEERS, help="peers of --peer-table (diffquant.evaluation.peers.PEERS)")
    p.add_argument("--peer-prompts", type=int, default=64, help="held-out prompts of --peer-table (the first of the methods table's)")
    p.add_argument("--render-only", action="store_true", help="re-check the claims (FD intervals from --work-dir features where kept) and rewrite --json and --markdown; no model runs")
    args = p.parse_args(argv)
    args.model_paths = dict(spec.split("=", 1) for spec in args.model_path)
    return args


def render_only(store: Store, work_dir: Path) -> None:
    """Re-check every model's claims from its stored rows (FD intervals where ``work_dir`` still holds the row
    features; without them a model keeps its stored claims) and rewrite the page: a claim's code fixed, no rerun."""
    for name, result in store.data["models"].items():
        features = work_dir / name / "features"
        if features.is_dir():
            result["claims"] = claims.check_claims(result, features, name)
            store.model(name, result)
    store.save()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.line = " ".join(sys.argv[1:] if argv is None else argv)
    store = Store(Path(args.json), Path(args.markdown))
    if args.render_only:
        render_only(store, Path(args.work_dir))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tune_allocator()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    method_options = {}
    for method in ("qdiffusion", "pcr", "emf"):
        given = getattr(args, f"{method}_options")
        method_options[method] = parse_json(given, f"--{method}-options") if given is not None else dict(BUDGET_OPTIONS[method])
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if args.peer_table:
            run_peer_table(name, args, store)
        else:
            run_model(name, args, store, method_options)
    print(Path(args.markdown).read_text())


if __name__ == "__main__":
    main()