"""Deployment on OpenVINO (and ONNX Q/DQ) with diffquant's own scales, every family, every timestep group."""

from __future__ import annotations

import copy

import pytest
import torch

import diffquant
from diffquant import QuantConfig
from diffquant.models.adapters import get_adapter
from diffquant.quant import ActivationQuantizer
from diffquant.quant.affine import qrange

from tinyutil import PROMPTS, calibration_config

ov = pytest.importorskip("openvino")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def carried(out: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine between ``out - other`` and ``own - other``: near 1 when ``out`` differs from ``other`` the way ``own`` does."""
    a, b = (out - other).flatten().float(), (own - other).flatten().float()
    return float(a @ b / (a.norm() * b.norm()))


def fake_quant_out(denoiser, inputs: dict, group: int) -> torch.Tensor:
    """The torch fake-quant prediction with timestep group ``group`` forced."""
    context = diffquant.quant_record(denoiser).context
    context.force(group)
    try:
        with torch.no_grad():
            return get_adapter(denoiser).call(inputs)
    finally:
        context.force(None)


@pytest.fixture(scope="module")
def two_groups(tiny_pipes):
    """Tiny SD, RTN W8A8 with two timestep groups whose scales and zero points differ on purpose: by 3x, so the groups'
    outputs differ (~23 %) far more than the int graph's int8 rounding moves this random-weight model (~5 %)."""
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, timestep_groups=2, calibration=calibration_config(num_prompts=2))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    with torch.no_grad():
        for q in pipe.unet.modules():
            if isinstance(q, ActivationQuantizer) and q.mode == "quantize":
                qmin, qmax = (float(v) for v in qrange(int(q.bits[1]), q.spec.symmetric, q.spec.unsigned))
                q.scale[1] = q.scale[0] * 3.0
                if not q.spec.unsigned:
                    q.zero_point[1] = (q.zero_point[0] + 7).clamp(qmin, qmax)
    return pipe


def sd_inputs(unet, t: float) -> dict:
    from diffquant.runtime.flat import example_inputs

    inputs = example_inputs(unet, batch=2, seq_len=16)
    inputs["timestep"] = torch.full((2,), t)
    return inputs


def test_graphs_reach_every_group_layer_by_layer(two_groups):
    """Each integer layer's OpenVINO form (int graph: constant FakeQuantize of group 0 with x / r + d before and
    r * (y - d op(1)) after; float graph: gathered fake quantization), run in torch on the layer's real input,
    gives that group's fake-quant output, for both groups (zero points differ, so the shift terms are live)."""
    from diffquant.runtime.modules import IntLayer
    from diffquant.runtime.ovgraph import _int_layer_forward, _State, convert, plan_groups

    work = copy.deepcopy(two_groups.unet)
    convert(work, backend="float", progress=False)
    plan = plan_groups(work)
    assert plan.int_groups == [0, 1] and plan.float_groups == []
    errors: dict[tuple, float] = {}
    for graph in ("int", "float"):
        st = _State(plan, graph)
        for group in (0, 1):
            st.group = torch.tensor([group])

            def check(layer, args, out, graph=graph, group=group, st=st):
                rendered = _int_layer_forward(layer, st)(args[0])
                errors[(graph, group, id(layer))] = rel_err(rendered, out)

            hooks = [m.register_forward_hook(check) for m in work.modules() if isinstance(m, IntLayer)]
            try:
                fake_quant_out(work, sd_inputs(work, 500.0), group)
            finally:
                for h in hooks:
                    h.remove()
    # x / r rounds once more than x / s: a code can land on its neighbour (a few elements in a million)
    assert len(errors) > 4 * 30 and max(errors.values()) < 1e-3
    assert sum(e > 1e-5 for e in errors.values()) < 0.05 * len(errors)


def test_relaxed_groups_go_to_the_float_graph(two_groups):
    """PCR-style relaxed steps (10-bit activations in one group) cannot share the int8 grid: the plan sends
    them to the float graph, the other groups stay int8."""
    from diffquant.runtime.ovgraph import plan_groups

    unet = copy.deepcopy(two_groups.unet)
    for q in unet.modules():
        if isinstance(q, ActivationQuantizer) and q.mode == "quantize":
            q.bits[1] = 10
    plan = plan_groups(unet)
    assert (plan.int_groups, plan.float_groups, plan.ref) == ([0], [1], 0)


def test_tracing_leaves_the_model_whole(two_groups):
    """The graphs are traced from a copy that shares the model's float tensors (a full-size UNet is not held twice):
    the model keeps its fake-quant layers and every tensor's values."""
    from diffquant.runtime.modules import IntLayer
    from diffquant.runtime.ovgraph import quantized_models

    before = {k: v.clone() for k, v in two_groups.unet.state_dict().items()}
    quantized_models(two_groups.unet, sd_inputs(two_groups.unet, 500.0), graphs=("float",))
    after = two_groups.unet.state_dict()
    assert not any(isinstance(m, IntLayer) for m in two_groups.unet.modules())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attention_output_quantizers_sit_on_the_attention(rtn_results):
    """The int graph quantizes each attention output where OpenVINO fuses the quantizer (on the attention op, before the
    head transpose and reshape), not behind them, where it ran standalone in f32 (one timestep group: with several, the
    group's shift sits between them and stays)."""
    from diffquant.runtime.ovgraph import quantized_models

    unet = rtn_results[("sd", 8)]["pipe"].unet
    models, _ = quantized_models(unet, sd_inputs(unet, 100.0), graphs=("int",))
    source = {op.get_friendly_name(): op.input(0).get_source_output().get_node().get_type_name()
              for op in models["int"].get_ordered_ops() if op.get_type_name() == "FakeQuantize"}
    to_out = {name: kind for name, kind in source.items() if ".to_out.0/" in name}
    assert to_out and set(to_out.values()) <= {"ScaledDotProductAttention", "MatMul"}, to_out


def test_one_group_int_graph_in_memory_follows_fake_quant(rtn_results, tiny_pipes):
    """A one-group model (quantized attention, the default) traced in memory and run on the int graph gives the
    fake-quant output: session 13 found that moving the q/k/v quantizers of a quantized attention over the head reshape
    onto the projection made OpenVINO's CPU plugin return an empty tensor ([0, 4, 0, 0]) for the whole UNet."""
    from diffquant.runtime.openvino import OVDenoiser

    pipe = rtn_results[("sd", 8)]["pipe"]
    inputs = sd_inputs(pipe.unet, 500.0)
    den = OVDenoiser.from_denoiser(pipe, inputs=inputs, graph="int", threads=1)
    out = den(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    assert out.shape == inputs["sample"].shape
    assert_follows_fake_quant(out, pipe.unet, tiny_pipes["sd"].unet, inputs)


def assert_follows_fake_quant(out: torch.Tensor, unet, fp_unet, inputs: dict) -> None:
    """The int graph's output is nearer the fake-quant output than the float model is, and differs from the float
    output the way fake quant does. Not tighter: on the random tiny UNet OpenVINO's int8 kernels round a few
    activations to the neighbouring code, which its layers amplify (0.04-0.055 from fake quant at 1-2 threads, the
    float model 0.085 away; cosine of the deviations 0.79-0.87)."""
    ref = fake_quant_out(unet, inputs, 0)
    with torch.no_grad():
        fp = get_adapter(fp_unet).call(inputs)
    assert rel_err(out, ref) < rel_err(fp, ref), (rel_err(out, ref), rel_err(fp, ref))
    assert carried(out, ref, fp) > 0.6, carried(out, ref, fp)


def test_time_tables_are_traced_live(tiny_pipes):
    """A model with EMF's time lookup tables (float time layers) traces those layers live: the OpenVINO output follows
    each call's timestep (a traced lookup replays the example call's rows at every step: EMF models generated
    nothing), and the model's own tables go on working after the trace."""
    from diffquant.learning import TimePrecalculation
    from diffquant.runtime.openvino import OVDenoiser

    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(method="rtn", float_time_layers=True, calibration=calibration_config(num_prompts=2))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    tables = TimePrecalculation.install(pipe.unet)
    fake_quant_out(pipe.unet, sd_inputs(pipe.unet, 500.0), 0)  # the example call's rows are in the tables, as after sampling
    den = OVDenoiser.from_denoiser(pipe, inputs=sd_inputs(pipe.unet, 500.0), graph="float", threads=1)
    for t in (900.0, 100.0):
        inputs = sd_inputs(pipe.unet, t)
        out = den(inputs["sample"], torch.tensor(t), encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        own = fake_quant_out(pipe.unet, inputs, 0)
        other_t = fake_quant_out(pipe.unet, {**inputs, "timestep": torch.full((2,), 500.0)}, 0)
        assert rel_err(out, own) < 0.5 * rel_err(out, other_t), t
    assert not tables.bypass and tables.entries() >= 3


@pytest.fixture(scope="module")
def exported(two_groups, tmp_path_factory):
    from diffquant.deployment.openvino import export_openvino

    folder = tmp_path_factory.mktemp("ov") / "q-ov"
    return export_openvino(two_groups, folder)


def test_openvino_denoiser_uses_each_steps_group(two_groups, exported):
    """Loaded from the exported IR, the denoiser picks the group from the timestep and gives that group's
    fake-quant output, not the other's: the output differs from the other group's as this group's does (cosine of the
    two differences; 0.87-1.0 measured, 0.02-0.28 for the wrong group). The tiny model has random weights, so the
    rounding flips of int8 kernels and of thread-split GEMMs move its output up to ~12 % (AVX-512, 2 threads): a plain
    distance says little; layer-level exactness is the test above, image PSNR is in docs/runtime.md."""
    from diffquant.runtime.openvino import OVDenoiser, cpu_has_vnni

    assert (exported / "unet" / "denoiser.xml").is_file() and (exported / "model_index.json").is_file()
    graphs = ["float"] + (["int"] if cpu_has_vnni() else [])  # without VNNI int8 kernels saturate (docs/runtime.md)
    for graph in graphs:
        den = OVDenoiser.from_folder(exported, graph=graph, threads=1)
        assert den.config.in_channels == two_groups.unet.config.in_channels
        for t, group in ((900.0, 1), (100.0, 0)):
            inputs = sd_inputs(two_groups.unet, t)
            out = den(inputs["sample"], torch.tensor(t), encoder_hidden_states=inputs["encoder_hidden_states"]).sample
            own = fake_quant_out(two_groups.unet, inputs, group)
            other = fake_quant_out(two_groups.unet, inputs, 1 - group)
            assert den.calls[-1] == group
            assert rel_err(out, own) < rel_err(out, other), (graph, t)
            assert carried(out, own, other) > 0.75, (graph, t)


def test_openvino_refuses_a_batch_mixing_groups(exported):
    """One OpenVINO call serves one timestep group: a batch with samples in two groups is refused in one line."""
    from diffquant.runtime.openvino import OVDenoiser

    den = OVDenoiser.from_folder(exported, graph="float", threads=1)
    with pytest.raises(ValueError, match="a batch mixing timestep groups"):
        den.group_of(torch.tensor([900.0, 100.0]))
    assert den.group_of(torch.tensor([900.0, 900.0])) == 1


def test_generate_backend_openvino_writes_an_image(exported, tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app

    out = tmp_path / "img.png"
    result = CliRunner().invoke(app, ["generate", "--model", str(exported), "--backend", "openvino", "--prompt",
                                      "a red circle", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (32, 32)


def test_eval_backend_openvino_scores_the_deployed_images(two_groups, exported, tiny_pipes, tmp_path):
    """``eval --backend openvino`` evaluates the deployed model like any other: paired with FP on the same noise, its
    images near the fake-quant model's (same score within 1 dB), cached under its own fingerprint, reported at the
    quantized model's coverage and bits (the exported folder carries them; the graph has no torch layers to count)."""
    import json

    from typer.testing import CliRunner

    from diffquant.cli import app

    tiny_pipes["sd"].save_pretrained(tmp_path / "fp")
    diffquant.save(two_groups, tmp_path / "q")
    (tmp_path / "p.txt").write_text("a red circle on the left\na blue square on the right\n")
    common = ["--reference", str(tmp_path / "fp"), "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--metrics", "psnr",
              "--cache-dir", str(tmp_path / "cache")]
    rows = {}
    for name, model, extra in (("ov", exported, ["--backend", "openvino"]), ("fq", tmp_path / "q", [])):
        result = CliRunner().invoke(app, ["eval", "--model", str(model), "--out", str(tmp_path / name), *common, *extra])
        assert result.exit_code == 0, result.output
        rows[name] = json.loads((tmp_path / name / "results.json").read_text())["models"][0]
    assert rows["ov"]["label"] == "q-ov-openvino" and rows["ov"]["generation"]["generated"] == 2
    assert rows["ov"]["fingerprint"] != rows["fq"]["fingerprint"]
    assert abs(rows["ov"]["summary"]["psnr"] - rows["fq"]["summary"]["psnr"]) < 1.0
    for key in ("weight_coverage", "mac_coverage", "avg_wbits", "avg_abits"):
        assert rows["ov"]["summary"][key] == pytest.approx(rows["fq"]["summary"][key]), key
    assert rows["ov"]["summary"]["weight_coverage"] > 0.9


def test_deployed_models_have_their_own_fingerprint(tiny_pipes):
    """An ``OVDenoiser`` has no weights: its ``identity`` buffer (the graphs it runs, its groups, graph and precision)
    keeps two deployed models apart in the image cache, and the same graph keeps the same fingerprint."""
    import numpy as np
    import openvino.opset13 as ops

    from diffquant.evaluation.paired import model_fingerprint
    from diffquant.runtime.openvino import OVDenoiser

    def graph(shift: float):
        x = ops.parameter([-1, 4, 8, 8], np.float32, name="sample")
        return ov.Model([ops.add(x, ops.constant(np.full((1, 4, 1, 1), shift, np.float32)))], [x], "tiny")

    pipe = tiny_pipes["sd"]
    config, name = dict(pipe.unet.config), type(pipe.unet).__name__
    prints = []
    for shift, precision in ((1.0, "f32"), (2.0, "f32"), (1.0, "f32"), (1.0, "bf16")):
        deployed = OVDenoiser(graph(shift), config, name, precision=precision, threads=1)
        prints.append(model_fingerprint(type(pipe)(**{**pipe.components, "unet": deployed})))
    assert prints[0] != prints[1] and prints[0] == prints[2] and prints[0] != prints[3]


def family_case(rtn_results, family: str):
    """(W8A8 pipeline, its denoiser, example inputs, fake-quant output, distance of the W4A8 model's output)."""
    from diffquant.runtime.flat import example_inputs

    pipe = rtn_results[(family, 8)]["pipe"]
    denoiser = diffquant.get_denoiser(pipe)
    inputs = example_inputs(denoiser, batch=2, seq_len=16)
    with torch.no_grad():
        ref = get_adapter(denoiser).call(inputs)
        w4 = get_adapter(diffquant.get_denoiser(rtn_results[(family, 4)]["pipe"])).call(inputs)
    return pipe, denoiser, inputs, ref, rel_err(w4, ref)


@pytest.mark.parametrize("family", [pytest.param("sdxl", marks=pytest.mark.slow), "sd3"])  # sdxl: ~1 min of export
def test_sdxl_and_sd3_run_on_openvino(rtn_results, family):
    """SDXL's added conditioning and SD3's joint attention deploy through their adapters, called the diffusers way
    (batch traced at 2, run at 1: the batch is dynamic); outputs match the fake-quant model far closer than W4 does."""
    from diffquant.runtime.openvino import OVDenoiser

    pipe, denoiser, inputs, ref, gap = family_case(rtn_results, family)
    den = OVDenoiser.from_denoiser(pipe, inputs=inputs, graph="float", threads=1)
    one = {k: v[:1] for k, v in inputs.items()}
    args = [one[k] for k in list(one)[:3]]
    kwargs = ({"added_cond_kwargs": {k: one[k] for k in ("text_embeds", "time_ids")}} if family == "sdxl"
              else {"pooled_projections": one["pooled_projections"]})
    out = den(*args, return_dict=False, **kwargs)[0]
    assert out.shape == ref[:1].shape
    assert rel_err(out, ref[:1]) < 0.25 * gap


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_export_to_onnx_qdq(rtn_results, family, tmp_path):
    """ONNX Q/DQ for every adapter family, run by ONNX Runtime at another batch size than traced (~5 min each here:
    the dynamo exporter). Its QuantizeLinear rounds differently from torch on a few elements, which the random tiny
    models amplify, hence the loose bound."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from diffquant.runtime import convert
    from diffquant.runtime.onnx import export_onnx

    _, denoiser, inputs, ref, gap = family_case(rtn_results, family)
    converted = copy.deepcopy(denoiser)
    convert(converted, progress=False)
    path = export_onnx(converted, tmp_path / "d.onnx", inputs=inputs)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {k: v[:1].numpy() for k, v in inputs.items()})[0])
    assert rel_err(onnx_out, ref[:1]) < 0.75 * gap


def test_four_bit_codes_are_stored_in_four_bits(rtn_results, monkeypatch, tmp_path):
    """A W4A8 graph keeps every weight's codes as i4 constants (half their int8 bytes off the IR) and computes the
    same outputs to the bit once compiled; 8-bit codes do not fit and stay int8."""
    from diffquant.runtime import ovgraph
    from diffquant.runtime.flat import example_inputs
    from diffquant.runtime.openvino import OVDenoiser, ir_bytes

    monkeypatch.setattr(ovgraph, "narrow_weight_codes", lambda model: 0)  # trace as before narrowing
    wide = {}
    for bits in (8, 4):
        denoiser = diffquant.get_denoiser(rtn_results[("sd3", bits)]["pipe"])
        inputs = example_inputs(denoiser, batch=2, seq_len=16)
        wide[bits] = ovgraph.quantized_models(denoiser, inputs, graphs=("float",))[0]["float"]
    monkeypatch.undo()
    codes = [op for op in wide[4].get_ordered_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert ovgraph.narrow_weight_codes(wide[8].clone()) == 0
    narrow = wide[4].clone()
    assert ovgraph.narrow_weight_codes(narrow) == len(codes) > 0
    assert ir_bytes(wide[4]) - ir_bytes(narrow) >= 0.45 * sum(op.get_byte_size() for op in codes)
    feed = {name: value.numpy() for name, value in inputs.items()}
    core = ov.Core()
    outs = [core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)[0] for m in (wide[4], narrow)]
    assert (outs[0] == outs[1]).all()
    deployed = OVDenoiser(narrow, dict(denoiser.config), type(denoiser).__name__, threads=1)
    saved = tmp_path / "narrow.xml"
    ov.save_model(narrow, str(saved), compress_to_fp16=False)
    # What eval reports as its size, counted in memory, is what the writer writes (identical constants once) to 16 bytes.
    assert abs(deployed.ir_bytes - ir_bytes(saved)) <= 16 and ir_bytes(narrow) == deployed.ir_bytes


def test_attention_quantized_at_q_and_k_keeps_the_fused_op(tiny_pipes):
    """``attention_quantizers="qk"``: q and k quantized on a signed symmetric grid, v and the softmax left float, so the
    graph keeps ``ScaledDotProductAttention`` with int8-ready q and k (OpenVINO's int8 MHA takes it, as it does NNCF's
    INT8); the deployed output follows the fake-quant model."""
    import numpy as np

    from diffquant.nn.attention import QuantAttnProcessor
    from diffquant.runtime.openvino import OVDenoiser
    from diffquant.runtime.ovgraph import quantized_models

    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(method="rtn", attention_quantizers="qk", calibration=calibration_config(num_prompts=2))
    assert QuantConfig.from_json(cfg.to_json()) == cfg and cfg.label == "rtn-w8a8-attn_qk"
    assert "attention_quantizers" not in QuantConfig().to_dict()  # the papers' attention keeps its earlier JSON
    with pytest.raises(ValueError, match="unknown attention_quantizers 'qkv'"):
        QuantConfig(attention_quantizers="qkv")
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    processors = [m for m in pipe.unet.modules() if isinstance(m, QuantAttnProcessor)]
    assert processors and all(p.v_quantizer is None and p.softmax_quantizer is None for p in processors)
    inputs = sd_inputs(pipe.unet, 500.0)
    models, _ = quantized_models(pipe.unet, inputs, graphs=("int",))
    ops = models["int"].get_ordered_ops()
    attention = [op for op in ops if op.get_type_name() == "ScaledDotProductAttention"]
    assert len(attention) == len(processors) and not any(op.get_type_name() == "Softmax" for op in ops)
    for op in attention:
        for port in (0, 1):  # q, k: through the head reshape/transpose back to their FakeQuantize
            node = op.input(port).get_source_output().get_node()
            while node.get_type_name() in ("Reshape", "Transpose"):
                node = node.input(0).get_source_output().get_node()
            assert node.get_type_name() == "FakeQuantize"
            low, high = (float(np.asarray(node.input(i).get_source_output().get_node().get_data()).reshape(-1)[0]) for i in (1, 2))
            assert node.get_attributes()["levels"] == 256 and low == pytest.approx(-high * 128 / 127, rel=1e-5)
        assert op.input(2).get_source_output().get_node().get_type_name() != "FakeQuantize"  # v float
    den = OVDenoiser.from_denoiser(pipe, inputs=inputs, graph="int", threads=1)
    out = den(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    assert_follows_fake_quant(out, pipe.unet, tiny_pipes["sd"].unet, inputs)
