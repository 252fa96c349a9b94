"""Versioned, JSON-serializable configuration handed to ``diffquant.quantize``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .registry import method as registered_method

if TYPE_CHECKING:
    from .quant import QuantSpec
    from .sampling import SamplingSettings

# 2: the softmax output follows a dynamic act_granularity (per query row); version-1 configs keep it static.
CONFIG_VERSION = 2


@dataclass
class CalibrationConfig:
    """How calibration inputs are recorded from the float model's own sampling trajectories.

    Every ``every_k``-th denoising step of ``num_prompts`` prompts is kept (conditional and
    unconditional halves when guidance is on), at most ``samples_per_step`` rows per step.
    ``num_inference_steps``/``guidance_scale``/``height``/``width``/``seed`` are the sampling part, read as
    one ``SamplingSettings`` through ``sampling`` (flat here, so saved configs of every version load);
    ``None`` means the defaults policy of ``diffquant.sampling`` (the mini zoo's, else the pipeline's).
    ``seeds``: one seed per calibration sample, whose initial noise it draws alone (as ``generate --seeds``),
    so an unconditional model's calibration samples can be named and kept apart from evaluation seeds;
    ``None``: each batch ``b`` draws from one generator seeded ``seed + b``. ``extras``: family-specific pipeline
    arguments of the sampling (``SamplingSettings.extras``, e.g. Flux's ``max_sequence_length``), on top of the
    registered defaults.
    """

    num_prompts: int = 8
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    every_k: int = 1
    samples_per_step: int | None = None
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    seed: int = 0
    seeds: list[int] | None = None
    extras: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("num_prompts", "every_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if self.seeds is not None:
            self.seeds = [int(s) for s in self.seeds]
            if len(self.seeds) != self.num_prompts or min(self.seeds, default=-1) < 0:
                raise ValueError(f"calibration seeds must be {self.num_prompts} non-negative integers (one per sample), "
                                 f"got {len(self.seeds)}; set num_prompts to their number")
        self.sampling  # validates steps and size with the sampling core's messages

    def seeds_for(self, start: int, n: int) -> list[int] | None:
        """The seeds of calibration samples ``start .. start + n - 1`` (None without ``seeds``)."""
        return None if self.seeds is None else self.seeds[start:start + n]

    @property
    def sampling(self) -> SamplingSettings:
        from .sampling import SamplingSettings  # torch-free import of this module: the CLI reads its defaults

        return SamplingSettings(self.num_inference_steps, self.guidance_scale, self.height, self.width, self.seed,
                                extras=dict(self.extras or {}))

    @classmethod
    def from_sampling(cls, settings: SamplingSettings, **calibration) -> CalibrationConfig:
        """Calibrate with the same sampling as ``settings`` (e.g. an evaluation's); ``calibration``: the other fields."""
        return cls(num_inference_steps=settings.steps, guidance_scale=settings.guidance, height=settings.height,
                   width=settings.width, seed=settings.seed, extras=dict(settings.extras) or None, **calibration)


def _spec(part: str, **fields: Any) -> QuantSpec:
    """``QuantSpec(**fields)``, its one-line error prefixed with which part of the config it is for."""
    from .quant import QuantSpec  # torch-free import of this module: the CLI reads its defaults

    try:
        return QuantSpec(**fields)
    except ValueError as e:
        raise ValueError(f"{part}: {e}") from None


# Which attention matmul inputs are quantized (``quantize_attention``): the papers' q, k, v and softmax output (the
# attention then runs as explicit matmuls), or only q and k, signed symmetric per-tensor, with the fused attention op
# kept (``scaled_dot_product_attention``): OpenVINO runs that as its int8 MHA kernel, as it does NNCF's INT8.
ATTENTION_QUANTIZERS = ("qkv_softmax", "qk")


@dataclass
class QuantConfig:
    """What to quantize and how: plain data. ``method`` names a recipe in ``diffquant.registry``, which
    parses ``options`` into that method's typed ``Options`` (so construction rejects unknown methods and keys).

    ``abits=None`` means weight-only. ``split_shortcut=None`` takes the method's default (on for
    Q-Diffusion). ``timestep_groups`` > 1 gives activation quantizers one parameter set per range
    of the training timestep. ``keep_float`` holds fnmatch patterns of layer names left in float.
    ``max_memory`` bounds the calibration data held resident (block reconstruction's caches, EMF's serial
    dataset), e.g. ``"4GiB"``; beyond it the data is read memory-mapped from disk (``diffquant.store``), with the
    same result. ``None``: half of the RAM available when quantization starts.
    ``act_granularity`` (``ACT_GRANULARITIES``): ``per_tensor`` static scales (per timestep group);
    ``per_channel_smooth`` the same after SmoothQuant-style migration of per-input-channel factors into the
    weights (searched per layer on the calibration data); ``per_token`` / ``per_group`` dynamic scales per token
    (per group of ``act_group_size`` input channels), computed at run time. Attention matmul inputs follow the
    dynamic modes and stay static per-tensor under smoothing (they have no weight to migrate into).
    ``attention_quantizers`` (``ATTENTION_QUANTIZERS``): ``qkv_softmax`` (the papers') or ``qk`` (q and k only,
    static symmetric, the fused attention op kept: OpenVINO's int8 attention kernel).
    ``conv_act_granularity`` overrides it for Conv2d inputs (``None``: the same). A per-token scale on a convolution's
    input is one scale per pixel, which no int8 convolution kernel can apply (a 3x3 window mixes pixels of different
    scales), so engines run such convolutions in float; ``act_granularity="per_token"`` with
    ``conv_act_granularity="per_tensor"`` keeps the convolutions on static int8 kernels (the usual deployment split:
    dynamic scales where the layer is a matmul over tokens).
    ``layers`` chooses what is quantized at all (``--layers``): a comma list of ``all``, ``linear``, ``conv``,
    ``attention`` (the Linear layers inside attention modules and their matmuls) or fnmatch patterns of layer and
    attention-module names; the union is quantized, everything else stays float with the reason "outside
    --layers" (``linear`` is torchao's coverage: no convolutions, no attention matmuls).
    ``lowrank_rank`` > 0 gives every quantized Linear/Conv2d (or those matching a ``lowrank_layers`` fnmatch pattern)
    SVDQuant's rank-r float branch beside its quantized residual (``diffquant.nn.lowrank``), set at wrap time so every
    method calibrates the residual; its parameters count at 16 bits in the average weight bits.
    """

    method: str = "rtn"
    wbits: int = 8
    abits: int | None = 8
    weight_granularity: str = "per_channel"
    group_size: int = 128
    weight_symmetric: bool = True
    weight_observer: str = "minmax"
    act_symmetric: bool = False
    act_observer: str = "minmax"
    act_percentile: float = 99.99
    act_granularity: str = "per_tensor"
    conv_act_granularity: str | None = None
    act_group_size: int = 64
    quantize_attention: bool = True
    attention_quantizers: str = "qkv_softmax"
    softmax_bits: int = 8
    timestep_groups: int = 1
    split_shortcut: bool | None = None
    float_time_layers: bool = False
    float_io_layers: bool = False
    keep_float: list[str] = field(default_factory=list)
    layers: str = "all"
    lowrank_rank: int = 0
    lowrank_layers: list[str] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_memory: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        method = registered_method(self.method)
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this diffquant ({CONFIG_VERSION}); upgrade diffquant")
        self.keep_float = list(self.keep_float)
        self.lowrank_layers = list(self.lowrank_layers)
        if self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0 (0: no low-rank branch), got {self.lowrank_rank}")
        if not self.layer_selection:
            raise ValueError("layers is empty; pass --layers all, linear, conv, attention or name patterns (comma separated)")
        if self.attention_quantizers not in ATTENTION_QUANTIZERS:
            raise ValueError(f"unknown attention_quantizers {self.attention_quantizers!r}; choose one of {', '.join(ATTENTION_QUANTIZERS)}")
        if self.timestep_groups < 1:
            raise ValueError(f"timestep_groups must be >= 1, got {self.timestep_groups}")
        from .quant.spec import ACT_GRANULARITIES, WEIGHT_GRANULARITIES  # torch-free import of this module

        for part, value, allowed in (("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES),
                                     ("act_granularity", self.act_granularity, ACT_GRANULARITIES),
                                     ("conv_act_granularity", self.conv_act_granularity or "per_tensor", ACT_GRANULARITIES)):
            if value not in allowed:
                raise ValueError(f"unknown {part} {value!r}; choose one of {', '.join(allowed)}")
        # Building the specs validates bits, granularity and observers with one-line messages.
        self.weight_spec()
        self.act_spec()
        self.act_spec(conv=True)
        self.softmax_spec()
        if self.max_memory is not None:
            from .store import parse_bytes  # store imports torch: keep config light for --help

            parse_bytes(self.max_memory)
        method.options(self)  # the method's typed Options: unknown or ill-typed keys fail here

    @property
    def label(self) -> str:
        granularity = "" if self.abits is None or self.act_granularity == "per_tensor" else f"-{self.act_granularity}"
        if self.abits is not None and self.conv_act_granularity not in (None, self.act_granularity):
            granularity += f"-conv_{self.conv_act_granularity}"
        if self.abits is not None and self.act_symmetric:
            granularity += "-sym"
        if self.abits is not None and self.quantize_attention and self.attention_quantizers != "qkv_softmax":
            granularity += f"-attn_{self.attention_quantizers}"
        rank = f"-r{self.lowrank_rank}" if self.lowrank_rank else ""
        coverage = "" if self.layer_selection == ["all"] else "+".join(self.layer_selection)
        if len(coverage) > 32:  # a list of layer names: a short digest keeps the label readable
            coverage = "layers" + hashlib.sha1(coverage.encode()).hexdigest()[:6]
        coverage = f"-{coverage}" if coverage else ""
        return f"{self.method}-w{self.wbits}a{self.abits if self.abits is not None else 'f'}{granularity}{rank}{coverage}"

    @property
    def layer_selection(self) -> list[str]:
        """``layers`` as its comma-separated terms (keywords ``all``/``linear``/``conv``/``attention`` or patterns)."""
        return [t.strip() for t in str(self.layers).split(",") if t.strip()]

    @property
    def use_split_shortcut(self) -> bool:
        return registered_method(self.method).split_shortcut_default if self.split_shortcut is None else self.split_shortcut

    def weight_spec(self) -> QuantSpec:
        return _spec("weights", bits=self.wbits, symmetric=self.weight_symmetric, granularity=self.weight_granularity,
                     group_size=self.group_size, observer=self.weight_observer)

    def act_spec(self, conv: bool = False) -> QuantSpec | None:
        """The layers' input spec; ``conv=True``: that of Conv2d inputs (``conv_act_granularity`` where set)."""
        if self.abits is None:
            return None
        granularity = (self.conv_act_granularity if conv else None) or self.act_granularity
        return _spec("activations", bits=self.abits, symmetric=self.act_symmetric, granularity=granularity,
                     group_size=self.act_group_size, observer=self.act_observer, percentile=self.act_percentile)

    def attention_spec(self) -> QuantSpec | None:
        """The q/k/v matmul inputs' spec: the layers' one, static per-tensor under smoothing (no weight to migrate into);
        with ``attention_quantizers="qk"`` static per-tensor symmetric (the signed int8 q and k an int8 attention
        kernel takes)."""
        spec = self.act_spec()
        if spec is None:
            return spec
        if self.attention_quantizers == "qk":
            return dataclasses.replace(spec, granularity="per_tensor", symmetric=True)
        if spec.granularity != "per_channel_smooth":
            return spec
        return dataclasses.replace(spec, granularity="per_tensor")

    def softmax_spec(self) -> QuantSpec | None:
        """The attention probabilities' spec: unsigned ``softmax_bits`` codes, static per-tensor (min/max) under
        per_tensor and smoothing; under per_token/per_group dynamic like the layers' inputs, each query row scaled
        by its own maximum (per_group: each group of ``act_group_size`` keys of a row). A static grid steps by
        1/255 of the largest probability seen in calibration, which flattens the small probabilities of long
        joint-attention rows (mini-sd3: 35 dB); a row's own maximum keeps them. Configs saved before version 2
        keep the static softmax they were calibrated with."""
        if self.abits is None:
            return None
        from .quant.spec import DYNAMIC_GRANULARITIES

        dynamic = self.act_granularity in DYNAMIC_GRANULARITIES and self.version >= 2
        return _spec("softmax", bits=self.softmax_bits, symmetric=False, unsigned=True, observer="minmax",
                     granularity=self.act_granularity if dynamic else "per_tensor", group_size=self.act_group_size)

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["attention_quantizers"] == "qkv_softmax":  # configs with the papers' attention keep their earlier JSON
            del data["attention_quantizers"]
        for key in ("seeds", "extras"):  # configs without calibration seeds or sampling extras keep their earlier JSON
            if data["calibration"].get(key) is None:
                del data["calibration"][key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; this file was written by another diffquant version")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))
