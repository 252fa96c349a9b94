"""EMF (seed 000): time precalculation, parallel batches, selective freezing, resume, end to end."""

from __future__ import annotations

import copy

import pytest
import torch

import diffquant
from diffquant import QuantConfig, QuantState
from diffquant.models.adapters import get_adapter
from diffquant.nn import quantized_layers, set_state
from diffquant.quant import TimestepGroups
from diffquant.learning import (
    QATConfig,
    QATTrainer,
    SerialDatasetConfig,
    TimePrecalculation,
    generate_serial_dataset,
    record_features,
)
from diffquant.sampling import SamplingSettings
from diffquant.wrap import float_layer_reasons, wrap_denoiser

from tinyutil import PROMPTS, calibration_config, sample_latents

# 16x16 images (8x8 latents) keep the fake-quantized attention cheap in the training tests.
SMALL = dict(height=16, width=16)
DATASET = SerialDatasetConfig(SamplingSettings(steps=4, guidance=5.0, height=16, width=16), steps_per_prompt=2, batch_size=4)


@pytest.fixture(scope="module")
def datasets(tiny_pipes):
    """A serial dataset per tiny family: 4 prompts x 2 random steps x (uncond, cond) rows."""
    return {family: generate_serial_dataset(tiny_pipes[family], PROMPTS, DATASET, progress=False) for family in ("sd", "sdxl", "sd3")}


def _time_outputs(denoiser, kwargs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    names = get_adapter(denoiser).time_layers()
    seen: dict[str, torch.Tensor] = {}
    hooks = [denoiser.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach().clone())) for n in names]
    with torch.no_grad():
        out = denoiser(**kwargs)[0]
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_time_precalculation_equals_live_computation(tiny_pipes, datasets, family):
    denoiser = copy.deepcopy(diffquant.get_denoiser(tiny_pipes[family]))
    dataset = datasets[family]
    rows = torch.arange(len(dataset))
    kwargs = dataset.kwargs(rows, "cpu", torch.float32)
    live, live_out = _time_outputs(denoiser, kwargs)
    assert live and all(v.shape[0] == len(dataset) for v in live.values())

    tables = TimePrecalculation.install(denoiser)
    tables.precalculate(dataset.timestep, dataset.conditioning(tables.condition_args))
    distinct = len({(float(t), i) for t, i in zip(dataset.timestep, dataset.prompt)})
    assert tables.entries() > 0 and len(tables.table(tables.layer_names[0])) <= distinct * 2
    looked_up, out = _time_outputs(denoiser, kwargs)
    assert tables.misses == 0  # every row came from the table, none computed live
    for name, value in live.items():
        torch.testing.assert_close(looked_up[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, live_out, rtol=1e-4, atol=1e-5)

    # In a pipeline: the whole schedule is precalculated on the first call; images match live computation.
    pipe = copy.copy(tiny_pipes[family])
    ref = sample_latents(tiny_pipes[family])
    setattr(pipe, "transformer" if family == "sd3" else "unet", denoiser)
    tables.attach_scheduler(pipe.scheduler)
    misses = tables.misses
    torch.testing.assert_close(sample_latents(pipe), ref, rtol=1e-4, atol=1e-4)
    assert tables.misses == misses
    tables.remove()
    assert "forward" not in vars(denoiser.get_submodule(tables.layer_names[0]))


def test_serial_dataset_rows_and_resume(tiny_pipes, datasets, tmp_path):
    dataset = datasets["sd"]
    assert len(dataset) == len(PROMPTS) * DATASET.steps_per_prompt * 2  # both guidance rows
    for p in range(len(PROMPTS)):
        assert len(set(dataset.step[dataset.prompt == p].tolist())) == DATASET.steps_per_prompt
    first = generate_serial_dataset(tiny_pipes["sd"], PROMPTS, DATASET, folder=tmp_path, progress=False)
    shard = tmp_path / "serial-00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    again = generate_serial_dataset(tiny_pipes["sd"], PROMPTS, DATASET, folder=tmp_path, progress=False)
    assert shard.stat().st_mtime_ns == stamp  # reused, not sampled again
    assert torch.equal(again.output[:], first.output[:]) and torch.equal(first.output[:], dataset.output[:])


def _learning_model(pipe, dataset, groups: int = 4, wbits: int = 4):
    denoiser = copy.deepcopy(diffquant.get_denoiser(pipe))
    config = QuantConfig(method="emf", wbits=wbits, abits=8)
    adapter = get_adapter(denoiser)
    record = wrap_denoiser(denoiser, config, groups=TimestepGroups.uniform(groups),
                           float_layers=float_layer_reasons(adapter, config, {n: "time" for n in adapter.time_layers()}))
    set_state(denoiser, QuantState.CALIBRATING)
    with torch.no_grad():
        denoiser(**dataset.kwargs(torch.arange(len(dataset)), "cpu", torch.float32))
    set_state(denoiser, QuantState.LEARNING)
    return denoiser, record


def test_parallel_batch_really_mixes_timesteps(tiny_pipes, datasets):
    dataset = datasets["sd"]
    parallel = dataset.batches("parallel", 8, 6, seed=0)
    serial = dataset.batches("serial", 8, 6, seed=0)
    mixed = [len(dataset.timestep[b].unique()) for b in parallel]
    assert min(mixed) >= 3, mixed
    assert all(len(dataset.prompt[b].unique()) >= 2 for b in parallel)
    assert max(len(dataset.timestep[b].unique()) for b in serial) <= 2  # serial batches follow the trajectories
    denoiser, record = _learning_model(tiny_pipes["sd"], dataset)
    seen = []
    quantizer = next(m.input_quantizer for m in quantized_layers(denoiser).values() if getattr(m, "input_quantizer", None) is not None)
    quantizer.register_forward_pre_hook(lambda m, a: seen.append(record.context.group))
    with torch.no_grad():
        denoiser(**dataset.kwargs(parallel[0], "cpu", torch.float32))
    assert torch.is_tensor(seen[0]) and len(seen[0].unique()) >= 2  # per-sample activation parameter groups


def test_frozen_weights_stop_changing(tiny_pipes, datasets):
    dataset = datasets["sd"]
    denoiser, _ = _learning_model(tiny_pipes["sd"], dataset)
    # A large weight learning rate makes weights flip between levels; freeze what oscillated by step 3.
    config = QATConfig(iterations=6, batch_size=4, lr_weights=1e-3, lr_scales=0.0, feature_weight=0.0, freeze_at=[0.5],
                       freeze_threshold=0.3, checkpoint_every=0)
    trainer = QATTrainer(denoiser, dataset, config, sensitive_layers=[], progress=False)
    snapshots = {}

    def callback(iteration, history):  # runs after the iteration's freezing round
        if iteration == 3:
            snapshots.update({n: m.weight_quantizer.integer_codes(m.weight).clone() for n, m in trainer.layers.items()})

    history = trainer.train(callback)
    event = history["freeze_events"][0]
    assert event["iteration"] == 3 and event["frozen"] > 0 and event["scope"] == "all layers"
    assert trainer.freezer.frozen_count() == event["frozen"]
    moved_unfrozen = 0
    for name, module in trainer.layers.items():
        frozen = trainer.freezer.state[name]["frozen"].reshape(module.weight.shape)
        codes = module.weight_quantizer.integer_codes(module.weight)
        assert torch.equal(codes[frozen], snapshots[name][frozen])  # unchanged since the freezing round
        assert torch.equal(codes[frozen], trainer.freezer.state[name]["frozen_codes"].reshape(module.weight.shape)[frozen].to(codes.dtype))
        moved_unfrozen += int((codes[~frozen] != snapshots[name][~frozen]).sum())
    assert moved_unfrozen > 0  # the rest kept training


def test_training_resumes_from_checkpoint(tiny_pipes, datasets, tmp_path):
    dataset = datasets["sd3"]
    sensitive = [n for n, m in quantized_layers(_learning_model(tiny_pipes["sd3"], dataset)[0]).items() if m.weight_quantizer is not None][:2]
    config = QATConfig(iterations=6, batch_size=4, lr_weights=1e-4, lr_scales=1e-4, freeze_at=[0.5], freeze_threshold=0.2,
                       checkpoint_every=2)

    def build(folder):
        denoiser, _ = _learning_model(tiny_pipes["sd3"], dataset)
        diffquant.set_quant_enabled(denoiser, False)
        record_features(denoiser, dataset, sensitive, progress=False)
        diffquant.set_quant_enabled(denoiser, True)
        return QATTrainer(denoiser, dataset, config, sensitive, checkpoint_dir=folder, progress=False)

    straight = build(tmp_path / "a")
    straight.train()

    class Killed(Exception):
        pass

    def kill_at_5(iteration, history):
        if iteration == 5:
            raise Killed

    interrupted = build(tmp_path / "b")
    with pytest.raises(Killed):
        interrupted.train(kill_at_5)
    resumed = build(tmp_path / "b")
    assert resumed.try_resume() and resumed.iteration == 4
    resumed.train()
    assert resumed.history["loss"] == pytest.approx(straight.history["loss"], rel=1e-5)
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=1e-5, atol=1e-7)
    assert resumed.freezer.frozen_count() == straight.freezer.frozen_count()


@pytest.mark.parametrize("family,options", [
    ("sd", dict(weight_training="full", mixed_precision_layers=2, sensitivity_rows=2)),
    ("sd3", dict(weight_training="lowrank", lowrank_rank=2,
                 sensitive_layers=["transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn.to_out.0"])),
])
def test_emf_end_to_end(tiny_pipes, family, options, tmp_path):
    pipe = copy.deepcopy(tiny_pipes[family])
    ref = sample_latents(pipe, **SMALL)
    cfg = QuantConfig(method="emf", wbits=4, abits=8, calibration=calibration_config(height=16, width=16),
                      options=dict(steps_per_prompt=2, iterations=6, batch_size=4, distill_layers=2, checkpoint_every=3, **options))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, workdir=tmp_path / "work", progress=False)
    denoiser = diffquant.get_denoiser(pipe)
    report = diffquant.quant_record(denoiser).report["emf"]
    assert report["time_precalculation"]["misses_during_training"] == 0
    assert len(report["train"]["loss"]) == 6 and all(torch.isfinite(torch.tensor(report["train"]["loss"])))
    assert len(report["sensitive_layers"]) == 2
    assert ((tmp_path / "work" / "emf" / "sensitivity.png").is_file()) == ("sensitive_layers" not in options)
    assert diffquant.nn.states(denoiser) == {"frozen": len(quantized_layers(denoiser))}
    assert not any("parametrizations" in k for k in denoiser.state_dict())  # low-rank adapters merged
    time_layers = set(get_adapter(denoiser).time_layers())
    assert time_layers and not time_layers & set(quantized_layers(denoiser))
    if options.get("mixed_precision_layers"):
        assert len(report["mixed_precision_layers"]) == 2
        assert 4 < report["average_bits"]["weight_bits"]
    out = sample_latents(pipe, **SMALL)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.6, err

    folder = diffquant.save(pipe, tmp_path / "q")
    loaded = diffquant.load(folder)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample_latents(loaded, **SMALL), out, rtol=1e-4, atol=1e-4)  # time layers live after load


def test_emf_with_quantized_time_layers_has_the_nominal_bits(tiny_pipes, tmp_path):
    """time_layers="quantized": the time layers are quantized like RTN's (same average weight bits), the tables cache
    their quantized outputs, and a reload computing them live gives the same images."""
    pipe = copy.deepcopy(tiny_pipes["sd3"])
    cfg = QuantConfig(method="emf", wbits=4, abits=8, calibration=calibration_config(height=16, width=16),
                      options=dict(steps_per_prompt=2, iterations=4, batch_size=4, distill_layers=1, sensitivity_rows=2,
                                   time_layers="quantized"))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, progress=False)
    denoiser = pipe.transformer
    time_layers = set(get_adapter(denoiser).time_layers())
    assert time_layers and time_layers <= set(quantized_layers(denoiser))
    report = diffquant.quant_record(denoiser).report["emf"]
    assert report["time_precalculation"]["time_layers"] == "quantized" and report["time_precalculation"]["table_entries"] > 0
    rtn = copy.deepcopy(tiny_pipes["sd3"])
    diffquant.quantize(rtn, QuantConfig(method="rtn", wbits=4, abits=None), progress=False)
    assert report["average_bits"]["weight_bits"] == pytest.approx(diffquant.average_bits(rtn.transformer)["weight_bits"])
    out = sample_latents(pipe, **SMALL)
    assert torch.isfinite(out).all()
    loaded = diffquant.load(diffquant.save(pipe, tmp_path / "q"))
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample_latents(loaded, **SMALL), out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="time_layers must be one of float, quantized"):
        QuantConfig(method="emf", options={"time_layers": "int4"})


def test_serial_dataset_refuses_batches_whose_shared_inputs_differ():
    """Flux's img_ids/txt_ids are one tensor for the whole dataset: batches sampled at other sizes are refused."""
    from diffquant.learning.dataset import SerialDataset

    def part(ids: torch.Tensor) -> SerialDataset:
        return SerialDataset({"sample": torch.zeros(1, 2)}, torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), {"img_ids": ids})

    merged = SerialDataset.concat([part(torch.zeros(4, 3)), part(torch.zeros(4, 3))])
    assert merged.inputs["sample"].shape[0] == 2 and torch.equal(merged.shared["img_ids"], torch.zeros(4, 3))
    with pytest.raises(ValueError, match="differ between batches; sample every batch at the same size"):
        SerialDataset.concat([part(torch.zeros(4, 3)), part(torch.ones(4, 3))])


def test_training_state_that_cannot_fit_is_refused_before_any_work(tiny_pipes, monkeypatch):
    """On a machine without room for the gradients and Adam moments of every weight plus selective freezing's flip
    statistics, EMF says so and names the fixes before the serial dataset is generated (an SDXL-sized UNet needs
    ~60 GiB for them: it was OOM-killed minutes in); without freezing rounds no statistics are kept at all."""
    import diffquant.learning.qat as qat
    import diffquant.methods.emf as emf_method
    from diffquant.learning.freezing import BYTES_PER_WEIGHT

    pipe = copy.deepcopy(tiny_pipes["sd"])
    weights = sum(m.weight.numel() for m in pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    full = weights * (12 + BYTES_PER_WEIGHT)  # float32 weights: gradient + two moments, then the freezer's state
    monkeypatch.setattr(qat, "available_memory", lambda: full - 1)  # one byte short
    generated = []
    monkeypatch.setattr(emf_method, "generate_serial_dataset", lambda *a, **k: generated.append(1))
    cfg = QuantConfig(method="emf", calibration=calibration_config(num_prompts=2, **SMALL))
    with pytest.raises(ValueError, match=r"weight_training=lowrank.*freeze_at=\[\]"):
        diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    assert not generated
    monkeypatch.setattr(qat, "available_memory", lambda: full)  # enough: the check passes
    qat.check_training_memory(pipe.unet, QATConfig())
    monkeypatch.setattr(qat, "available_memory", lambda: weights * 12)  # room for full training without freezing
    qat.check_training_memory(pipe.unet, QATConfig(freeze_at=[]))
    monkeypatch.setattr(qat, "available_memory", lambda: weights * BYTES_PER_WEIGHT - 1)
    with pytest.raises(ValueError, match="flip statistics"):
        qat.check_training_memory(pipe.unet, QATConfig(weight_training="none"))


def test_no_freezing_rounds_keep_no_flip_statistics(tiny_pipes, datasets):
    denoiser, _ = _learning_model(tiny_pipes["sd"], datasets["sd"])
    trainer = QATTrainer(denoiser, datasets["sd"], QATConfig(iterations=2, batch_size=4, freeze_at=[], feature_weight=0.0,
                                                             checkpoint_every=0), [], progress=False)
    history = trainer.train()
    assert trainer.freezer.state == {} and history["flip_rate"] == [] and len(history["loss"]) == 2


def test_gradient_checkpointing_trains_the_same_weights(tiny_pipes, monkeypatch):
    """gradient_checkpointing recomputes each block in the backward (diffusers' checkpointing turned on for training
    only): the trained model equals the one trained keeping every activation."""
    results, used = [], []
    unet_class = type(tiny_pipes["sd"].unet)
    enable = unet_class.enable_gradient_checkpointing
    monkeypatch.setattr(unet_class, "enable_gradient_checkpointing", lambda self: (used.append(1), enable(self)))
    for checkpointing in (False, True):
        pipe = copy.deepcopy(tiny_pipes["sd"])
        used.clear()
        cfg = QuantConfig(method="emf", wbits=4, abits=8, calibration=calibration_config(num_prompts=2, **SMALL),
                          options=dict(steps_per_prompt=2, iterations=3, batch_size=4, distill_layers=2, sensitivity_rows=2,
                                       gradient_checkpointing=checkpointing))
        diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
        assert bool(used) == checkpointing and not pipe.unet.is_gradient_checkpointing
        results.append(pipe.unet.state_dict())
    plain, recomputed = results
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
