"""A fast, quiet CLI (issue 18, item 3): ``--help`` loads none of the heavy libraries, third-party warning
floods are hidden unless ``--verbose``, parse errors are one ``error:`` line. The 1 s target itself is measured
by benchmarks/cli_startup.py, not timed here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from typer.testing import CliRunner

from diffquant.cli import app

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "diffusers", "transformers", "torchmetrics", "torchao", "optimum.quanto", "sdnq", "bitsandbytes",
         "openvino", "nncf", "onnxruntime", "numpy")
HELPS = ([], ["quantize"], ["generate"], ["info"], ["export"], ["demo"], ["eval"], ["bench"],
         ["zoo"], ["zoo", "list"], ["zoo", "train"], ["zoo", "eval"])

# One fresh interpreter: every --help, then what they imported; then the registry tables (filled on first read).
PROBE = f"""
import json, sys
from typer.testing import CliRunner
from diffquant.cli import app
runner = CliRunner()
codes = [runner.invoke(app, [*args, "--help"]).exit_code for args in {HELPS!r}]
heavy = [m for m in {HEAVY!r} if m in sys.modules]
import diffquant
api = [m for m in {HEAVY!r} if m in sys.modules]
from diffquant.config import QuantConfig
from diffquant.registry import CONVERTED, MODELS, PROMPT_SETS
QuantConfig(method="pcr")
print(json.dumps({{"codes": codes, "heavy": heavy, "after_import_diffquant": api, "models": sorted(MODELS),
                   "prompt_sets": "zoo:heldout" in PROMPT_SETS, "converted": len(CONVERTED)}}))
"""


def test_help_loads_no_heavy_library_and_the_registry_fills_on_first_read():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["codes"] == [0] * len(HELPS), found["codes"]
    assert found["heavy"] == [], f"--help imported {found['heavy']}"
    assert found["after_import_diffquant"] == [], f"import diffquant imported {found['after_import_diffquant']}"
    assert {"mini-sd", "mini-sd3"} <= set(found["models"]) and found["prompt_sets"] and found["converted"] >= 2, found


def test_every_public_name_still_resolves():
    import diffquant

    for name in [*diffquant.__all__, "convert", "zoo", "runtime", "api", "__version__"]:
        assert getattr(diffquant, name) is not None, name
    assert set(diffquant.__all__) <= set(dir(diffquant))
    assert diffquant.convert is diffquant.runtime.convert and diffquant.load is diffquant.deployment.load
    try:
        diffquant.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("diffquant.no_such_name resolved")


def _noisy_describe(model):
    """What a command meets as it imports torchao and diffusers, plus one line of diffquant's own."""
    logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
    logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass ...")
    exec("import warnings; warnings.warn('`torch_dtype` is deprecated', FutureWarning)",
         {"__name__": "diffusers.utils.deprecation_utils"})
    logging.getLogger("diffquant").warning("ours")
    return {"text": "described"}


def _info(monkeypatch, caplog, *flags: str) -> tuple[list[str], list[str]]:
    """``diffquant [flags] info`` over :func:`_noisy_describe`: the loggers and warnings that got through; the
    loggers' levels and the environment are the same after the command as before it."""
    import diffquant.inspect

    monkeypatch.setattr(diffquant.inspect, "describe", _noisy_describe)
    caplog.clear()
    before = ({name: logging.getLogger(name).level for name in ("torchao", "diffusers", "torch")}, dict(os.environ))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [*flags, "info", "--model", "q"])
    assert result.exit_code == 0 and "described" in result.output, result.output
    assert ({name: logging.getLogger(name).level for name in before[0]}, dict(os.environ)) == before
    return [r.name for r in caplog.records], [str(w.message) for w in caught]


def test_third_party_warnings_hidden_by_default_and_shown_with_verbose(monkeypatch, caplog):
    logs, caught = _info(monkeypatch, caplog)
    assert logs == ["diffquant"] and caught == [], (logs, caught)
    logs, caught = _info(monkeypatch, caplog, "--verbose")
    assert logs == ["torchao", "torch.utils._pytree", "diffquant"], logs
    assert caught == ["`torch_dtype` is deprecated"], caught


def test_parse_errors_are_one_line():
    runner = CliRunner()
    for args, expected in ((["quantize", "--model", "m", "--out", "o", "--wbits", "abc"], "Invalid value for '--wbits'"),
                           (["quantize", "--out", "o"], "Missing option '--model'"),
                           (["quantise"], "No such command 'quantise'"),
                           (["zoo", "train"], "Missing argument 'name'")):
        result = runner.invoke(app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert expected in lines[0] and "--help`" in lines[0], lines[0]
    result = runner.invoke(app, ["zoo"])  # a bare group still prints its help
    assert "Commands:" in result.output
