"""Fake-quantized Linear and Conv2d that keep the original parameter names (``weight``, ``bias``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import ActivationQuantizer, QuantSpec, TimestepContext, WeightQuantizer
from .base import QuantModule
from .smoothing import unsmooth_weight


class QuantLinear(nn.Linear, QuantModule):
    """``nn.Linear`` with a weight quantizer and a static, timestep-indexed input quantizer."""

    is_layer = True

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        context: TimestepContext | None,
        num_groups: int = 1,
        calibrate_weights: bool = True,
    ) -> QuantLinear:
        q = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._init_quant()
        q.weight_quantizer = WeightQuantizer(weight_spec, module.weight.shape).to(module.weight.device)
        q.input_quantizer = (
            ActivationQuantizer(act_spec, context, num_groups, channel_axis=-1, channels=module.in_features).to(module.weight.device)
            if act_spec else None
        )
        if calibrate_weights:
            q.weight_quantizer.calibrate(module.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_activation(self.input_quantizer, x), self._weight(x.dtype), self._bias(x.dtype))

    def to_float(self) -> nn.Linear:
        """The plain float layer over the same parameters (the layer leaves quantization; smoothing is undone)."""
        unsmooth_weight(self)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer


class QuantConv2d(nn.Conv2d, QuantModule):
    """``nn.Conv2d`` with quantized weight and input; ``input_splits`` quantizes a concatenated
    input in parts (activation scales and the matching input-channel slices of the weight)."""

    is_layer = True

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        context: TimestepContext | None,
        num_groups: int = 1,
        input_splits: list[int] | None = None,
        calibrate_weights: bool = True,
    ) -> QuantConv2d:
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups, bias=module.bias is not None, padding_mode=module.padding_mode,
            device="meta",
        )
        q.weight, q.bias = module.weight, module.bias
        q._init_quant()
        if input_splits and module.groups != 1:
            raise ValueError("split-input quantization needs an ungrouped convolution")
        q.weight_quantizer = WeightQuantizer(weight_spec, module.weight.shape, input_splits=input_splits).to(module.weight.device)
        if act_spec is not None and act_spec.granularity == "per_channel_smooth" and module.groups != 1:
            act_spec = dataclasses.replace(act_spec, granularity="per_tensor")  # a grouped weight has no column per input channel
        q.input_quantizer = (
            ActivationQuantizer(act_spec, context, num_groups, channel_splits=input_splits, channel_axis=1,
                                channels=module.in_channels).to(module.weight.device)
            if act_spec else None
        )
        if calibrate_weights:
            q.weight_quantizer.calibrate(module.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_activation(self.input_quantizer, x), self._weight(x.dtype), self._bias(x.dtype))

    def to_float(self) -> nn.Conv2d:
        """The plain float layer over the same parameters (the layer leaves quantization; smoothing is undone)."""
        unsmooth_weight(self)
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                          padding_mode=self.padding_mode, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer
