"""Real low-bit inference: int4 packing, integer layers vs fake quantization, save/load, ONNX export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.nn import QuantConv2d, QuantLinear, states
from diffquant.runtime import IntConv2d, IntLinear, convert, onednn_available, pack_int4, unpack_int4
from diffquant.runtime.modules import cpu_has_vnni
from diffquant.runtime.modules import BACKENDS

from tinyutil import PROMPTS, calibration_config

BACKEND_LIST = [b for b in BACKENDS if b != "onednn" or onednn_available()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def unet_inputs(seed: int = 0, t: float | torch.Tensor = 500.0, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g), timestep=torch.as_tensor(t),
        encoder_hidden_states=torch.randn(batch, 16, 32, generator=g), return_dict=False,
    )


_CACHE: dict = {}


def quantized(tiny_pipes, **cfg):
    """A fresh copy of the tiny SD pipeline quantized with ``cfg`` (each config quantized once per run)."""
    key = tuple(sorted(cfg.items()))
    if key not in _CACHE:
        pipe = copy.deepcopy(tiny_pipes["sd"])
        settings = dict(wbits=8, abits=8, calibration=calibration_config(num_prompts=2, num_inference_steps=3))
        settings.update(cfg)
        diffquant.quantize(pipe, QuantConfig(**settings), calibration=PROMPTS[:2], progress=False)
        _CACHE[key] = pipe
    return copy.deepcopy(_CACHE[key])


def layer_inputs(unet, inputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and fake-quant output of every quantized Linear/Conv2d in one denoiser call."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o)))
        for n, m in unet.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))
    ]
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    return seen


def check_layers_match(pipe, inputs: dict, backend: str, tol: float = 1e-3) -> int:
    """Every integer layer, fed the fake-quant model's own input, reproduces the fake-quant output."""
    seen = layer_inputs(pipe.unet, inputs)
    converted = convert(copy.deepcopy(pipe), backend=backend, progress=False).unet
    for name, (x, ref) in seen.items():
        layer = converted.get_submodule(name)
        assert isinstance(layer, (IntLinear, IntConv2d)), name
        with torch.no_grad():
            out = layer(x)
        assert rel_err(out, ref) < tol, (name, backend, rel_err(out, ref))
    return len(seen)


def test_int4_packing_roundtrip_and_size():
    codes = torch.randint(-8, 8, (6, 5, 3, 3), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 23)  # ceil(45 / 2)
    assert torch.equal(unpack_int4(packed, codes.shape), codes)
    with pytest.raises(ValueError, match="int4 packing"):
        pack_int4(torch.tensor([[9]], dtype=torch.int8))


@pytest.mark.parametrize("backend", BACKEND_LIST)
@pytest.mark.parametrize("wbits", [8, 4])
def test_every_layer_matches_fake_quant(tiny_pipes, backend, wbits):
    pipe = quantized(tiny_pipes, wbits=wbits, quantize_attention=False)
    assert check_layers_match(pipe, unet_inputs(), backend) > 30


def test_split_inputs_per_group_weights_and_10bit_steps(tiny_pipes):
    """Q-Diffusion split shortcuts, per-group int4 scales, PCR-style 10-bit groups, mixed-timestep batches."""
    pipe = quantized(tiny_pipes, wbits=4, weight_granularity="per_group", group_size=16, split_shortcut=True, timestep_groups=2)
    record = diffquant.quant_record(pipe.unet)
    assert record.skip_splits
    for m in diffquant.quantized_layers(pipe.unet).values():
        for q in m.activation_quantizers():
            q.bits[1] = 10  # the high-timestep group runs at 10 bits (PCR's relaxed steps)
    for name in record.skip_splits:  # refit a 10-bit grid so the group really is finer than 8 bits
        q = pipe.unet.get_submodule(name).input_quantizer
        q.scale[1] /= 4
        q.zero_point[1] *= 4
    for backend in BACKEND_LIST:
        for t in (100.0, 900.0, torch.tensor([100.0, 900.0])):  # 8-bit group, 10-bit group, mixed batch
            check_layers_match(pipe, unet_inputs(t=t), backend)
    split = convert(copy.deepcopy(pipe), progress=False).unet.get_submodule(next(iter(record.skip_splits)))
    assert len(split.blocks()) > 2 and len({b[3] for b in split.blocks()}) == 2


def test_two_8bit_timestep_groups_share_packed_weights(tiny_pipes):
    """oneDNN packs a weight once; each timestep group passes its own activation scale and zero point."""
    pipe = quantized(tiny_pipes, timestep_groups=2, quantize_attention=False)
    iq = pipe.unet.conv_in.input_quantizer
    assert not torch.equal(iq.scale[0], iq.scale[1])
    for backend in BACKEND_LIST:
        check_layers_match(pipe, unet_inputs(t=torch.tensor([100.0, 900.0])), backend)


@pytest.mark.parametrize("backend", [b for b in BACKEND_LIST if b != "float"])
def test_autocast_gives_bf16_outputs_close_to_fp32(tiny_pipes, backend):
    """Under CPU autocast an integer layer writes bf16 (oneDNN: from the kernel itself), within bf16 rounding."""
    pipe = quantized(tiny_pipes, quantize_attention=False)
    seen = layer_inputs(pipe.unet, unet_inputs())
    converted = convert(copy.deepcopy(pipe), backend=backend, progress=False).unet
    for name, (x, _) in seen.items():
        layer = converted.get_submodule(name)
        with torch.no_grad():
            ref = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
        assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
        assert rel_err(out, ref) < 1e-2, (name, rel_err(out, ref))


def test_convert_whole_model_close_to_fake_quant_and_lifecycle(tiny_pipes):
    pipe = quantized(tiny_pipes, quantize_attention=False)
    inputs = unet_inputs()
    with torch.no_grad():
        fake, fp = pipe.unet(**inputs)[0], tiny_pipes["sd"].unet(**inputs)[0]
    converted = convert(copy.deepcopy(pipe), example_inputs=inputs, autotune=True, repeats=1, progress=False)
    with torch.no_grad():
        out = converted.unet(**inputs)[0]
    runtime = diffquant.quant_record(converted.unet).report["runtime"]
    assert runtime["max_rel_error_vs_fake_quant"] < 1e-3  # every layer on its real input, every backend tried
    # End to end, rounding-boundary flips cascade through this random-weight model: stay well below quantization noise.
    assert rel_err(out, fake) < 0.75 * rel_err(fake, fp)
    counts = states(converted.unet)
    assert counts["converted"] == len(runtime["backends"]) > 30
    assert set(runtime["backends"].values()) <= set(BACKENDS)
    for name, reason in runtime["float_fallback"].items():
        assert runtime["backends"].get(name, "float") == "float" and reason
    with pytest.raises(ValueError, match="cannot go back"):
        diffquant.set_state(converted.unet, "frozen")


def test_unconvertible_layers_stay_frozen_with_reason(tiny_pipes):
    pipe = quantized(tiny_pipes, timestep_groups=2)
    diffquant.set_quant_enabled(pipe.unet, False, names=["conv_in"])
    convert(pipe, progress=False)
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    fallback = diffquant.quant_record(pipe.unet).report["runtime"]["float_fallback"]
    assert "switched off" in fallback["conv_in"]
    assert any("attention" in r for r in fallback.values())
    learning = quantized(tiny_pipes, quantize_attention=False)
    diffquant.set_state(learning.unet, "learning")
    with pytest.raises(ValueError, match="only frozen"):
        convert(learning, progress=False)


@pytest.fixture(scope="module")
def mini_sd():
    """The bundled mini-sd pipeline (the issue measures saved sizes on it)."""
    from diffquant import zoo

    try:
        return zoo.load_pipeline("mini-sd")
    except FileNotFoundError:
        pytest.skip("mini-sd weights are not installed")


@pytest.mark.parametrize("wbits, limit", [(4, 0.3), (8, 0.55)])
def test_saved_size_and_load_restores_converted_model(mini_sd, tmp_path, wbits, limit):
    from diffquant import zoo
    from diffquant.inspect import describe

    pipe = copy.deepcopy(mini_sd)
    calibration = CalibrationConfig(num_prompts=2, num_inference_steps=2, batch_size=2)
    diffquant.quantize(pipe, QuantConfig(wbits=wbits, abits=8, calibration=calibration), calibration=zoo.calibration_prompts(2),
                       progress=False)
    convert(pipe, progress=False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(2, 16, mini_sd.unet.config.cross_attention_dim, generator=g), return_dict=False)
    with torch.no_grad():
        expected = pipe.unet(**inputs)[0]
    folder = diffquant.save(pipe, tmp_path / "q")
    weights = folder / "unet" / "diffquant_model.safetensors"
    ratio = weights.stat().st_size / (zoo.model_path("mini-sd") / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert ratio <= limit, ratio
    loaded = diffquant.load(folder)
    assert states(loaded.unet)["converted"] == states(pipe.unet)["converted"] > 100
    with torch.no_grad():
        assert torch.equal(loaded.unet(**inputs)[0], expected)
    meta = json.loads((folder / "unet" / "diffquant_config.json").read_text())
    assert meta["format_version"] == 2 and meta["converted"]
    summary = describe(folder)
    assert sum(summary["converted"]["backends"].values()) == len(meta["converted"])
    assert "converted:" in summary["text"]


def _onnx_layer_values(graph, layer_names: list[str]) -> dict[str, tuple[str, str]]:
    """layer -> (its input, its output) value names in an exported graph, found through the exporter's name scopes.

    The input is what the layer's QuantizeLinear reads (followed back from its Conv/MatMul/Gemm, since
    the exporter may share one QuantizeLinear between layers); the output is the last value the layer computes.
    """
    import ast

    producer = {out: node for node in graph.node for out in node.output}
    members: dict[str, list] = {name: [] for name in layer_names}
    for node in graph.node:  # in execution order
        meta = {m.key: m.value for m in node.metadata_props}
        for scope in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")):
            if scope.removeprefix("denoiser.") in members:
                members[scope.removeprefix("denoiser.")].append(node)
    found = {}
    for name, nodes in members.items():
        (op,) = [n for n in nodes if n.op_type in ("Conv", "MatMul", "Gemm")]
        dequant = producer[op.input[0]]
        quant = producer[dequant.input[0]]
        assert (dequant.op_type, quant.op_type) == ("DequantizeLinear", "QuantizeLinear"), name
        found[name] = (quant.input[0], nodes[-1].output[0])
    return found


@pytest.mark.slow  # subprocess run, 25-60 s: `make test-slow`
def test_onnx_export_has_qdq_and_onnxruntime_matches(tiny_pipes, tmp_path):
    """ONNX Runtime runs the Q/DQ graph; fed ONNX Runtime's own input, every PyTorch integer layer gives its output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from diffquant.runtime.flat import example_inputs
    from diffquant.runtime.onnx import export_onnx

    pipe = quantized(tiny_pipes, quantize_attention=False)
    convert(pipe, progress=False)
    inputs = example_inputs(pipe.unet, batch=1, seq_len=16)
    path = export_onnx(pipe, tmp_path / "unet.onnx", inputs=inputs)
    model = onnx.load(str(path))
    graph = model.graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, (IntLinear, IntConv2d))}
    assert len(weight_dq) == sum(len(m.blocks()) for m in layers.values()) > 30  # one int8 weight per kernel call
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    values = _onnx_layer_values(graph, list(layers))
    graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                        for v in sorted({v for pair in values.values() for v in pair}))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not cpu_has_vnni():  # ORT's fused int8 kernels saturate without VNNI: check the graph's Q/DQ arithmetic unfused
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {k: t.numpy() for k, t in inputs.items()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    for name, (x, y) in values.items():
        with torch.no_grad():
            ref = layers[name](torch.from_numpy(outputs[x]))
        assert rel_err(torch.from_numpy(outputs[y]).reshape(ref.shape), ref) < 1e-5, name
    # End to end the two differ only where float sums round an activation to the neighbouring code (see docs/runtime.md).
    with torch.no_grad():
        ref = pipe.unet(*inputs.values(), return_dict=False)[0]
        fp = tiny_pipes["sd"].unet(*inputs.values(), return_dict=False)[0]
    assert rel_err(torch.from_numpy(outputs["noise_pred"]), ref) < rel_err(ref, fp)


def test_export_needs_a_converted_model_and_a_group(tiny_pipes, tmp_path):
    from diffquant.runtime.onnx import export_onnx

    pipe = quantized(tiny_pipes, timestep_groups=2)
    with pytest.raises(ValueError, match="--group"):
        export_onnx(pipe, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not converted"):
        export_onnx(pipe, tmp_path / "x.onnx", group=0)
