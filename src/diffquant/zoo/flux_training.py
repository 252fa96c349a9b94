"""mini-flux's training step: flow matching on packed latents, with guidance learned into the guidance embedding.

FluxPipeline has no classifier-free guidance through ``guidance_scale``: that number feeds the
transformer's guidance embedding (FLUX.1-dev is guidance-distilled). Distilling from a separate
CFG teacher would double the run, so the guidance is learned online (model guidance, Tang et al.
2025, "Diffusion Models without Classifier-free Guidance"): from ``guide_from`` on, half of each
batch gets a guidance ``w`` in [1, ``w_max``] and the target ``(noise - x0) + (w - 1) (v_c - v_u)``,
where ``v_c``/``v_u`` are the EMA model's conditional and empty-caption velocities at guidance 1.
In expectation that is the CFG velocity ``v_u + w (v_c - v_u)``; at ``w = 1`` it is plain flow matching,
so ``guidance_scale=1`` samples the conditional model whatever the guidance training did.

Text is encoded as ``FluxPipeline.encode_prompt`` does at ``max_sequence_length=FLUX_T5_TOKENS``:
CLIP's pooled output, and T5 over the caption padded to that length (no attention mask).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .architectures import FLUX_T5_TOKENS

def encode_text(modules: dict[str, nn.Module], tokenizer, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 tokens, CLIP pooled) exactly as ``FluxPipeline.encode_prompt(..., max_sequence_length=FLUX_T5_TOKENS)``."""
    def ids(length: int) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    pooled = modules["text_encoder"](ids(tokenizer.model_max_length), output_hidden_states=False).pooler_output
    return modules["text_encoder_2"](ids(FLUX_T5_TOKENS), output_hidden_states=False)[0], pooled


class FluxStep:
    """Prediction and target of one mini-flux training batch; owns the EMA teacher used for guidance."""

    def __init__(self, pipe, modules: dict[str, nn.Module], guide_from: int, w_max: float = 5.0) -> None:
        from diffusers import FluxPipeline

        self.pipe, self.modules, self.guide_from, self.w_max = pipe, modules, guide_from, w_max
        self.pack = FluxPipeline._pack_latents
        self.teacher: dict[str, nn.Module] | None = None

    @staticmethod
    def image_ids(h: int, w: int, device) -> torch.Tensor:
        """RoPE positions of h x w latents packed 2x2, as ``FluxPipeline.prepare_latents`` gives them."""
        from diffusers import FluxPipeline

        return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)

    def _call(self, modules, zt, sigma, w, captions, device, img_ids) -> torch.Tensor:
        tokens, pooled = encode_text(modules, self.pipe.tokenizer, captions, device)
        return modules["transformer"](hidden_states=zt, timestep=sigma, guidance=w, pooled_projections=pooled,
                                      encoder_hidden_states=tokens, txt_ids=torch.zeros(tokens.shape[1], 3, device=device),
                                      img_ids=img_ids).sample

    def _refresh_teacher(self, ema) -> None:
        """The EMA weights of this step (copied every guided step, so a resumed run sees the same teacher)."""
        if self.teacher is None:
            self.teacher = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in self.modules.items()}
        ema.copy_to(self.teacher)

    def __call__(self, step: int, gen: torch.Generator, z: torch.Tensor, noise: torch.Tensor, captions: list[str],
                 ema) -> tuple[torch.Tensor, torch.Tensor]:
        device = z.device
        b, c, h, w_ = z.shape
        sigma = torch.sigmoid(torch.randn(b, generator=gen)).to(device)  # logit-normal, as SD3
        x0, eps = self.pack(z, b, c, h, w_), self.pack(noise, b, c, h, w_)
        img_ids = self.image_ids(h, w_, device)
        s = sigma.view(-1, 1, 1)
        zt = (1 - s) * x0 + s * eps
        target = eps - x0
        w = torch.ones(b)
        if step >= self.guide_from:
            guided = (torch.rand(b, generator=gen) < 0.5) & torch.tensor([bool(cap) for cap in captions])
            w = torch.where(guided, 1 + (self.w_max - 1) * torch.rand(b, generator=gen), w)
            idx = guided.nonzero().flatten().tolist()
            if idx:
                self._refresh_teacher(ema)
                with torch.no_grad():
                    sub = [captions[i] for i in idx] + [""] * len(idx)
                    v = self._call(self.teacher, zt[idx].repeat(2, 1, 1), sigma[idx].repeat(2), torch.ones(2 * len(idx),
                                   device=device), sub, device, img_ids)
                    v_c, v_u = v.chunk(2)
                target = target.clone()
                target[idx] += (w[idx] - 1).to(device).view(-1, 1, 1) * (v_c - v_u)
        pred = self._call(self.modules, zt, sigma, w.to(device), captions, device, img_ids)
        return pred, target
