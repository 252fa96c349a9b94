"""benchmarks/methodbench: the stored results render to the committed page; finished rows are kept and reused."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from methodbench import claims, report  # noqa: E402
from methodbench.store import Store, put_row  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "methods.json"
PAGE = ROOT / "docs" / "results-methods.md"


def test_stored_results_render_to_the_committed_page():
    data = json.loads(RESULTS.read_text())
    assert report.markdown(data, report.analysis(PAGE)) == PAGE.read_text()


def _entry(fingerprint: str, started: str) -> dict:
    """A new run's entry for mini-sd3 (as ``runner.run_model`` builds it: no rows yet) with these FP weights."""
    stored = json.loads(RESULTS.read_text())["models"]["mini-sd3"]
    done = ("rows", "sessions", "claims", "figures", "finished", "wall_s", "load_end")
    return {**{k: v for k, v in stored.items() if k not in done}, "bits": ["w8a8"], "started": started, "sessions": [],
            "reference": {"fingerprint": fingerprint, "summary": {}, "generation": {"generated": 0, "cached": 1}}}


def test_store_keeps_rows_of_the_same_table_and_drops_them_when_the_fp_model_changes(tmp_path):
    json_path, md_path = tmp_path / "m.json", tmp_path / "page.md"
    data = json.loads(RESULTS.read_text())
    data["models"] = {"mini-sd3": data["models"]["mini-sd3"]}
    json_path.write_text(json.dumps(data))
    md_path.write_text("# old\n\n## Analysis\n\nkept by hand\n")
    stored = data["models"]["mini-sd3"]
    fp = stored["reference"]["fingerprint"]

    store = Store(json_path, md_path)
    result = _entry(fp, "2030-01-01 00:00 UTC")
    session, previous = store.begin_model("mini-sd3", result, fresh=False)
    assert set(previous) == {r["key"] for r in stored["rows"]}  # every finished row can be reused by its key
    assert [r["label"] for r in result["rows"]] == [r["label"] for r in stored["rows"]]  # rows not rerun stay
    assert result["bits"][0] == "w8a8" and set(result["bits"]) == {"w8a8", *stored["bits"]}
    assert result["sessions"][-1] is session and len(result["sessions"]) == len(stored["sessions"]) + 1
    assert md_path.read_text().endswith("## Analysis\n\nkept by hand\n")
    assert json.loads(json_path.read_text())["models"]["mini-sd3"]["rows"] == result["rows"]

    other = Store(json_path, md_path)
    changed = _entry("another-fp-model", "2030-01-02 00:00 UTC")
    other.begin_model("mini-sd3", changed, fresh=False)
    assert changed["rows"] == [] and len(changed["sessions"]) == 1  # new weights: a new table


def test_put_row_replaces_by_label_and_orders_by_bits_then_variant():
    result = {"bits": ["w4a8", "w8a8"], "rows": []}
    variants = ["rtn", "qdiffusion", "pcr"]
    for label, variant, bits in (("pcr-w8a8", "pcr", "w8a8"), ("rtn-w8a8", "rtn", "w8a8"), ("qdiffusion-w4a8", "qdiffusion", "w4a8")):
        put_row(result, {"label": label, "variant": variant, "bits": bits, "v": 1}, variants)
    put_row(result, {"label": "rtn-w8a8", "variant": "rtn", "bits": "w8a8", "v": 2}, variants)
    assert [(r["label"], r["v"]) for r in result["rows"]] == [("qdiffusion-w4a8", 1), ("rtn-w8a8", 2), ("pcr-w8a8", 1)]


def test_claims_need_an_interval_that_excludes_zero():
    mean, lo, hi = claims.paired_interval([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)  # a constant difference: no spread
    data = json.loads(RESULTS.read_text())
    result = copy.deepcopy(data["models"]["mini-sd3"])
    rows = {r["label"]: r for r in result["rows"]}
    qd, rtn = rows["qdiffusion-w4a8"], rows["rtn-w4a8"]
    rtn["per_image"]["psnr"] = [v - 0.01 for v in qd["per_image"]["psnr"]]  # QD better by a hair on every image
    rtn["summary"]["psnr"] = qd["summary"]["psnr"] - 0.01
    c = claims.Comparator(result, None).compare("qdiffusion-w4a8", "rtn-w4a8", "psnr", 1)
    assert c["better"] and c["clearly"] and c["interval_a_minus_b"][0] == pytest.approx(0.01)
    rtn["per_image"]["psnr"] = [v + (0.5 if i % 2 else -0.5) for i, v in enumerate(qd["per_image"]["psnr"])]
    c = claims.Comparator(result, None).compare("qdiffusion-w4a8", "rtn-w4a8", "psnr", 1)
    assert c["better"] and not c["clearly"]  # closer on average, but the interval straddles zero


def test_a_stored_row_joins_the_peer_table_with_fd_from_its_saved_features_and_its_coverage(tmp_path):
    import torch
    from methodbench.peers import subset_row

    from diffquant.evaluation.metrics import frechet_distance

    torch.manual_seed(0)
    fp, own = torch.randn(6, 3), torch.randn(6, 3) + 0.5
    torch.save(fp, tmp_path / "FP.pt")
    torch.save(own, tmp_path / "k1.pt")
    row = {"label": "pcr-w8a8", "key": "k1", "quantize_s": 12.0,
           "per_image": {"psnr": [40.0, 42.0, 44.0, 46.0, 48.0, 50.0], "ssim": [0.9] * 6, "attr_all": [1, 0, 1, 1, 1, 1]},
           "summary": {"psnr": 45.0, "weight_coverage": 0.99, "avg_wbits": 8.1}}
    s = subset_row(row, 4, tmp_path)["summary"]
    assert s["psnr"] == 43.0 and s["attr_all"] == 0.75 and s["weight_coverage"] == 0.99 and s["avg_wbits"] == 8.1
    assert s["fd_fp"] == pytest.approx(frechet_distance(own[:4], fp[:4]))  # the first 4 prompts only
    assert s["fd_fp"] != pytest.approx(frechet_distance(own, fp))
    assert "fd_fp" not in subset_row(row, 4, tmp_path / "missing")["summary"]  # rows saved before features: no FD
    assert subset_row(row, 7, tmp_path) is None  # fewer images than the table


def test_unconditional_fd_change_claim_and_its_column(tmp_path):
    """At W4A8, Q-Diffusion's FD to real scenes stays near FP's while RTN's grows: the claim holds with a paired
    interval; with the two rows swapped it does not; the table gains an "FD to real" column only when measured."""
    import torch

    g = torch.Generator().manual_seed(0)
    real, fp = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    feats = {"real": real, "FP": fp, "kq": fp + 0.01 * torch.randn(64, 4, generator=g), "kr": fp + 3.0}
    for key, value in feats.items():
        torch.save(value, tmp_path / f"{key}.pt")
    from diffquant.evaluation.metrics import frechet_distance

    def row(label, key):
        return {"label": label, "key": key, "bits": "w4a8", "summary": {"fd_ref": frechet_distance(feats[key], real)}}

    result = {"unconditional": True, "bits": ["w4a8"], "reference": {"summary": {"fd_ref": frechet_distance(fp, real)}},
              "rows": [row("qdiffusion-w4a8", "kq"), row("rtn-w4a8", "kr")]}
    (claim,) = [c for c in claims.check_claims(result, tmp_path)["qdiffusion"] if "FD to real" in c["claim"]]
    assert claim["verdict"] == "holds" and claim["detail"]["rtn_minus_qdiffusion_interval"][0] > 0
    result["rows"] = [row("qdiffusion-w4a8", "kr"), row("rtn-w4a8", "kq")]
    (claim,) = [c for c in claims.check_claims(result, tmp_path)["qdiffusion"] if "FD to real" in c["claim"]]
    assert claim["verdict"] == "does not hold"
    assert ("fd_ref", "FD to real ↓", "{:.2f}") in report.columns(result)
    assert report.columns({"reference": {"summary": {}}}) == report.COLUMNS


def test_granularity_table_reads_coverage_and_the_convolutions_granularity():
    """benchmarks/granularity.py classifies a bench row by its label: a convolution override is a granularity, not
    a coverage, and a peer keeps its own coverage."""
    import granularity

    row = granularity.parse_label("rtn-w8a8-per_token-conv_per_tensor-linear", "diffquant rtn-w8a8-per_token-conv_per_tensor-linear")
    assert (row["granularity"], row["layers"]) == ("per_token (conv per_tensor)", "linear")
    assert granularity.parse_label("qdiffusion-w4af-layers8d8940", "diffquant q")["layers"] == "layers8d8940"
    assert granularity.parse_label("bnb-int8", "bitsandbytes")["layers"] == "linear"
    # diffquant bench labels rows run with --option by their options, so they no longer share a label
    from diffquant.evaluation.bench import options_tag

    label = "qdiffusion-w4af-layers8d8940" + options_tag({"iterations": 1000, "act_iterations": 50})
    assert label == "qdiffusion-w4af-layers8d8940[act_iterations=50,iterations=1000]" and options_tag({}) == ""
    assert {k: granularity.parse_label(label, "diffquant q")[k] for k in ("layers", "options")} == {
        "layers": "layers8d8940", "options": "act_iterations=50,iterations=1000"}


def test_calibration_draws_are_disjoint_and_reach_the_row_config():
    from methodbench.runner import make_config

    from diffquant.evaluation.prompts import calibration_seeds
    from diffquant.sampling import SamplingSettings

    first, second = calibration_seeds(16), calibration_seeds(16, draw=1)
    assert not set(first) & set(second) and min(first) >= 1_000_000
    settings = SamplingSettings(steps=4)
    configs = [make_config("qdiffusion", 4, 8, settings, [""] * 16, {}, 8, unconditional=True, calib_draw=d) for d in (0, 1)]
    assert [c.calibration.seeds for c in configs] == [first, second]
    assert configs[0].to_dict() != configs[1].to_dict()  # so the row keys differ and neither draw reuses the other's row
    with pytest.raises(ValueError, match="numbered from 0"):
        calibration_seeds(4, draw=-1)


def test_recipe_claims_check_the_targets_within_the_bit_budget_and_each_ablation():
    result = copy.deepcopy(json.loads(RESULTS.read_text())["models"]["mini-sd"])
    result["rows"] = [r for r in result["rows"] if not r["label"].startswith("faithful")]
    qd = next(r for r in result["rows"] if r["label"] == "qdiffusion-w4a8")
    faithful = {**copy.deepcopy(qd), "label": "faithful-w4a8", "avg_wbits": 4.15}
    faithful["summary"].update(psnr=42.0, fd_fp=1.2)
    short = copy.deepcopy(faithful)
    short["label"] = "faithful-short-w4a8"
    short["summary"].update(psnr=40.0, ssim=faithful["summary"]["ssim"] - 0.01, fd_fp=2.0)
    short["per_image"]["psnr"] = [v - 2.0 for v in faithful["per_image"]["psnr"]]
    short["per_image"]["ssim"] = [v - 0.01 for v in faithful["per_image"]["ssim"]]
    result["rows"] += [faithful, short]
    out = claims.check_claims(result, None, "mini-sd")["recipe"]  # the model's name reaches the targets
    assert [c["verdict"] for c in out] == ["holds", "holds"]
    assert "1000 AdaRound iterations" in out[1]["claim"]
    faithful["avg_wbits"] = 4.6  # over the 4.5-bit budget: the fidelity alone does not make the target
    assert claims.recipe_claims("mini-sd", result, claims.Comparator(result, None))[0]["verdict"] == "does not hold"
    assert claims.recipe_claims("mini-ddim", result, claims.Comparator(result, None))[:1] == [out[1]]  # no targets there


def test_pcr_robust_must_be_no_worse_than_rtn_at_w4a8_and_emf_gets_an_equal_bit_row():
    result = copy.deepcopy(json.loads(RESULTS.read_text())["models"]["mini-sd"])
    result["rows"] = [r for r in result["rows"] if not r["label"].startswith(("pcr-robust", "emf-quantized-time"))]
    rtn = next(r for r in result["rows"] if r["label"] == "rtn-w4a8")
    robust = {**copy.deepcopy(rtn), "label": "pcr-robust-w4a8", "key": "robust"}  # RTN's own images: no worse
    equal = {**copy.deepcopy(rtn), "label": "emf-quantized-time-w4a8", "key": "equal", "avg_wbits": 4.15}
    result["rows"] += [robust, equal]
    (claim,) = [c for c in claims.check_claims(result, None, "mini-sd")["pcr"] if "robust ranges) no worse than RTN" in c["claim"]]
    assert claim["verdict"] == "holds" and claim["claim"].startswith("w4a8: PCR (robust ranges)")
    robust["per_image"]["psnr"] = [v - 1.0 for v in rtn["per_image"]["psnr"]]
    robust["summary"]["psnr"] = rtn["summary"]["psnr"] - 1.0
    (claim,) = [c for c in claims.check_claims(result, None, "mini-sd")["pcr"] if "robust ranges) no worse than RTN" in c["claim"]]
    assert claim["verdict"] == "does not hold" and "clearly closer on psnr" in claim["text"]
    equal_claims = [c for c in claims.check_claims(result, None, "mini-sd")["emf"] if "equal bits (4.15" in c["claim"]]
    assert [c["claim"].split("closer to FP than ")[1] for c in equal_claims] == ["rtn", "qdiffusion", "pcr", "EMF with float time tables"]


def test_w4a4_rows_of_the_recipe_and_its_low_rank_form_are_each_checked_against_rtn_w4a8():
    result = copy.deepcopy(json.loads(RESULTS.read_text())["models"]["mini-sd"])
    result["rows"] = [r for r in result["rows"] if not r["label"].startswith("faithful")]
    rtn = next(r for r in result["rows"] if r["label"] == "rtn-w4a8")
    lowrank = {**copy.deepcopy(rtn), "label": "faithful-lowrank2-w4a4", "key": "lr2", "avg_wbits": 4.5}
    lowrank["per_image"]["psnr"] = [v + 1.0 for v in rtn["per_image"]["psnr"]]
    lowrank["summary"].update(psnr=rtn["summary"]["psnr"] + 1.0, fd_fp=rtn["summary"]["fd_fp"] + 1.0)
    result["rows"].append(lowrank)
    (claim,) = [c for c in claims.check_claims(result, None, "mini-sd")["recipe"] if c["claim"].startswith("W4A4")]
    assert claim["claim"].startswith("W4A4: faithful-lowrank2 (4.50 average weight bits)")
    assert claim["verdict"] == "holds partly"  # clearly closer on PSNR, farther on FD
