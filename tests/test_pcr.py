"""PCR: progressive calibration on the quantized trajectory, per-step sensitivity, activation relaxing."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import diffquant
from diffquant import QuantConfig
from diffquant.calibration import progressive
from diffquant.calibration.progressive import activation_quantizers
from diffquant.calibration.sensitivity import most_sensitive_steps
from diffquant.nn import states
from diffquant.sampling import SamplingSettings, denoiser_calls, sample

from tinyutil import PROMPTS, calibration_config

STEPS = 3
RUN = SamplingSettings(STEPS, 5.0, 32, 32, seed=0)  # what calibration_config below samples, on PROMPTS[:1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here: on the shared, loaded 2-core machine two threads ran tiny sampling ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**options) -> QuantConfig:
    return QuantConfig(method="pcr", wbits=8, abits=8, calibration=calibration_config(num_prompts=1, num_inference_steps=STEPS),
                       options={"sensitivity_prompts": 1, **options})


def _trajectory_inputs(pipe, run: SamplingSettings = RUN) -> list[torch.Tensor]:
    """The latents each denoiser call receives while ``pipe`` samples ``run``."""
    seen: list[torch.Tensor] = []
    with denoiser_calls(pipe, before=lambda call: seen.append(call.args[0].clone())):
        sample(pipe, PROMPTS[:1], run)
    return seen


@pytest.fixture(scope="module")
def pcr_sd(tiny_pipes):
    """Tiny SD quantized with PCR (relaxing the most sensitive third of 3 steps), and what calibration observed."""
    pipe = copy.deepcopy(tiny_pipes["sd"])
    observed: dict[int, torch.Tensor] = {}
    original = progressive.fit_group_from_call

    def recording(denoiser, group, args, kwargs, seed=0):
        observed[group] = args[0].clone()  # the last pass wins, as its parameters are the final ones
        original(denoiser, group, args, kwargs, seed=seed)

    progressive.fit_group_from_call = recording
    try:
        # The paper's literal ranges: the level count below needs the relaxed step's range fitted to its own data.
        diffquant.quantize(pipe, _config(relax_fraction=0.34, step_ranges="literal"), calibration=PROMPTS, progress=False)
    finally:
        progressive.fit_group_from_call = original
    return {"pipe": pipe, "fp": tiny_pipes["sd"], "observed": observed}


def test_progressive_calibration_sees_the_quantized_trajectory(pcr_sd):
    unet = pcr_sd["pipe"].unet
    record = diffquant.quant_record(unet)
    quantized = _trajectory_inputs(pcr_sd["pipe"])
    fp = _trajectory_inputs(pcr_sd["fp"])
    group_of_step = record.report["pcr"]["group_of_step"]
    assert sorted(pcr_sd["observed"]) == sorted(group_of_step)
    for step, group in enumerate(group_of_step):
        assert torch.allclose(pcr_sd["observed"][group], quantized[step], atol=1e-6, rtol=0), step
    assert torch.equal(quantized[0], fp[0])  # nothing is quantized before the first step
    for step in range(1, STEPS):  # later steps: calibration inputs carry the quantization error, unlike FP's
        assert not torch.allclose(pcr_sd["observed"][group_of_step[step]], fp[step], atol=1e-4, rtol=0), step
    assert states(unet) == {"frozen": len(diffquant.quantized_layers(unet))}


def test_sensitivity_has_one_entry_per_step_and_picks_the_worst(pcr_sd):
    report = diffquant.quant_record(pcr_sd["pipe"].unet).report["pcr"]
    sensitivity = json.loads(json.dumps(report["sensitivity"]))
    entries = sensitivity["steps"]
    assert [e["step"] for e in entries] == list(range(STEPS))
    assert [e["timestep"] for e in entries] == report["calibration_timesteps"]
    assert all(e["final_rel_mse"] > 0 and e["step_rel_mse"] > 0 and math.isfinite(e["final_rel_mse"]) for e in entries)
    worst = max(entries, key=lambda e: e["final_rel_mse"])["step"]
    assert report["relaxed_steps"] == [worst]


def test_relaxed_steps_run_at_higher_bits_and_others_do_not(pcr_sd):
    unet = pcr_sd["pipe"].unet
    record = diffquant.quant_record(unet)
    report = record.report["pcr"]
    relaxed = set(report["relaxed_steps"])
    for q in activation_quantizers(unet):
        for step, group in enumerate(report["group_of_step"]):
            assert int(q.bits[group]) == (10 if step in relaxed else 8)
    # At run time: the input grid of conv_in has more than 2^8 levels only at the relaxed step.
    quantizer = unet.conv_in.input_quantizer
    levels: list[int] = []

    def count_levels(module, args, output):
        group = record.context.group
        levels.append(len(torch.unique(torch.round(output / module.scale[group, 0]))))

    handle = quantizer.register_forward_hook(count_levels)
    try:
        sample(pcr_sd["pipe"], PROMPTS[:1], RUN)
    finally:
        handle.remove()
    for step, count in enumerate(levels):
        assert (count > 256) if step in relaxed else (count <= 256), (step, count)


def test_average_activation_bits(pcr_sd, tmp_path):
    unet = pcr_sd["pipe"].unet
    report = diffquant.quant_record(unet).report
    k = len(report["pcr"]["relaxed_steps"])
    expected = (8 * (STEPS - k) + 10 * k) / STEPS
    assert k == 1
    assert report["pcr"]["average_step_activation_bits"] == pytest.approx(expected)
    # Over the whole denoiser (diffquant.bits): every quantized MAC's input at the step mean of its 8/10-bit
    # groups, each float one (layers the method keeps float) at 32 bits.
    bits = diffquant.average_bits(unet)
    whole = expected * bits["mac_coverage"] + 32 * (1 - bits["mac_coverage"])
    assert 0 < bits["mac_coverage"] <= 1 and bits["activation_bits"] == pytest.approx(whole)
    assert report["activation_bits"] == pytest.approx(whole)
    folder = diffquant.save(pcr_sd["pipe"], tmp_path / "q")
    from diffquant.inspect import describe

    summary = describe(folder)
    assert summary["average_activation_bits"] == pytest.approx(whole)
    assert summary["report"]["pcr"]["relaxed_steps"] == report["pcr"]["relaxed_steps"]


def test_other_step_count_maps_to_nearest_calibrated_step(pcr_sd):
    unet = pcr_sd["pipe"].unet
    record = diffquant.quant_record(unet)
    calibrated = record.report["pcr"]["calibration_timesteps"]
    seen: list[tuple[float, int]] = []
    with denoiser_calls(unet, before=lambda call: seen.append((float(call.args[1]), int(record.context.group)))):
        sample(pcr_sd["pipe"], PROMPTS[:1], RUN.replace(steps=7))
    assert len(seen) == 7
    for t, group in seen:
        nearest = min(range(STEPS), key=lambda s: abs(calibrated[s] - t))
        assert group == record.report["pcr"]["group_of_step"][nearest], (t, group)
    assert len({g for _, g in seen}) == STEPS


def test_explicit_relax_steps_on_sd3(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd3"])
    cfg = QuantConfig(method="pcr", wbits=4, abits=6, calibration=calibration_config(num_prompts=2, num_inference_steps=3),
                      options={"relax_steps": [0, 2], "relax_bits": 9, "sensitivity_prompts": 0})
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, progress=False)
    report = diffquant.quant_record(pipe.transformer).report
    assert report["pcr"]["relaxed_steps"] == [0, 2] and report["pcr"]["sensitivity"] is None
    quantizers = activation_quantizers(pipe.transformer)
    softmax = sum(q.spec.unsigned for q in quantizers)  # softmax outputs keep their own 8-bit width unless relaxed above it
    assert 0 < softmax < len(quantizers)
    plain_step = (6 * (len(quantizers) - softmax) + 8 * softmax) / len(quantizers)
    assert report["pcr"]["step_activation_bits"] == pytest.approx([9.0, plain_step, 9.0])
    # The paper's figure (mean over steps) and the whole-denoiser one, MAC-weighted with float parts at 32 (diffquant.bits).
    assert report["pcr"]["average_step_activation_bits"] == pytest.approx((9 + plain_step + 9) / 3)
    assert report["activation_bits"] == pytest.approx(diffquant.average_bits(pipe.transformer)["activation_bits"])


def test_bad_input_is_refused(tiny_pipes):
    with pytest.raises(ValueError, match="relax_fraction must be within"):
        QuantConfig(method="pcr", options={"relax_fraction": 2})
    with pytest.raises(ValueError, match="relax_steps=.first.: expected a comma list of an integer or none"):
        QuantConfig(method="pcr", options={"relax_steps": "first"})
    with pytest.raises(ValueError, match="sensitivity_metric"):
        QuantConfig(method="pcr", options={"sensitivity_metric": "fid"})
    with pytest.raises(ValueError, match="step_ranges must be one of literal, pooled_shrink"):
        QuantConfig(method="pcr", options={"step_ranges": "mean"})
    with pytest.raises(ValueError, match="needs the pipeline"):
        diffquant.quantize(copy.deepcopy(tiny_pipes["sd"].unet), _config(), progress=False)


def test_most_sensitive_steps_rounds_the_fraction():
    sensitivity = {"steps": [{"step": s, "final_rel_mse": float(v), "step_rel_mse": float(-v)} for s, v in enumerate([5, 1, 9, 3, 7, 2, 0, 4, 8, 6])]}
    assert most_sensitive_steps(sensitivity, 0.2) == [2, 8]
    assert most_sensitive_steps(sensitivity, 0.2, metric="step") == [1, 6]
    assert most_sensitive_steps(sensitivity, 0.01) == [2]
    assert most_sensitive_steps(sensitivity, 0.0) == []


@pytest.mark.slow
def test_weight_reconstruction_reuses_qdiffusion_code(tiny_pipes):
    pytest.importorskip("diffquant.learning.reconstruction")
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = _config(reconstruct_weights=True, reconstruction_iterations=40, relax_fraction=0.0, sensitivity_prompts=0)
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, progress=False)
    report = diffquant.quant_record(pipe.unet).report["pcr"]
    recon = report["reconstruction"]
    assert recon["blocks"] > 5 and report["relaxed_steps"] == []
    assert recon["weight_loss_sum"] < recon["rtn_loss_sum"], recon  # AdaRound lowered the block reconstruction error
    assert states(pipe.unet) == {"frozen": len(diffquant.quantized_layers(pipe.unet))}


def test_range_prior_widens_by_the_evidence_and_never_narrows():
    from diffquant.quant import ActivationQuantizer, QuantSpec

    q = ActivationQuantizer(QuantSpec(bits=8), num_groups=2)
    q.set_group_range(0, torch.tensor([-1.0]), torch.tensor([1.0]))
    q.set_group_range(1, torch.tensor([-3.0]), torch.tensor([3.0]))
    lo, hi = q.group_range(1)
    assert torch.allclose(hi, torch.tensor([3.0])) and torch.allclose(lo, -hi)  # set_group_range inverts group_range
    progressive.RangePrior([(torch.tensor([-4.0]), torch.tensor([4.0]))], prior_samples=8).apply([q], 0, samples=8)
    assert torch.allclose(q.group_range(0)[1], torch.tensor([2.5]))  # halfway: the pooled range counts as much as the step's 8
    progressive.RangePrior([(torch.tensor([-2.0]), torch.tensor([2.0]))], prior_samples=8).apply([q], 1, samples=8)
    assert torch.allclose(q.group_range(1)[1], torch.tensor([3.0]))  # a pooled range inside the step's own leaves it


def _clipped_elements(pipe, calls) -> int:
    """Activation elements beyond their group's range by more than one grid step, over ``calls`` replayed through ``pipe``."""
    counts = []

    def count(q, args, out):
        x, group = args[0], q.current_group()
        lo, hi = (q.broadcast_param(v, x, False) for v in q.group_range(group))
        step = q.broadcast_param(q.scale[group].detach(), x, False)
        counts.append(int(((x < lo - step) | (x > hi + step)).sum()))

    hooks = [q.register_forward_hook(count) for q in activation_quantizers(pipe.unet)]
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                pipe.unet(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return sum(counts)


def test_robust_step_ranges_clip_a_held_out_prompt_less_than_the_literal_ones(tiny_pipes):
    calls = []
    with denoiser_calls(tiny_pipes["sd"], before=lambda c: calls.append((c.args, c.kwargs))):
        sample(tiny_pipes["sd"], PROMPTS[2:4], RUN.replace(seed=5))  # held out: calibration sees PROMPTS[:1] only
    clipped = {}
    for form in ("literal", "pooled_shrink"):
        pipe = copy.deepcopy(tiny_pipes["sd"])
        diffquant.quantize(pipe, _config(step_ranges=form, relax_fraction=0.0, sensitivity_prompts=0), calibration=PROMPTS,
                           progress=False)
        clipped[form] = _clipped_elements(pipe, calls)
    assert clipped["literal"] > 0
    assert clipped["pooled_shrink"] < clipped["literal"], clipped
