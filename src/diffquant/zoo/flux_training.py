"""mini-flux's training step: flow matching on packed latents, with guidance learned into the guidance embedding.

FluxPipeline has no classifier-free guidance through ``guidance_scale``: that number feeds the
transformer's guidance embedding (FLUX.1-dev is guidance-distilled). Distilling from a separate
CFG teacher would double the run, so the guidance is learned online (model guidance, Tang et al.
2025, "Diffusion Models without Classifier-free Guidance"): from ``guide_from`` on, half of each
batch gets a guidance ``w`` in [1, ``w_max``] and the target ``(noise - x0) + (w - 1) (v_c - v_u)``,
where ``v_c``/``v_u`` are the EMA model's conditional and empty-caption velocities at guidance 1.
In expectation that is the CFG velocity ``v_u + w (v_c - v_u)``; at ``w = 1`` it is plain flow matching,
so ``guidance_scale=1`` samples the conditional model whatever the guidance training did.

The zero T5 stub's 512 identical tokens are trained as one token whose attention logit is raised by
log(512) (the same function, ~30x fewer tokens; see ``architectures.ZeroTokenJointAttnProcessor``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .architectures import FLUX_T5_TOKENS

def pooled_text(text_encoder, tokenizer, captions: list[str], device) -> torch.Tensor:
    """CLIP's pooled output exactly as ``FluxPipeline._get_clip_prompt_embeds`` computes it."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids, output_hidden_states=False).pooler_output


class FluxStep:
    """Prediction and target of one mini-flux training batch; owns the EMA teacher used for guidance."""

    def __init__(self, pipe, modules: dict[str, nn.Module], guide_from: int, w_max: float = 5.0) -> None:
        from diffusers import FluxPipeline

        self.pipe, self.modules, self.guide_from, self.w_max = pipe, modules, guide_from, w_max
        self.pack = FluxPipeline._pack_latents
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        self.teacher: dict[str, nn.Module] | None = None

    def _call(self, modules, zt, sigma, w, captions, device) -> torch.Tensor:
        transformer = modules["transformer"]
        pooled = pooled_text(modules["text_encoder"], self.pipe.tokenizer, captions, device)
        mask = torch.zeros(1, 1, 1, 1 + zt.shape[1], device=device)
        mask[..., 0] = math.log(FLUX_T5_TOKENS)
        return transformer(hidden_states=zt, timestep=sigma, guidance=w, pooled_projections=pooled,
                           encoder_hidden_states=torch.zeros(zt.shape[0], 1, transformer.config.joint_attention_dim,
                                                             device=device),
                           txt_ids=torch.zeros(1, 3, device=device), img_ids=self.img_ids.to(device),
                           joint_attention_kwargs={"attention_mask": mask}).sample

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
                                   device=device), sub, device)
                    v_c, v_u = v.chunk(2)
                target = target.clone()
                target[idx] += (w[idx] - 1).to(device).view(-1, 1, 1) * (v_c - v_u)
        pred = self._call(self.modules, zt, sigma, w.to(device), captions, device)
        return pred, target
