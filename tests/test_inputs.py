"""Inputs never changed silently: typed options, BOM, truncated prompts, seed ranges, one average-bits figure,
bench's shipped float size (issue 20, item 5)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from diffquant.cli_common import check_device, parse_method_options
from diffquant.evaluation.prompts import parse_seeds
from diffquant.prompts import prompt_list, warn_truncated


def test_option_values_parsed_by_the_options_dataclass():
    opts = parse_method_options("qdiffusion", ["reconstruct_weights=no", "learn_act_scales=1", "iterations=20", "warmup=0.2",
                                               "batch_size=none", "preset=paper"])
    assert opts == {"reconstruct_weights": False, "learn_act_scales": True, "iterations": 20, "warmup": 0.2,
                    "batch_size": None, "preset": "paper"}
    assert parse_method_options("pcr", ["relax_steps=1,3", "relax_fraction=0.5"]) == {"relax_steps": [1, 3], "relax_fraction": 0.5}
    assert parse_method_options("emf", ["freeze_at=[0.5, 0.9]"]) == {"freeze_at": [0.5, 0.9]}
    for bad, expected in [("iterations=1.5", "an integer or none"), ("reconstruct_weights=maybe", "true/false"),
                          ("warmup=x", "a number or none")]:
        with pytest.raises(ValueError, match=expected):
            parse_method_options("qdiffusion", [bad])
    with pytest.raises(ValueError, match="relax_steps='1,x': pcr expects a comma list of an integer"):
        parse_method_options("pcr", ["relax_steps=1,x"])


def test_bom_stripped_and_seed_ranges_checked(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red circle\na blue square\n".encode("utf-8"))
    assert prompt_list(path) == ["a red circle", "a blue square"]
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="empty --seeds range '3-1'"):
        parse_seeds("3-1")


def test_long_prompts_warn_once_with_the_limit(tiny_pipes, caplog):
    pipe = tiny_pipes["sd"]
    limit = pipe.tokenizer.model_max_length
    long = " ".join(["red circle"] * limit)
    with caplog.at_level(logging.WARNING, logger="diffquant"):
        assert warn_truncated(pipe, [long, "a red circle", long + " blue"]) == 2
    records = [r.getMessage() for r in caplog.records if r.name == "diffquant"]
    assert len(records) == 1 and f"2 of 3 prompts are longer than the text encoder's {limit}-token limit" in records[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_absent_device_refused():
    with pytest.raises(ValueError, match="no cuda device is visible"):
        check_device("cuda")
    assert check_device("cpu") == "cpu"


def test_info_and_eval_report_one_average_bits_and_bench_counts_the_shipped_file(tiny_pipes, tmp_path):
    import diffquant
    from diffquant import QuantConfig
    from diffquant.bits import BITS_CONVENTION, coverage
    from diffquant.determinism import TIMINGS
    from diffquant.evaluation.coverage import layer_table, shipped_mib
    from diffquant.evaluation.peers import saved_size_bytes
    from diffquant.inspect import OLD_CONVENTION, describe
    from diffquant.io import file_table
    from diffquant.sampling import SamplingSettings
    from diffquant.serialization import MANIFEST
    from tinyutil import PROMPTS, calibration_config

    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(wbits=4, abits=8, keep_float=["conv_in"], calibration=calibration_config(num_prompts=1, num_inference_steps=2))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:1], progress=False)
    diffquant.save(pipe, tmp_path / "q")
    info = describe(tmp_path / "q")
    loaded = diffquant.load(tmp_path / "q").unet
    bits = diffquant.average_bits(loaded)
    assert info["average_weight_bits"] == bits["weight_bits"] and info["average_activation_bits"] == bits["activation_bits"]
    assert info["average_bits_convention"] == BITS_CONVENTION and info["weight_coverage"] == bits["weight_coverage"] < 1
    # eval/bench's number for the same model: the float reference's table at the bench's settings. Weights do not
    # depend on the call counted, so the figure is the same; conv_in counts at 32 (float32), the rest at 4.
    table = layer_table(tiny_pipes["sd"], SamplingSettings(steps=2, guidance=5.0, height=32, width=32))
    assert coverage(table, loaded)["avg_wbits"] == pytest.approx(bits["weight_bits"], rel=1e-12)
    conv_in = table.weight_numel["conv_in"]
    quantized = sum(table.weight_numel.values()) - conv_in
    assert bits["weight_bits"] == pytest.approx((4 * quantized + 32 * (table.total_numel - quantized)) / table.total_numel)
    # A folder saved before this convention keeps its numbers and says which convention they are in.
    folder = tmp_path / "q" / "unet"
    meta = json.loads((folder / "diffquant_config.json").read_text())
    meta["average_bits"] = {"weight_bits": 4.1, "activation_bits": 8.0}
    (folder / "diffquant_config.json").write_text(json.dumps(meta))
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    manifest["files"] = file_table(tmp_path / "q", exclude=("unet/" + TIMINGS, MANIFEST))
    (tmp_path / "q" / MANIFEST).write_text(json.dumps(manifest))
    old = describe(tmp_path / "q")
    assert old["average_weight_bits"] == 4.1 and old["average_bits_convention"] == OLD_CONVENTION
    assert "float layers at 16 bits" in old["text"] and old["weight_coverage"] is None

    fp16 = tmp_path / "fp16"
    copy.deepcopy(tiny_pipes["sd"]).to(torch.float16).save_pretrained(fp16)
    from diffusers import StableDiffusionPipeline

    fp = StableDiffusionPipeline.from_pretrained(fp16, torch_dtype=torch.float32)
    shipped = sum(p.stat().st_size for p in (fp16 / "unet").glob("*.safetensors"))
    assert shipped_mib(fp, reference=True) * 2**20 == shipped < 0.6 * saved_size_bytes(fp.unet)


def test_config_options_checked_against_the_same_types():
    from diffquant import QuantConfig

    with pytest.raises(ValueError, match=r"qdiffusion option reconstruct_weights='no': expected true/false"):
        QuantConfig(method="qdiffusion", options={"reconstruct_weights": "no"})
    with pytest.raises(ValueError, match=r"qdiffusion option iterations=1.5: expected an integer or none"):
        QuantConfig(method="qdiffusion", options={"iterations": 1.5})
    assert QuantConfig(method="qdiffusion", options={"warmup": 0, "iterations": None}).options == {"warmup": 0, "iterations": None}
