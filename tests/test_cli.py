"""The command line as a new user meets it: quantize -> info -> generate on a pipeline folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffquant.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory, tiny_pipes):
    folder = tmp_path_factory.mktemp("fp") / "tiny-sd"
    tiny_pipes["sd"].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "calib.txt"
    path.write_text("# calibration prompts\na red circle on the left\n\na blue square at the top\n")
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_info_generate(fp_folder, prompt_file, tmp_path):
    out = tmp_path / "q"
    result = invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", out, "--wbits", 4, "--abits", 8,
                    "--num-prompts", 2, "--steps", 3, "--guidance", 5.0, "--height", 16, "--width", 24)
    assert result.exit_code == 0, result.output
    assert (out / "diffquant_manifest.json").is_file()
    import diffquant

    calibration = diffquant.quant_record(diffquant.load(out).unet).config.calibration  # recorded at 16x24 pixels
    assert (calibration.height, calibration.width) == (16, 24)

    result = invoke("info", "--model", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["label"] == "rtn-w4a8" and summary["quantized_layers"] > 10
    assert summary["size_ratio_vs_fp16"] < 0.7  # int8-stored 4-bit codes vs fp16

    image = tmp_path / "img.png"
    result = invoke("generate", "--model", out, "--prompt", "a red circle", "--seed", 1, "--steps", 3, "--out", image)
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(image).size == (32, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "not found"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--wbits", "1"], "bits must be an integer from 2 to 16"),
        (["--abits", "20"], "bits must be an integer from 2 to 16"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(fp_folder, prompt_file, tmp_path, args, message):
    base = {"--model": str(fp_folder), "--prompts": str(prompt_file), "--out": str(tmp_path / "q")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = invoke("quantize", *[x for pair in base.items() for x in pair])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_empty_prompt_file_and_existing_output_refused(fp_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    result = invoke("quantize", "--model", fp_folder, "--prompts", empty, "--out", tmp_path / "q")
    assert result.exit_code == 2 and "holds no prompts" in result.output
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = invoke("quantize", "--model", fp_folder, "--prompts", empty, "--out", taken)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (taken / "keep.txt").read_text() == "mine"


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "junk").mkdir()
    result = invoke("generate", "--model", tmp_path / "junk", "--prompt", "x")
    assert result.exit_code == 2 and "model_index.json" in result.output


def _error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_prompt_file_missing_or_unreadable(fp_folder, tmp_path):
    out = tmp_path / "q"
    assert "not found" in _error_line(invoke("quantize", "--model", fp_folder, "--prompts", tmp_path / "nope.txt", "--out", out))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un cercle rouge \xe0 gauche\n".encode("latin-1"))
    assert "save it as UTF-8" in _error_line(invoke("quantize", "--model", fp_folder, "--prompts", latin1, "--out", out))
    assert not out.exists()


def test_empty_prompt_and_unknown_option(fp_folder, prompt_file, tmp_path):
    assert "the prompt is empty" in _error_line(invoke("generate", "--model", fp_folder, "--prompt", "  "))
    line = _error_line(invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", tmp_path / "q",
                              "--method", "qdiffusion", "--option", "itertions=5"))
    assert "unknown qdiffusion options ['itertions']" in line and "iterations" in line


def test_info_on_a_folder_not_written_by_diffquant(fp_folder):
    assert "was not written by diffquant.save" in _error_line(invoke("info", "--model", fp_folder))


def test_nan_weights_in_calibration_named_not_blamed_on_overflow(tiny_pipes, prompt_file, tmp_path):
    import copy

    import torch

    pipe = copy.deepcopy(tiny_pipes["sd"])
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("inf")  # conv_in's output, the next layer's input, is Inf/NaN
    folder = tmp_path / "broken"
    pipe.save_pretrained(folder)
    line = _error_line(invoke("quantize", "--model", folder, "--prompts", prompt_file, "--out", tmp_path / "q",
                              "--num-prompts", 1, "--steps", 2))
    assert "calibration step 1 (timestep " in line and "first in the output of conv_in" in line
    assert "weights hold NaN/Inf (conv_in.weight" in line and "overflow" not in line


def test_out_of_memory_suggests_smaller_batches(fp_folder, prompt_file, tmp_path, monkeypatch):
    import torch

    import diffquant

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(diffquant, "quantize", exhausted)
    line = _error_line(invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", tmp_path / "q"))
    assert "out of memory" in line and "--batch-size" in line
    assert not (tmp_path / "q").exists()


def test_quantize_and_demo_defaults_are_the_config_fields():
    """Flags without a value build the library's default config: their defaults come from the dataclass fields."""
    import typer.main

    from diffquant.cli import app
    from diffquant.config import CalibrationConfig, QuantConfig

    commands = typer.main.get_command(app).commands
    defaults = {p.name: p.default for p in commands["quantize"].params}
    q, c = QuantConfig(), CalibrationConfig()
    fields = {"method": q.method, "wbits": q.wbits, "abits": q.abits, "granularity": q.weight_granularity,
              "group_size": q.group_size, "weight_observer": q.weight_observer, "act_observer": q.act_observer,
              "timestep_groups": q.timestep_groups, "keep_float": q.keep_float, "seed": q.seed,
              "num_prompts": c.num_prompts, "batch_size": c.batch_size, "steps": c.num_inference_steps,
              "guidance": c.guidance_scale, "height": c.height, "width": c.width,
              "act_symmetric": q.act_symmetric, "attention_quantizers": q.attention_quantizers}
    assert {k: defaults[k] for k in fields} == fields
    demo = {p.name: p.default for p in commands["demo"].params}
    assert (demo["wbits"], demo["abits"]) == (q.wbits, q.abits)


def test_quantize_flags_for_openvinos_int8_attention(fp_folder, prompt_file, tmp_path):
    """--act-symmetric --attention-quantizers qk: the configuration at NNCF INT8's speed on OpenVINO (issue 14)."""
    import diffquant

    out = tmp_path / "q"
    result = invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", out, "--num-prompts", 2, "--steps", 2,
                    "--act-symmetric", "--attention-quantizers", "qk")
    assert result.exit_code == 0, result.output
    config = diffquant.quant_record(diffquant.load(out).unet).config
    assert config.act_symmetric and config.attention_quantizers == "qk" and config.label == "rtn-w8a8-sym-attn_qk"


def test_recipe_fills_the_flags_not_given(fp_folder, prompt_file, tmp_path):
    """--recipe faithful: Q-Diffusion, MSE weight ranges, per-group activations; a flag given on the command line wins,
    even at its default value, and --option values are typed for the recipe's method."""
    import diffquant

    out = tmp_path / "q"
    result = invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", out, "--num-prompts", 2, "--steps", 2,
                    "--recipe", "faithful", "--wbits", 4, "--act-granularity", "per_tensor", "--option", "iterations=2",
                    "--option", "act_iterations=1")
    assert result.exit_code == 0, result.output
    config = diffquant.quant_record(diffquant.load(out).unet).config
    assert (config.method, config.wbits, config.weight_observer, config.act_granularity) == ("qdiffusion", 4, "mse", "per_tensor")
    assert config.options == {"preset": "faithful", "iterations": 2, "act_iterations": 1}
    assert "unknown recipe 'fast'; choose one of faithful" in _error_line(
        invoke("quantize", "--model", fp_folder, "--prompts", prompt_file, "--out", tmp_path / "q2", "--recipe", "fast"))
