"""diffusers-native loading (hf_quantizer.py): ``<Denoiser>.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` of
a diffquant folder give the model ``diffquant.load`` gives, bit for bit; other folders load as before."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from tinyutil import PROMPTS, calibration_config, sample_latents

import diffquant
from diffquant.io import null_components
from diffquant.models.adapters import get_adapter
from diffquant.nn import states

FAMILIES = {"sd": "unet", "sdxl": "unet", "sd3": "transformer"}
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: a fake-quant and a converted W8A8 RTN save of the tiny pipeline."""
    from diffquant.models.tiny import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for family, build in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline), ("sd3", tiny_sd3_pipeline)):
        pipe = build()
        config = diffquant.QuantConfig(method="rtn", wbits=8, abits=8,
                                       calibration=calibration_config(num_prompts=2, num_inference_steps=2))
        diffquant.quantize(pipe, config, calibration=PROMPTS[:2], progress=False)
        folders[family, "fake"] = diffquant.save(pipe, root / f"{family}-fake")
        diffquant.convert(pipe)
        folders[family, "converted"] = diffquant.save(pipe, root / f"{family}-converted")
    return folders


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _output(denoiser) -> torch.Tensor:
    adapter = get_adapter(denoiser, warn=False)
    with torch.no_grad():
        return adapter.call(adapter.example_inputs())


@pytest.mark.parametrize("form", ["fake", "converted"])
@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_from_pretrained_is_diffquant_load(saved, family, form):
    folder = saved[family, form]
    reference = _denoiser(diffquant.load(folder))
    cls = type(reference)
    denoiser = cls.from_pretrained(folder / FAMILIES[family])
    assert type(denoiser) is cls and denoiser.is_quantized
    assert states(denoiser) == states(reference) and ("converted" in states(denoiser)) == (form == "converted")
    assert diffquant.quant_record(denoiser).config == diffquant.quant_record(reference).config
    assert torch.equal(_output(denoiser), _output(reference))


@pytest.mark.parametrize("family", ["flux", "ddpm"])
def test_other_families_weight_only(family, tmp_path):
    """Flux's double/single-stream transformer and the unconditional UNet2DModel take the same path (weights only: fast)."""
    from diffquant.models.tiny import tiny_flux_pipeline
    from diffquant.models.tiny_unconditional import tiny_ddpm_pipeline

    pipe = {"flux": tiny_flux_pipeline, "ddpm": tiny_ddpm_pipeline}[family]()
    diffquant.quantize(pipe, diffquant.QuantConfig(method="rtn", wbits=8, abits=None), progress=False)
    folder = diffquant.save(pipe, tmp_path / family)
    reference = diffquant.get_denoiser(diffquant.load(folder))
    denoiser = type(reference).from_pretrained(folder / ("unet" if family == "ddpm" else "transformer"))
    assert states(denoiser) == states(reference) and states(denoiser)["frozen"] > 0
    assert torch.equal(_output(denoiser), _output(reference))


@pytest.mark.parametrize("form", ["fake", "converted"])
def test_pipeline_from_pretrained_generates_as_diffquant_load(saved, form, tmp_path):
    folder = saved["sd", form]
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    reference = diffquant.load(folder)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    assert states(pipe.unet) == states(reference.unet)
    assert torch.equal(sample_latents(pipe, num_inference_steps=2), sample_latents(reference, num_inference_steps=2))
    if form == "fake":  # the user's line, decoded to an image
        assert pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    with pytest.warns(UserWarning, match=r"diffquant.save"), pytest.raises(ValueError, match="not serializable"):
        pipe.unet.save_pretrained(tmp_path / "unet")


def test_sd3_pipeline_without_t5_loads_with_the_missing_components_named(saved):
    folder = saved["sd3", "converted"]  # diffusers reloads a pipeline saved with a null component only if it is named
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **null_components(folder))
    assert states(pipe.transformer)["converted"] > 0


def test_plain_diffusers_folder_still_loads_as_float(tmp_path):
    from diffquant.models.tiny import tiny_unet

    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not hasattr(loaded, "diffquant") and not getattr(loaded, "is_quantized", False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


def test_tampered_or_pickled_folder_is_refused(saved, tmp_path):
    folder = shutil.copytree(saved["sd", "fake"], tmp_path / "q")
    weights = folder / "unet" / "diffquant_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="diffquant_model.safetensors is corrupted"):
        diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.copyfile(saved["sd", "fake"] / "unet" / "diffquant_model.safetensors", weights)
    (folder / "unet" / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="refusing to load .*extra.bin"):
        diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "extra.bin").unlink()
    (folder / "unet" / "diffquant_config.json").rename(folder / "config.moved")  # as the hub would fetch the folder
    with pytest.raises(FileNotFoundError, match="diffquant_config.json missing: from_pretrained reads .* a local folder"):
        diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    # a save from before diffusers loading: no quantization_config, no placeholder
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):
        diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")


def test_diffusers_without_the_hooks_gets_one_line_error(saved, monkeypatch):
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer

    from diffquant import hf_quantizer

    for table in hf_quantizer.TABLES:  # register into copies: monkeypatch puts diffusers' own tables back
        monkeypatch.setattr(auto, table, dict(getattr(auto, table)))
    monkeypatch.delattr(DiffusersQuantizer, "maybe_update_loaded_keys")
    hf_quantizer.register(auto)
    with pytest.raises(ImportError, match=r"lacks DiffusersQuantizer.maybe_update_loaded_keys.*diffusers>=0.42.*diffquant.load"):
        diffusers.UNet2DConditionModel.from_pretrained(saved["sd", "fake"] / "unet")


def test_hf_quantizer_alone_imports_neither_torch_nor_diffusers():
    code = (
        "import sys, types; pkg = types.ModuleType('diffquant'); pkg.__path__ = [sys.argv[1]]; sys.modules['diffquant'] = pkg\n"
        "from diffquant import hf_quantizer; hf_quantizer.install()\n"
        "print(sorted({'torch', 'diffusers'} & set(sys.modules)), type(sys.meta_path[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(SRC / "diffquant")], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["[]", "_RegisterAfterImport"], out.stderr[-2000:]


def test_registration_waits_for_the_quantizer_module(tmp_path, monkeypatch):
    """The finder lets the real loader run the module, then registers (a stand-in package for diffusers.quantizers)."""
    from diffquant import hf_quantizer

    (tmp_path / "fakequant").mkdir()
    (tmp_path / "fakequant" / "__init__.py").write_text("")
    (tmp_path / "fakequant" / "auto.py").write_text("AUTO_QUANTIZER_MAPPING = {}\nAUTO_QUANTIZATION_CONFIG_MAPPING = {}\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(hf_quantizer, "TARGET", "fakequant.auto")
    for name in ("fakequant", "fakequant.auto"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    hf_quantizer.install()
    import fakequant.auto as auto

    assert auto.AUTO_QUANTIZER_MAPPING["diffquant"].__name__ == "DiffquantQuantizer"
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["diffquant"].__name__ == "DiffquantConfig"
    assert not any(isinstance(f, hf_quantizer._RegisterAfterImport) for f in sys.meta_path)  # once only


def test_saved_config_names_diffquant_and_the_manifest_hashes_it(saved):
    folder = saved["sd", "converted"]
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "diffquant"
    manifest = json.loads((folder / "diffquant_manifest.json").read_text())
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(manifest["files"])
    diffquant.serialization.verify(folder)


def test_after_import_survives_availability_probes(tmp_path, monkeypatch):
    """diffusers/transformers probe peft with importlib.util.find_spec before importing it: the probe must not use up
    the one-shot hook (it did, and LoRA on quantized layers was then never enabled in such a process)."""
    import importlib.util

    from diffquant.hf_quantizer import after_import

    (tmp_path / "dq_probe_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("dq_probe_target", lambda module: seen.append(module.VALUE))
    assert importlib.util.find_spec("dq_probe_target") is not None and seen == []
    import dq_probe_target  # noqa: F401

    assert seen == [1]
    after_import("dq_probe_target", lambda module: seen.append(2))  # already loaded: runs at once
    assert seen == [1, 2]
    monkeypatch.delitem(sys.modules, "dq_probe_target")
