"""Turn a float denoiser into a wrapped one: quantized layers, attention processors, timestep hook.

The same function rebuilds the structure when a saved model loads, so a saved folder needs only
the config, the layer plan and the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import QuantConfig
from .models.adapters import DenoiserAdapter, get_adapter, get_denoiser, matches_any  # noqa: F401  (get_denoiser re-exported)
from .nn import PROCESSORS, QuantConv2d, QuantLinear
from .nn.lowrank import attach_branch
from .quant import TimestepContext, TimestepGroups


@dataclass
class QuantRecord:
    """What diffquant did to a denoiser, kept on it as ``denoiser.diffquant``."""

    config: QuantConfig
    family: str
    groups: TimestepGroups
    context: TimestepContext
    float_layers: dict[str, str] = field(default_factory=dict)  # name -> reason kept float
    skip_splits: dict[str, list[int]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # method results (timings, sensitivities, bits)

    def plan(self) -> dict:
        return {
            "family": self.family,
            "groups": self.groups.to_dict(),
            "float_layers": self.float_layers,
            "skip_splits": self.skip_splits,
        }


class TimestepHook:
    """Forward pre-hook that hands the call's timestep to the model's ``TimestepContext``.

    A callable object rather than a closure, so ``copy.deepcopy`` of a quantized model gives the copy
    a hook bound to the copy's own context (a closure would keep driving the original's).
    """

    def __init__(self, adapter: DenoiserAdapter, context: TimestepContext) -> None:
        self.adapter = adapter
        self.context = context

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.adapter.timestep(args, kwargs)
        if t is not None:
            self.context.set_timestep(t)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


OUTSIDE_LAYERS = "outside --layers"


def selected_layers(adapter: DenoiserAdapter, terms: list[str], attention: list[str] | None = None) -> tuple[set[str], set[str]]:
    """(layer names, attention-module names) that ``QuantConfig.layers``' terms select; see its docstring.
    ``attention``: the adapter's attention modules, when the caller has them already."""
    layers = adapter.layers()
    attention = list(adapter.attention_modules()) if attention is None else attention
    inside = {n for n in layers if any(n.startswith(a + ".") for a in attention)}
    keep_layers: set[str] = set()
    keep_attention: set[str] = set()
    for term in terms:
        if term == "all":
            keep_layers |= set(layers)
            keep_attention |= set(attention)
        elif term in ("linear", "conv"):
            kind = nn.Linear if term == "linear" else nn.Conv2d
            keep_layers |= {n for n, m in layers.items() if isinstance(m, kind)}
        elif term == "attention":
            keep_layers |= {n for n in inside if isinstance(layers[n], nn.Linear)}
            keep_attention |= set(attention)
        else:
            found = {n for n in layers if matches_any(n, [term])}, {n for n in attention if matches_any(n, [term])}
            if not found[0] and not found[1]:
                raise ValueError(f"--layers pattern {term!r} matches no layer or attention module; use all, linear, conv, "
                                 "attention or an fnmatch pattern of layer names (e.g. 'down_blocks.*')")
            keep_layers |= found[0]
            keep_attention |= found[1]
    return keep_layers, keep_attention


def float_layer_reasons(adapter: DenoiserAdapter, config: QuantConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Which quantizable layers (and attention modules, for their matmuls) stay float, and why: config patterns,
    time or io layers, method choices, or outside ``--layers``."""
    reasons = dict(extra or {})
    time_layers = set(adapter.time_layers()) if config.float_time_layers else set()
    io_layers = set(adapter.io_layers()) if config.float_io_layers else set()
    attention = list(adapter.attention_modules())
    keep_layers, keep_attention = selected_layers(adapter, config.layer_selection, attention)
    for name in adapter.layers():
        if name in reasons:
            continue
        if matches_any(name, config.keep_float):
            reasons[name] = "keep_float pattern"
        elif name in time_layers:
            reasons[name] = "time-dependent layer (float_time_layers)"
        elif name in io_layers:
            reasons[name] = "first/last layer (float_io_layers)"
        elif name not in keep_layers:
            reasons[name] = OUTSIDE_LAYERS
    for name in attention:
        if name not in keep_attention and name not in reasons:
            reasons[name] = f"attention matmuls {OUTSIDE_LAYERS}"
    return reasons


def wrap_denoiser(
    denoiser: nn.Module,
    config: QuantConfig,
    groups: TimestepGroups | None = None,
    float_layers: dict[str, str] | None = None,
    skip_splits: dict[str, list[int]] | None = None,
    calibrate_weights: bool = True,
) -> QuantRecord:
    """Replace every quantizable layer not kept float by its quantized wrapper (state: wrapped).

    Weight quantizers are calibrated from the weights at once; activation quantizers wait for
    calibration data. ``float_layers``/``skip_splits`` restore a saved plan exactly (loading passes
    ``calibrate_weights=False``: the saved scales replace whatever the weights would give).
    """
    if getattr(denoiser, "diffquant", None) is not None:
        raise ValueError("this denoiser is already quantized; start again from the float model")
    adapter = get_adapter(denoiser)
    groups = groups or TimestepGroups.uniform(config.timestep_groups, adapter.timestep_range)
    context = TimestepContext(groups)
    reasons = float_layer_reasons(adapter, config, float_layers) if float_layers is None else dict(float_layers)
    splits = (adapter.skip_splits() if config.use_split_shortcut else {}) if skip_splits is None else skip_splits
    weight_spec, act_spec, conv_act_spec = config.weight_spec(), config.act_spec(), config.act_spec(conv=True)
    num_groups = len(groups)
    for name, module in adapter.layers().items():
        if name in reasons:
            continue
        linear = isinstance(module, nn.Linear)
        cls = QuantLinear if linear else QuantConv2d
        q = cls.from_float(module, weight_spec, act_spec if linear else conv_act_spec, context, num_groups,
                           splits.get(name), calibrate_weights)
        if q.input_quantizer is not None:
            q.input_quantizer.name = name
        if config.lowrank_rank and (not config.lowrank_layers or matches_any(name, config.lowrank_layers)):
            attach_branch(q, config.lowrank_rank, split=calibrate_weights)
        set_submodule(denoiser, name, q)
    if config.quantize_attention and act_spec is not None:
        for name, kind in adapter.attention_modules().items():
            if name in reasons:  # its matmuls outside --layers
                continue
            cls = PROCESSORS[kind]
            attention = denoiser.get_submodule(name)
            qk_only = config.attention_quantizers == "qk"
            processor = cls(config.attention_spec(), None if qk_only else config.softmax_spec(), context, num_groups,
                            quantize_v=not qk_only).to(next(attention.parameters()).device)
            for q in processor.activation_quantizers():
                q.name = f"{name}.processor"
            attention.set_processor(processor)

    denoiser.register_forward_pre_hook(TimestepHook(adapter, context), with_kwargs=True)
    record = QuantRecord(config, adapter.family, groups, context, reasons, splits)
    denoiser.diffquant = record
    return record


def quant_record(denoiser: nn.Module) -> QuantRecord:
    record = getattr(denoiser, "diffquant", None)
    if record is None:
        raise ValueError("this model is not quantized; run diffquant.quantize first")
    return record
