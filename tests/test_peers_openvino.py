"""The OpenVINO peers (NNCF INT8, OpenVINO FP32) through bench's peer path on the tiny SD pipeline."""

from __future__ import annotations

import json

import pytest

from diffquant.models.tiny import tiny_sd_pipeline

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("diffquant.runtime.openvino")  # OVDenoiser, which runs every OpenVINO peer


@pytest.mark.slow
def test_bench_openvino_peers(tmp_path):
    import typer
    from typer.testing import CliRunner

    from diffquant.evaluation.cli import bench_command

    tiny_sd_pipeline(0).save_pretrained(tmp_path / "fp")
    (tmp_path / "prompts.txt").write_text("a red circle on the left\na large blue square at the top\n")
    (tmp_path / "calib.txt").write_text("a cyan star\na yellow circle\n")
    app = typer.Typer()
    app.command()(bench_command)
    result = CliRunner().invoke(app, [
        "--model", str(tmp_path / "fp"), "--methods", "none", "--peers", "nncf-int8,openvino-fp32",
        "--prompts", str(tmp_path / "prompts.txt"), "--calib-prompts", str(tmp_path / "calib.txt"), "--steps", "2",
        "--height", "32", "--width", "32", "--batch-size", "2", "--metrics", "psnr,timestep", "--out", str(tmp_path / "bench"),
        "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    rows = {m["label"]: m for m in json.loads((tmp_path / "bench" / "results.json").read_text())["models"]}
    assert list(rows) == ["nncf-int8", "openvino-fp32"] and not any("unavailable" in r for r in rows.values())
    nncf, fp32 = rows["nncf-int8"]["summary"], rows["openvino-fp32"]["summary"]
    # NNCF got one sample per recorded call: 2 prompts in one batch x 2 steps.
    assert nncf["calibration_samples"] == 2 and nncf["calibration_s"] > 0
    # Its IR holds int8 weights: well under the float IR (random tiny weights; float biases and norms remain).
    assert 0 < nncf["denoiser_mib"] < 0.5 * fp32["denoiser_mib"]
    # OpenVINO at f32 runs the same float model (8-bit PNGs of the same images); NNCF's INT8 moves them.
    assert float(fp32["psnr"]) > 40 and 10 < nncf["psnr"] < 40  # "inf" when every PNG matches
    assert rows["nncf-int8"]["fingerprint"] != rows["openvino-fp32"]["fingerprint"]  # no shared image cache
    assert len(rows["nncf-int8"]["timestep_error"]["rel_mse"]) == 2
    # Coverage read from the graphs: NNCF quantizes every MatMul/Convolution and Q·Kᵀ (softmax·V stays float).
    assert nncf["weight_coverage"] > 0.9 and 0.5 < nncf["mac_coverage"] < 1 and nncf["avg_abits"] < 32
    assert fp32["weight_coverage"] == 0 and fp32["avg_wbits"] == 32
