"""Quantized attention matmuls through diffusers attention processors.

The processors mirror diffusers' ``AttnProcessor2_0`` (UNet and PixArt self/cross attention),
``JointAttnProcessor2_0`` (SD3 MMDiT joint attention, SD3.5's second attention) and ``FluxAttnProcessor``
(Flux double- and single-stream attention, RoPE applied to q and k before they are quantized, so the
quantized q/k are the ones the matmul sees) and ``SanaLinearAttnProcessor2_0`` (SANA's ReLU linear attention:
q, k, v only, no softmax) and quantize the inputs of the two matmuls:
q, k, v, and the softmax output (unsigned grid), or with ``attention_quantizers="qk"`` q and k only, the attention
itself then staying ``scaled_dot_product_attention`` (what OpenVINO runs as its int8 MHA). With quantization off they call
``scaled_dot_product_attention`` exactly like the originals, so a wrapped model is bit-identical
to the float one. The q/k/v/out projections are ordinary Linear layers, wrapped separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..quant import ActivationQuantizer, QuantSpec, TimestepContext
from .base import QuantModule
from .state import QuantState


class _QuantAttentionCore(QuantModule):
    def __init__(self, act_spec: QuantSpec, softmax_spec: QuantSpec | None, context: TimestepContext | None, num_groups: int,
                 quantize_v: bool = True):
        super().__init__()
        self._init_quant()
        self.weight_quantizer = None
        self.q_quantizer = ActivationQuantizer(act_spec, context, num_groups)
        self.k_quantizer = ActivationQuantizer(act_spec, context, num_groups)
        self.v_quantizer = ActivationQuantizer(act_spec, context, num_groups) if quantize_v else None
        self.softmax_quantizer = None if softmax_spec is None else ActivationQuantizer(softmax_spec, context, num_groups)

    def _active(self) -> bool:
        modes = {q.mode for q in self.activation_quantizers()}
        return "observe" in modes or ("quantize" in modes and self.act_quant_enabled)

    @property
    def qk_only(self) -> bool:
        """Only q and k are quantized (``attention_quantizers="qk"``): the fused attention op stays."""
        return self.v_quantizer is None and self.softmax_quantizer is None

    def quantize_projections(self, attn, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """q/k-only mode without q/k norms: quantize the projections' outputs [B, L, C] before the head split (a
        per-tensor grid commutes with it, so the values are the same), where OpenVINO fuses the quantizer into the
        projection and runs the attention on int8 q and k, as with NNCF's INT8; returns (q, k, whether done)."""
        if not (self.qk_only and self._active() and attn.norm_q is None and attn.norm_k is None):
            return query, key, False
        return self._quantize_activation(self.q_quantizer, query), self._quantize_activation(self.k_quantizer, key), True

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               qk_quantized: bool = False) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v on [B, heads, L, d] with quantized matmul inputs (q and k already, when
        ``qk_quantized``)."""
        if not self._active():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        q = query if qk_quantized else self._quantize_activation(self.q_quantizer, query)
        k = key if qk_quantized else self._quantize_activation(self.k_quantizer, key)
        if self.qk_only:  # the fused op stays (engines' int8 MHA)
            return F.scaled_dot_product_attention(q, k, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        v = self._quantize_activation(self.v_quantizer, value)
        scores = (q @ k.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
        probs = self._quantize_activation(self.softmax_quantizer, scores.softmax(dim=-1))
        return probs @ v


class QuantAttnProcessor(_QuantAttentionCore):
    """Quantized counterpart of diffusers ``AttnProcessor2_0``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        """``forward``'s own signature: diffusers' ``Attention`` passes only the keywords this signature names, and
        UNet2DModel's attention blocks hand in ``temb`` (dropped, with a warning per call, behind ``Module.__call__``)."""
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, qk_quantized = self.quantize_projections(attn, query, key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(query, key, value, attention_mask, qk_quantized)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantJointAttnProcessor(_QuantAttentionCore):
    """Quantized counterpart of diffusers ``JointAttnProcessor2_0`` (SD3 joint attention)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
        hidden_states = self.attend(query, key, value, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class QuantFluxAttnProcessor(_QuantAttentionCore):
    """Quantized counterpart of diffusers ``FluxAttnProcessor`` (text tokens first, then image tokens)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                *args, **kwargs):
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, L, H, D], diffusers' Flux layout
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class QuantSanaLinearAttnProcessor(_QuantAttentionCore):
    """Quantized counterpart of diffusers ``SanaLinearAttnProcessor2_0`` (SANA's ReLU linear attention): the matmul
    inputs q and k (after the ReLU) and v are quantized; there is no softmax, so no softmax quantizer."""

    def __init__(self, act_spec: QuantSpec, softmax_spec: QuantSpec | None, context: TimestepContext | None, num_groups: int,
                 quantize_v: bool = True):
        super().__init__(act_spec, None, context, num_groups, quantize_v)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1)))  # [B, H, d, L]
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3))  # [B, H, L, d]
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        if self._active():
            query = self._quantize_activation(self.q_quantizer, query)
            key = self._quantize_activation(self.k_quantizer, key)
            value = self._quantize_activation(self.v_quantizer, value)
        value = F.pad(value.float(), (0, 0, 0, 1), mode="constant", value=1.0)
        hidden_states = torch.matmul(torch.matmul(value, key.float()), query.float())
        hidden_states = hidden_states[:, :, :-1] / (hidden_states[:, :, -1:] + 1e-15)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2).to(dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states.clip(-65504, 65504) if dtype == torch.float16 else hidden_states


# adapter attention kind -> the quantized processor that replaces the module's own (models.adapters names the kinds)
PROCESSORS = {"standard": QuantAttnProcessor, "joint": QuantJointAttnProcessor, "flux": QuantFluxAttnProcessor,
              "linear": QuantSanaLinearAttnProcessor}

__all__ = ["PROCESSORS", "QuantAttnProcessor", "QuantFluxAttnProcessor", "QuantJointAttnProcessor", "QuantSanaLinearAttnProcessor",
           "QuantState"]
