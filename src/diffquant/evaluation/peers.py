"""Peer baselines (torchao, optimum-quanto, SDNQ, bitsandbytes, OpenVINO and its NNCF INT8) applied to a pipeline's
denoiser, plus cost helpers.

Each peer runs at its own library's settings as a diffusers user would get them (``PEERS`` says which);
its coverage and bits are read from its modules by ``evaluation.coverage``, like diffquant's rows.

Peers run through the same paired harness as diffquant's methods, so their numbers are comparable.
A peer that cannot run on this machine raises :class:`PeerUnavailable` with the library's reason;
bench shows it as a row marked unavailable instead of dropping it silently.

The OpenVINO peers replace the denoiser by ``OVDenoiser`` (runtime/openvino.py) around a
traced float graph; ``nncf-int8`` first quantizes that graph the way optimum-intel quantizes Stable
Diffusion's UNet (``nncf.quantize``, ``ModelType.TRANSFORMER`` so SmoothQuant is on, NNCF's default
statistics), one NNCF sample per denoiser call recorded by ``record_denoiser_calls`` on the bench's
calibration prompts and sampling settings: the same data diffquant's methods calibrate on.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ..calibration import CalibrationSet, record_denoiser_calls
from ..config import CalibrationConfig
from ..models.adapters import get_adapter
from ..store import return_freed_memory
from ..wrap import get_denoiser
from .paired import plain_tensors

PEERS: dict[str, str] = {
    "torchao-w8a8": "torchao Int8DynamicActivationInt8WeightConfig (int8 dynamic activations, int8 weights; Linear layers)",
    "torchao-w4": "torchao Int4WeightOnlyConfig (int4 weight-only, group 128; Linear layers)",
    "quanto-w8a8": "optimum-quanto qint8 weights + qint8 activations, activation ranges from its Calibration over the calibration prompts",
    "quanto-w4": "optimum-quanto qint4 weights, float activations",
    "sdnq-int8": "SDNQ int8 weights (sdnq_post_load_quant defaults: weight-only, Linear layers of >= 16384 elements, "
                 "its skip list), dequantized to float32 for the matmul",
    "sdnq-int8-svd": "SDNQ int8 weights with its SVD branch (use_svd, rank 32: a float low-rank part beside the codes)",
    "sdnq-uint4": "SDNQ uint4 weights (its default group size for 4 bits), weight-only",
    "sdnq-uint4-svd": "SDNQ uint4 weights with its SVD branch (use_svd, rank 32)",
    "bnb-int8": "bitsandbytes LLM.int8 (Linear8bitLt, outlier threshold 6.0) on every Linear layer, as diffusers' "
                "BitsAndBytesConfig(load_in_8bit=True) does; CPU kernels",
    "bnb-nf4": "bitsandbytes NF4 weights (Linear4bit, blocksize 64, float32 compute) on every Linear layer, as "
               "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') does; CPU kernels",
    "nncf-int8": "OpenVINO INT8 by NNCF (nncf.quantize, ModelType.TRANSFORMER with SmoothQuant, one sample per recorded "
                 "calibration call), run by OpenVINO at f32 precision hint like diffquant's deployed models",
    "openvino-fp32": "the float denoiser on OpenVINO, f32 precision hint",
    "openvino-bf16": "the float denoiser on OpenVINO, bf16 precision hint (its default on AVX-512 BF16 CPUs)",
}
OV_PRECISION = {"nncf-int8": "f32", "openvino-fp32": "f32", "openvino-bf16": "bf16"}


class PeerUnavailable(RuntimeError):
    """The peer library cannot quantize or run this model here; the message says why."""


def parse_peers(spec: str | None) -> list[str]:
    if not spec or spec.strip() in ("", "none"):
        return []
    names = list(PEERS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)} (or 'all', 'none')")
    return names


def apply_peer(name: str, pipe, run_prompts: Callable[[list[str]], None], calibration: list[str],
               calibration_config: CalibrationConfig | None = None) -> dict:
    """Quantize (or move) ``pipe``'s denoiser in place with peer ``name``; returns its costs for the bench row.

    The dict holds ``calibration_s`` (seconds quantization and calibration took) and, for the OpenVINO peers,
    ``denoiser_mib`` (the IR's weight file) and NNCF's ``calibration_samples``. ``run_prompts`` samples ``pipe``
    on prompts with the bench's settings: over ``calibration`` for quanto's activation ranges, then (untimed)
    on one prompt to prove the quantized model runs here (some kernels fail only at the first forward).
    ``calibration_config`` (the bench's sampling settings) drives NNCF's recording.
    """
    denoiser = get_denoiser(pipe)
    costs: dict = {}
    try:
        start = time.perf_counter()
        if name in OV_PRECISION:
            costs = _openvino_peer(name, pipe, calibration, calibration_config or CalibrationConfig(num_prompts=len(calibration)))
        elif name.startswith("sdnq"):
            from sdnq import sdnq_post_load_quant

            sdnq_post_load_quant(denoiser, weights_dtype=name.split("-")[1], use_svd=name.endswith("-svd"))
        elif name.startswith("bnb"):
            _bitsandbytes(denoiser, four_bit=name == "bnb-nf4")
        elif name.startswith("torchao"):
            from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(denoiser, Int8DynamicActivationInt8WeightConfig() if name == "torchao-w8a8" else Int4WeightOnlyConfig())
        else:
            from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

            if name == "quanto-w8a8":
                quantize(denoiser, weights=qint8, activations=qint8)
                with Calibration():
                    run_prompts(calibration)
            else:
                quantize(denoiser, weights=qint4)
            freeze(denoiser)
        costs["calibration_s"] = time.perf_counter() - start
        run_prompts(calibration[:1])
        return costs
    except ImportError as e:
        raise PeerUnavailable(f"{type(e).__name__}: {e}") from None
    except (RuntimeError, NotImplementedError, ValueError, AssertionError, TypeError) as e:
        raise PeerUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _bitsandbytes(denoiser: torch.nn.Module, four_bit: bool) -> None:
    """Every ``nn.Linear`` of ``denoiser`` replaced by bitsandbytes' layer, its weight quantized on placement."""
    import bitsandbytes as bnb

    from ..wrap import set_submodule

    for name, lin in [(n, m) for n, m in denoiser.named_modules() if type(m) is torch.nn.Linear]:
        args = (lin.in_features, lin.out_features, lin.bias is not None)
        if four_bit:
            q = bnb.nn.Linear4bit(*args, compute_dtype=lin.weight.dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = lin.bias
        set_submodule(denoiser, name, q.to(lin.weight.device))


def _openvino_peer(name: str, pipe, calibration: list[str], config: CalibrationConfig) -> dict:
    """Put the OpenVINO form of ``pipe``'s float denoiser (NNCF-quantized for ``nncf-int8``) in its place."""
    from ..registry import sampling_defaults
    from ..runtime.openvino import OVDenoiser
    from ..runtime.ovgraph import float_model

    denoiser = get_denoiser(pipe)
    costs: dict = {}
    if name == "nncf-int8":
        calls = record_denoiser_calls(pipe, calibration, config, progress=False, defaults=sampling_defaults(pipe))
        model = nncf_int8(denoiser, calls)
        costs["calibration_samples"] = len(calls)
    else:
        model = float_model(denoiser)
    # What evaluation.coverage reads from torch layers, read from the graph: its layers' bits (float width: precision).
    deployed = OVDenoiser(model, dict(denoiser.config), type(denoiser).__name__, precision=OV_PRECISION[name],
                          layer_bits=openvino_layer_bits(model))
    costs["denoiser_mib"] = deployed.ir_bytes / 2**20
    setattr(pipe, "unet" if getattr(pipe, "unet", None) is denoiser else "transformer", deployed)
    return costs


_PASS_THROUGH = ("Reshape", "Transpose", "Convert", "Multiply", "Subtract", "Unsqueeze", "Squeeze")


def _source(node):
    """The node behind reshapes, casts and dequantization steps: a FakeQuantize, a Constant or a computation."""
    for _ in range(8):
        if node.get_type_name() not in _PASS_THROUGH:
            break
        node = node.input_value(0).get_node()
    return node


def _node_bits(node) -> float | None:
    """Bits of a quantized operand: a FakeQuantize's levels, or an integer Constant's width (compressed weights)."""
    import math

    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return float(math.ceil(math.log2(node.get_levels())))
    if kind == "Constant" and node.get_element_type().is_integral():
        return float(node.get_element_type().bitwidth)
    return None


def openvino_layer_bits(model) -> dict[str, tuple[float | None, float | None]]:
    """``diffquant.bits.layer_bits`` of an OpenVINO graph traced from a denoiser (``runtime.ovgraph``): each
    MatMul/Convolution and SDPA named by the torch module it came from, with its quantized operands' bits."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul", "Convolution", "ScaledDotProductAttention"):
            continue
        name = op.get_friendly_name().split("/")[0].removeprefix("__module.").removeprefix("denoiser.")
        bits = [_node_bits(_source(op.input_value(i).get_node())) for i in range(2)]
        if kind == "ScaledDotProductAttention":  # NNCF quantizes q and k (Q K^T); softmax x V stays float
            if None not in bits:
                out[f"{name}:qk"] = (None, min(bits))
        elif bits != [None, None]:
            out[name] = (bits[1], bits[0])
    return out


def flat_call(denoiser: torch.nn.Module, kwargs: dict) -> dict[str, torch.Tensor]:
    """A denoiser call's kwargs (``DenoiserCall.kwargs()``) as the named float tensors a traced graph takes (timestep [B])."""
    return {k: v.float() for k, v in get_adapter(denoiser, warn=False).flat_inputs((), kwargs).items()}


def nncf_int8(denoiser: torch.nn.Module, calls: CalibrationSet):
    """OpenVINO's own INT8 of the float denoiser: ``nncf.quantize`` as optimum-intel runs it for Stable Diffusion.

    ``ModelType.TRANSFORMER`` turns SmoothQuant on (NNCF's default alphas) and keeps NNCF's default
    statistics (min/max ranges, fast bias correction); ``subset_size`` takes every recorded call, each
    one NNCF sample, so NNCF sees exactly the calibration data diffquant's methods see.
    """
    import nncf

    from ..runtime.ovgraph import float_model

    model = float_model(denoiser, flat_call(denoiser, calls.calls[0].kwargs()))
    names = [next(iter(port.get_names())) for port in model.inputs]
    items = [{k: v.numpy() for k, v in flat_call(denoiser, call.kwargs()).items() if k in names} for call in calls]
    return nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))


def saved_size_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s state dict written as safetensors, subclass tensors flattened to what they store."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        tensors.update((key + name, plain.cpu().contiguous().clone()) for name, plain in plain_tensors(value))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "denoiser.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


class PeakMemory:
    """Peak resident memory above the starting level, sampled from /proc/self/statm in a thread.

    tracemalloc does not see torch's CPU allocator, so RSS sampling is the honest measure here;
    short spikes between samples (5 ms) can be missed. On CUDA the allocator's peak above its starting level is added.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        return_freed_memory()  # memory freed by an earlier row must not hide this row's growth
        self._base = self._rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)
        if torch.cuda.is_available():
            self.peak_bytes += max(0, torch.cuda.max_memory_allocated() - self._cuda_base)

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20
