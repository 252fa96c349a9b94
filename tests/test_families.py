"""Flux, SD3.5-style, PixArt-Σ and SANA pipelines (tiny, from configs) with every method, save/load and loading."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import diffquant
from diffquant import QuantConfig
from diffquant.models import tiny
from diffquant.models.adapters import get_adapter
from diffquant.nn import QuantAttnProcessor, QuantConv2d, QuantFluxAttnProcessor, QuantJointAttnProcessor, QuantLinear, QuantSanaLinearAttnProcessor
from diffquant.sampling import SamplingSettings, sample
from diffquant.wrap import wrap_denoiser

from tinyutil import PROMPTS, calibration_config

BUILDERS = {"flux": tiny.tiny_flux_pipeline, "sd35": lambda: tiny.tiny_sd3_pipeline(sd35=True), "pixart": tiny.tiny_pixart_pipeline,
            "sana": tiny.tiny_sana_pipeline}
SIZE = {"flux": 32, "sd35": 16, "pixart": 16, "sana": 32}  # Flux packs 2x2 latents: 32 px -> 8x8 tokens
BLOCKS = {"flux": ["transformer_blocks.0", "single_transformer_blocks.0"], "sd35": ["transformer_blocks.0", "transformer_blocks.1"],
          "pixart": ["transformer_blocks.0", "transformer_blocks.1"], "sana": ["transformer_blocks.0", "transformer_blocks.1"]}
PROCESSOR = {"flux": QuantFluxAttnProcessor, "sd35": QuantJointAttnProcessor, "pixart": QuantAttnProcessor,
             "sana": QuantSanaLinearAttnProcessor}
OPTIONS = {"rtn": {}, "qdiffusion": dict(iterations=2, act_iterations=1, batch_size=4),
           "pcr": dict(sensitivity_prompts=0, relax_steps=[0]), "emf": dict(steps_per_prompt=2, iterations=2, batch_size=4, distill_layers=1)}


@pytest.fixture(scope="module")
def pipes():
    return {family: build() for family, build in BUILDERS.items()}


def settings(family: str) -> SamplingSettings:
    return SamplingSettings(steps=3, height=SIZE[family], width=SIZE[family])


def latents(pipe, family: str) -> torch.Tensor:
    return sample(pipe, PROMPTS[:2], settings(family).resolve(pipe))


def quantize(pipe, family: str, method: str, caplog):
    cfg = QuantConfig(method=method, wbits=8, abits=8, options=OPTIONS[method],
                      calibration=calibration_config(num_prompts=2, num_inference_steps=3, batch_size=2,
                                                     height=SIZE[family], width=SIZE[family]))
    with caplog.at_level(logging.WARNING):
        diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    assert "no diffquant adapter" not in caplog.text and "stay float" not in caplog.text
    return diffquant.get_denoiser(pipe)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_adapter_knows_the_family(pipes, family, caplog):
    with caplog.at_level(logging.WARNING):
        adapter = get_adapter(diffquant.get_denoiser(pipes[family]))
    assert "no diffquant adapter" not in caplog.text and adapter.family != "generic"
    assert adapter.blocks()[: len(BLOCKS[family])] == BLOCKS[family]
    assert adapter.time_layers() and set(adapter.time_layers()) <= set(adapter.layers())
    assert len(adapter.attention_modules()) >= 2
    if family == "sd35":  # dual attention: the second attention of block 0 is quantized too
        assert "transformer_blocks.0.attn2" in adapter.attention_modules()


SLOW = pytest.mark.slow  # PCR and EMF add ~5-10 s per family; RTN and Q-Diffusion stay in the fast run


@pytest.mark.parametrize("method", [m if m in ("rtn", "qdiffusion") else pytest.param(m, marks=SLOW) for m in OPTIONS])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_method_quantizes_saves_and_generates(pipes, family, method, caplog, tmp_path):
    pipe = copy.deepcopy(pipes[family])
    ref = latents(pipes[family], family)
    denoiser = quantize(pipe, family, method, caplog)
    record = diffquant.quant_record(denoiser)
    plain = [n for n, m in denoiser.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert sorted(plain) == sorted(record.float_layers)  # every layer left plain says why
    assert sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in denoiser.modules()) > 10
    assert any(type(m) is PROCESSOR[family] for m in denoiser.modules())
    if method == "qdiffusion":
        reconstructed = {b["name"] for b in record.report["qdiffusion"]["blocks"]}
        assert set(BLOCKS[family]) <= reconstructed <= set(get_adapter(denoiser).blocks())
    out = latents(pipe, family)
    assert torch.isfinite(out).all() and out.shape == ref.shape and not torch.equal(out, ref)
    loaded = diffquant.load(diffquant.save(pipe, tmp_path / "q"))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(latents(loaded, family), out)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_float_wrapped_processors_change_nothing(pipes, family):
    """Wrapped but not yet calibrated: the quantized attention processors compute what diffusers' do."""
    pipe = copy.deepcopy(pipes[family])
    ref = latents(pipes[family], family)
    wrap_denoiser(diffquant.get_denoiser(pipe), QuantConfig(method="rtn", wbits=8, abits=8))
    torch.testing.assert_close(latents(pipe, family), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_time_precalculation_equals_live_computation(pipes, family):
    from diffquant.learning import TimePrecalculation

    pipe = copy.deepcopy(pipes[family])
    ref = latents(pipes[family], family)
    denoiser = diffquant.get_denoiser(pipe)
    live: dict[str, list[torch.Tensor]] = {}
    hooks = [denoiser.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: live.setdefault(n, []).append(o))
             for n in get_adapter(denoiser).time_layers()]
    latents(pipe, family)
    for h in hooks:
        h.remove()
    tables = TimePrecalculation.install(denoiser)
    tables.attach_scheduler(pipe.scheduler)
    torch.testing.assert_close(latents(pipe, family), ref, rtol=1e-5, atol=1e-6)
    assert tables.misses == 0 and tables.entries() > 0  # every step came from the precalculated table
    for name, outputs in live.items():  # each live row is a table entry, and the table holds nothing else
        table = torch.stack(list(tables.table(name).values()))
        rows = torch.cat(outputs)
        distance = torch.cdist(rows.flatten(1), table.flatten(1)) / rows.flatten(1).norm(dim=1).max()
        assert distance.min(dim=1).values.max() < 1e-5 and distance.min(dim=0).values.max() < 1e-5


def test_sd3_without_t5_folder_loads_and_quantizes(pipes, tmp_path, caplog):
    from diffquant.pipelines import load_pipeline

    folder = tmp_path / "sd35-no-t5"
    pipes["sd35"].save_pretrained(folder)  # text_encoder_3 and tokenizer_3 saved as null
    pipe = load_pipeline(folder)
    assert pipe.text_encoder_3 is None
    torch.testing.assert_close(latents(pipe, "sd35"), latents(pipes["sd35"], "sd35"))
    quantize(pipe, "sd35", "rtn", caplog)


def test_pixart_sampling_turns_binning_off_only_without_bins(pipes):
    pipe = pipes["pixart"]
    assert settings("pixart").resolve(pipe).extras == {"use_resolution_binning": False}
    assert SamplingSettings(extras={"use_resolution_binning": True}).resolve(pipe).extras["use_resolution_binning"] is True
    binned = copy.copy(pipe)
    binned.transformer = tiny.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                       cross_attention_dim=16, sample_size=32, caption_channels=32)
    assert SamplingSettings().resolve(binned).extras == {}


@pytest.mark.parametrize("family", ["flux", "pixart", "sana"])
def test_adapter_names_the_denoiser_inputs(pipes, family):
    """The export view of a call: named tensors that reproduce the diffusers call."""
    denoiser = diffquant.get_denoiser(pipes[family])
    adapter = get_adapter(denoiser)
    inputs = adapter.example_inputs(batch=2, size=8, seq_len=5)
    assert list(inputs) == list(adapter.input_names)
    with torch.no_grad():
        out = adapter.call(inputs)
        flat = adapter.flat_inputs((), {**inputs, "timestep": inputs["timestep"][0]})
        again = adapter.call(flat)
    assert out.shape[0] == 2 and out.shape[-2:] == inputs["hidden_states"].shape[-2:] and torch.equal(out, again)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_generates_on_openvino_like_its_fake_quant_model(pipes, family, caplog):
    """RTN W8A8 deployed on OpenVINO (the int graph where the CPU has VNNI, else the exact float graph) through the
    family's own pipeline call (Flux enters the denoiser's ``cache_context``): latents within 1 % of fake quant's."""
    pytest.importorskip("openvino")
    from diffquant.deployment.openvino import deploy_openvino
    from diffquant.runtime.openvino import OVDenoiser

    pipe = copy.deepcopy(pipes[family])
    quantize(pipe, family, "rtn", caplog)
    fake = latents(pipe, family)
    deployed = deploy_openvino(pipe)
    assert isinstance(diffquant.get_denoiser(deployed), OVDenoiser)
    out = latents(deployed, family)
    assert float((out - fake).norm() / fake.norm()) < 0.01


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_exports_to_onnx_and_runs_in_onnx_runtime(pipes, family, caplog, tmp_path):
    """Converted RTN W8A8 as an ONNX Q/DQ file that ONNX Runtime loads (PixArt's no-op token-axis Squeeze dropped),
    within 1 % of the converted torch model; the batch stays symbolic where the family allows it."""
    ort = pytest.importorskip("onnxruntime")
    from diffquant.runtime.flat import example_inputs
    from diffquant.runtime.onnx import export_onnx

    pipe = copy.deepcopy(pipes[family])
    quantize(pipe, family, "rtn", caplog)
    diffquant.convert(pipe, progress=False)
    denoiser = diffquant.get_denoiser(pipe)
    adapter = get_adapter(denoiser)
    path = export_onnx(pipe, tmp_path / "d.onnx", inputs=example_inputs(denoiser, batch=2, seq_len=8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 1) if adapter.dynamic_batch_export else (2,):
        inputs = example_inputs(denoiser, batch=batch, seq_len=8)
        out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            ref = adapter.call(inputs).numpy()
        assert out.shape == ref.shape and float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) < 0.01


def test_time_precalculation_refuses_a_family_without_a_time_path():
    from diffquant.learning import TimePrecalculation

    tables = TimePrecalculation.install(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="time precalculation does not support Sequential yet"):
        tables.precalculate(torch.tensor([1.0]), {})
