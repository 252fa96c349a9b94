"""Deploy a quantized denoiser on OpenVINO with diffquant's own calibrated scales (no re-calibration).

``diffquant.deployment.openvino.export_openvino(model, folder)`` writes ``denoiser.xml/.bin`` (the int8 graph, every <= 8-bit timestep
group served by one compiled model through runtime scalars: ovgraph.py) and ``denoiser_float.xml/.bin``
(exact fake-quant arithmetic for every group: PCR's relaxed >8-bit steps, and CPUs without VNNI), and,
for a pipeline, its other components so the folder loads as a generating pipeline. ``OVDenoiser`` wraps compiled models
behind the diffusers denoiser call, picking the timestep group from the scheduler's timestep the same
way the torch model does (nearest group centre). Text encoders and the VAE stay torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bits import layer_bits
from ..checkpoint import fingerprint
from ..models.adapters import adapter_class
from ..quant import TimestepGroups
from ..wrap import get_denoiser, quant_record
from .flat import example_inputs
from .modules import cpu_has_vnni
from .ovgraph import GROUP_INPUT, GroupPlan, quantized_models

OV_CONFIG = "openvino_config.json"
GRAPHS = {"int": "denoiser.xml", "float": "denoiser_float.xml"}


def _frozen_config(config: dict) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict({k: v for k, v in config.items() if not k.startswith("_")})


class _Stub:
    """Attribute access for the few module fields pipelines read off the denoiser (SDXL's ``add_embedding``)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class OVDenoiser(nn.Module):
    """A compiled OpenVINO denoiser behind the diffusers call: ``denoiser(sample, t, ..., return_dict=False)``.

    ``models``: ``{"int": ov.Model | path, "float": ...}`` (export_openvino's graphs) or one ``ov.Model`` (e.g.
    NNCF's INT8 or a float peer, run for every step). ``graph``: ``int`` (int8 kernels; groups in
    ``float_groups`` still run the float graph), ``float`` (exact fake-quant arithmetic, int8 weights
    decompressed), or ``auto``: int where the CPU has VNNI/AMX, float elsewhere (without VNNI, x86 int8
    kernels sum u8 x s8 pairs in int16 and saturate on full-range weights: 8% error measured, and no faster).
    ``timestep_group`` is fed when a graph takes it. ``precision``: OpenVINO's inference precision hint
    (``f32`` keeps the float parts exact; ``bf16`` is faster where the CPU has it). ``threads``: default
    torch's thread count. ``properties``: further OpenVINO compile properties (e.g. ``{"PERF_COUNT": True}``).

    It has no weights of its own, so it carries its identity as the buffer ``identity`` (what the evaluation's
    image cache fingerprints: two different deployed models never share images): a digest of ``identity``
    (default: ``graph_digest`` of the graphs it runs; ``from_denoiser``: the source model's weights and structure)
    with the class, groups, graph and precision.
    """

    def __init__(
        self,
        models: Any,
        config: dict,
        class_name: str,
        *,
        groups: TimestepGroups | None = None,
        float_groups: list[int] | tuple[int, ...] = (),
        graph: str = "auto",
        precision: str = "f32",
        threads: int | None = None,
        report: dict | None = None,
        identity: str | None = None,
        properties: dict | None = None,
        layer_bits: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import openvino as ov

        if graph not in ("auto", "int", "float"):
            raise ValueError(f"unknown graph {graph!r}; choose auto, int or float")
        models = models if isinstance(models, dict) else {"given": models}
        if graph == "auto":
            graph = "int" if "int" in models and cpu_has_vnni() else "float"
        if "given" not in models:
            if graph not in models:
                raise ValueError(f"no {graph} graph among {sorted(models)}; pass graph='float'")
            keep = {graph} | ({"float"} if graph == "int" and float_groups else set())
            models = {k: m for k, m in models.items() if k in keep}
        self.graph = graph
        properties = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": precision,
                      **(properties or {})}
        # The float graph is exact fake quantization: OpenVINO must not quantize its FullyConnected inputs again
        # (its dynamic quantization of int8-weight layers, on by default where the CPU has VNNI/AMX, moved a
        # two-group tiny UNet's group-1 output 20 % from fake quant; off: 0.0000).
        exact = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        core = ov.Core()
        self.ir_bytes = sum(ir_bytes(m) for m in models.values())  # what ships for the graphs that run
        self.compiled = {k: core.compile_model(m if not isinstance(m, (str, Path)) else str(m), "CPU",
                                               {**properties, **(exact if k == "float" else {})})
                         for k, m in models.items()}
        self._inputs = {k: [next(iter(p.get_names())) for p in c.inputs] for k, c in self.compiled.items()}
        self.class_name = class_name
        self.adapter = adapter_class(class_name)
        self.groups = groups
        self.float_groups = set(float_groups)
        self.precision = precision
        if layer_bits is not None:  # the source model's bits per layer: coverage and average bits (diffquant.bits)
            self.layer_bits = {name: tuple(bits) for name, bits in layer_bits.items()}
        self.float_bits = 16 if precision == "bf16" else 32
        self.config = _frozen_config(config)
        if "projection_class_embeddings_input_dim" in self.config:
            self.add_embedding = _Stub(linear_1=_Stub(in_features=self.config["projection_class_embeddings_input_dim"]))
        self.calls: list[int] = []  # the timestep group of every call (tests and reports read it)
        self.report: dict = dict(report or {})  # the quantized model's report (sampling defaults, method numbers)
        settings = {"class": class_name, "graph": graph, "precision": precision, "float_groups": sorted(self.float_groups),
                    "exact_float_graph": True,  # images deployed before the float graph's dynamic quantization was off differ
                    "groups": groups.to_dict() if groups is not None else None,
                    "graphs": identity or {k: graph_digest(m) for k, m in sorted(models.items())}}
        digest = bytes.fromhex(fingerprint(settings))
        self.register_buffer("identity", torch.frombuffer(bytearray(digest), dtype=torch.uint8))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """What diffusers' CacheMixin offers the pipelines that call it around each denoiser call (Flux, Wan, ...):
        nothing to do here, the compiled graph runs no caching hooks."""
        yield

    def group_of(self, timestep: torch.Tensor) -> int:
        """The timestep group of a call (one per call: pipelines give every sample the same t)."""
        if self.groups is None or len(self.groups) == 1:
            return 0
        index = self.groups.index(timestep.flatten())
        if not bool((index == index[0]).all()):
            raise ValueError("a batch mixing timestep groups cannot run on one OpenVINO call; give every sample the same t")
        return int(index[0])

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """The numpy inputs of one diffusers call, keyed by graph input name (also NNCF calibration items)."""
        flat = self.adapter.flat_inputs(args, kwargs)
        feeds = {k: v.detach().float().cpu().numpy() for k, v in flat.items()}
        feeds[GROUP_INPUT] = np.array([self.group_of(flat["timestep"])], dtype=np.int64)
        return feeds

    def graph_feeds(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The part of ``feeds`` that compiled graph ``graph`` takes (the timestep group only where it is an input)."""
        missing = [n for n in self._inputs[graph] if n not in feeds]
        if missing:
            raise ValueError(f"the OpenVINO denoiser needs inputs {missing}; pass them as the diffusers call does")
        return {n: feeds[n] for n in self._inputs[graph]}

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        feeds = self.feeds(*args, **kwargs)
        group = int(feeds[GROUP_INPUT][0])
        self.calls.append(group)
        graph = "float" if group in self.float_groups or self.graph == "float" else self.graph
        graph = graph if graph in self.compiled else "given"
        out = self.compiled[graph](self.graph_feeds(graph, feeds))[0]
        sample = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
        out = torch.from_numpy(np.ascontiguousarray(out)).to(sample.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_denoiser(cls, model: Any, *, inputs: dict[str, torch.Tensor] | None = None, **options: Any) -> OVDenoiser:
        """Trace a quantized denoiser (or the pipeline's) into OpenVINO in memory and compile it (``options``: graph,
        precision, threads)."""
        graph = options.pop("graph", "auto")
        graph = ("int" if cpu_has_vnni() else "float") if graph == "auto" else graph
        models, plan = quantized_models(get_denoiser(model), inputs or pipeline_inputs(model), graphs=(graph,))
        return cls.from_traced(model, models, plan, graph=graph, **options)

    @classmethod
    def from_traced(cls, model: Any, models: dict[str, Any], plan: GroupPlan, *, graph: str, **options: Any) -> OVDenoiser:
        """Compile graphs ``quantized_models`` traced from ``model``'s denoiser (``from_denoiser``'s second half, for
        callers that also need the ``ov.Model``, e.g. to size its weights)."""
        denoiser = get_denoiser(model)
        record = quant_record(denoiser)
        source = fingerprint({"class": type(denoiser).__name__, "repr": repr(denoiser)}, denoiser.state_dict())
        return cls(models, dict(denoiser.config), type(denoiser).__name__, groups=record.groups, report=record.report,
                   float_groups=plan.float_groups, graph=graph if graph in models else "float", identity=source,
                   layer_bits=layer_bits(denoiser), **options)

    @classmethod
    def from_folder(cls, folder: str | Path, **options: Any) -> OVDenoiser:
        """Compile what ``export_openvino`` wrote into ``folder`` (``options``: graph, precision, threads)."""
        folder = Path(folder)
        meta = json.loads((folder / OV_CONFIG).read_text())
        sub = folder / meta["denoiser_folder"]
        models = {k: sub / GRAPHS[k] for k in meta["graphs"]}
        return cls(models, meta["config"], meta["class"], groups=TimestepGroups.from_dict(meta["groups"]),
                   float_groups=meta["float_groups"], report=meta.get("report"), layer_bits=meta.get("layer_bits"), **options)


def pipeline_inputs(model: Any, batch: int = 2) -> dict[str, torch.Tensor]:
    """Example inputs of one denoiser call sized like the pipeline's own (its tokenizer's sequence length, at most
    77; batch 2 by default: classifier-free guidance)."""
    denoiser = get_denoiser(model)
    tokenizer = getattr(model, "tokenizer", None)
    seq_len = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
    return example_inputs(denoiser, batch=batch, seq_len=min(int(seq_len), 77))


def graph_writer(folder: Path) -> Callable[[str, Any], Path]:
    """A ``quantized_models`` sink: saves each graph under ``folder`` as it is traced, in fp32 (fp16 would round the
    scales), and returns its ``.xml`` path."""
    import openvino as ov

    def write(graph: str, model: Any) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(folder / GRAPHS[graph]), compress_to_fp16=False)
        return folder / GRAPHS[graph]

    return write


def graph_digest(model: Any) -> str:
    """SHA-256 hex of what a graph computes, ``OVDenoiser``'s identity: a saved graph (the path of its .xml) by its
    files' bytes; an ``ov.Model`` by its ops in order (type, attributes, inputs by position, output types, constants'
    bytes) and input names, not by the node names OpenVINO numbers per process, so one graph built twice hashes alike."""
    digest = hashlib.sha256()
    if isinstance(model, (str, Path)):
        for part in (Path(model), Path(model).with_suffix(".bin")):
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
    position: dict[str, int] = {}
    for i, op in enumerate(model.get_ordered_ops()):
        position[op.get_name()] = i
        sources = [port.get_source_output() for port in op.inputs()]
        digest.update(json.dumps([
            op.get_type_name(), [(position[src.get_node().get_name()], src.get_index()) for src in sources],
            op.get_attributes(), [f"{out.get_partial_shape()}{out.get_element_type()}" for out in op.outputs()],
        ], sort_keys=True, default=str).encode())
        if op.get_type_name() == "Constant":
            digest.update(np.ascontiguousarray(op.get_data()).tobytes())
    digest.update(json.dumps([sorted(port.get_names()) for port in model.inputs]).encode())
    return digest.hexdigest()


def ir_bytes(model: Any) -> int:
    """Bytes of weights a graph ships: a saved IR's (``.xml`` path) weight file, or what ``ov.save_model`` would
    write for an in-memory ``ov.Model`` without writing it (fp32 constants as they are; the writer stores identical
    constants once, so those count once: content is compared only among constants of the same type and size)."""
    if isinstance(model, (str, Path)):
        return Path(model).with_suffix(".bin").stat().st_size
    by_size: dict[tuple[str, int], list[Any]] = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            by_size.setdefault((str(op.get_element_type()), op.get_byte_size()), []).append(op)
    total = 0
    for (_, size), ops in by_size.items():
        distinct = 1 if len(ops) == 1 else len({hashlib.blake2b(np.ascontiguousarray(op.get_data()).tobytes(), digest_size=16).digest()
                                               for op in ops})
        total += size * distinct
    return total


def is_openvino_folder(folder: str | Path) -> bool:
    return (Path(folder) / OV_CONFIG).is_file()


__all__ = ["GRAPHS", "OV_CONFIG", "OVDenoiser", "cpu_has_vnni", "graph_digest", "ir_bytes", "is_openvino_folder", "graph_writer", "pipeline_inputs"]
