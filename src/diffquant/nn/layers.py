"""Fake-quantized Linear and Conv2d that keep the original parameter names (``weight``, ``bias``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import ActivationQuantizer, QuantSpec, TimestepContext, WeightQuantizer
from .base import QuantModule
from .lowrank import merge_branch
from .smoothing import unsmooth_weight


class _QuantLayer(QuantModule):
    """Shared part of ``QuantLinear`` / ``QuantConv2d``: built from the float layer on the meta device reusing its
    parameters, and back (``to_float``). A subclass names its float type, input-channel axis and geometry."""

    is_layer = True
    float_type: ClassVar[type[nn.Module]]
    channel_axis: ClassVar[int]

    @staticmethod
    def geometry(module: nn.Module) -> tuple[tuple, dict[str, Any]]:
        """Constructor arguments of a parameterless layer shaped like ``module`` (``bias`` included)."""
        raise NotImplementedError

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        context: TimestepContext | None,
        num_groups: int = 1,
        input_splits: list[int] | None = None,
        calibrate_weights: bool = True,
    ) -> _QuantLayer:
        """Wrap ``module`` (its own parameters, no copy). ``input_splits`` quantizes a concatenated input in parts
        (activation scales and the matching input-channel slices of the weight)."""
        grouped = getattr(module, "groups", 1) != 1
        if input_splits and grouped:
            raise ValueError("split-input quantization needs an ungrouped convolution")
        args, kwargs = cls.geometry(module)
        q = cls(*args, **kwargs, device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._init_quant()
        device = module.weight.device
        q.weight_quantizer = WeightQuantizer(weight_spec, module.weight.shape, input_splits=input_splits).to(device)
        if act_spec is not None and act_spec.granularity == "per_channel_smooth" and grouped:
            act_spec = dataclasses.replace(act_spec, granularity="per_tensor")  # a grouped weight has no column per input channel
        q.input_quantizer = (
            ActivationQuantizer(act_spec, context, num_groups, channel_splits=input_splits, channel_axis=cls.channel_axis,
                                channels=args[0]).to(device)
            if act_spec else None
        )
        if calibrate_weights:
            q.weight_quantizer.calibrate(module.weight)
        return q

    def to_float(self) -> nn.Module:
        """The plain float layer over the same parameters (the layer leaves quantization; smoothing is undone)."""
        unsmooth_weight(self)
        merge_branch(self)
        args, kwargs = self.geometry(self)
        layer = self.float_type(*args, **kwargs, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer


class QuantLinear(nn.Linear, _QuantLayer):
    """``nn.Linear`` with a weight quantizer and a static, timestep-indexed input quantizer."""

    float_type = nn.Linear
    channel_axis = -1

    @staticmethod
    def geometry(module: nn.Linear) -> tuple[tuple, dict[str, Any]]:
        return (module.in_features, module.out_features), {"bias": module.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._quantize_activation(self.input_quantizer, x), self._weight(x.dtype), self._bias(x.dtype))
        return self._add_branch(x, y)


class QuantConv2d(nn.Conv2d, _QuantLayer):
    """``nn.Conv2d`` with quantized weight and input; ``input_splits`` quantizes a concatenated input in parts."""

    float_type = nn.Conv2d
    channel_axis = 1

    @staticmethod
    def geometry(module: nn.Conv2d) -> tuple[tuple, dict[str, Any]]:
        return (module.in_channels, module.out_channels, module.kernel_size), dict(
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self._quantize_activation(self.input_quantizer, x), self._weight(x.dtype), self._bias(x.dtype))
        return self._add_branch(x, y)
