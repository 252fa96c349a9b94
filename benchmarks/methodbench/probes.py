"""Two diagnostics of one quantized row beyond the harness's metrics: where its image error comes from.

``error_dynamics``: how per-step denoiser errors add up along the sampler's trajectory; ``activation_clipping``:
which activation quantizers carry the error, and whether by clipping or by rounding. Both sample through the
sampling core (``diffquant.sampling``) from the same initial noise as the paired images.
"""

from __future__ import annotations

import torch

from .store import short


@torch.no_grad()
def error_dynamics(fp_pipe, q_pipe, items, settings) -> dict:
    """How one row's per-step denoiser errors turn into image error, on one batch of prompts.

    ``drift``: rel. MSE of the latents after each step, the quantized sampler against the FP sampler from the same
    noise (the error accumulated along the model's own trajectory). Along the FP trajectory, with the guided
    output (uncond + g * (cond - uncond), what the sampler uses): ``guided_rel_mse`` per step, ``dc_fraction``
    (share of the error energy that is a constant offset per image and channel) and ``coherence`` per image,
    |sum_i e_i|^2 / sum_i |e_i|^2 over the steps, averaged (1: the steps' errors are uncorrelated; up to the
    number of steps: the same error at every step, which adds up instead of averaging out).
    An unconditional pipeline (no step callback) gives its drift on the denoiser's input at each step instead: the
    same latents, one step earlier.
    """
    from diffquant.sampling import denoiser_calls, is_unconditional, paired_noise, prediction, sample
    from diffquant.wrap import get_denoiser

    def trajectory(pipe, after=None):
        lat: list[torch.Tensor] = []

        def keep(p, i, t, kw):
            lat.append(kw["latents"].detach().float().clone())
            return {}

        noise = paired_noise(pipe, [it.seed for it in items], settings)
        if is_unconditional(pipe):
            def before(call):
                lat.append((call.args[0] if call.args else call.kwargs["sample"]).detach().float().clone())
            with denoiser_calls(pipe, before=before, after=after):
                sample(pipe, [it.prompt for it in items], settings, **noise)
            return lat
        with denoiser_calls(pipe, after=after):
            sample(pipe, [it.prompt for it in items], settings, **noise,
                   callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        return lat

    def rel(a, b):
        return float(((a - b) ** 2).sum() / (b ** 2).sum().clamp_min(1e-20))

    def guided(x):
        if settings.guidance is not None and settings.guidance > 1 and x.shape[0] == 2 * len(items):
            u, c = x.chunk(2)
            return u + settings.guidance * (c - u)
        return x

    q_denoiser = get_denoiser(q_pipe)
    errors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compare(call):
        ref = guided(call.prediction.float())
        errors.append((guided(prediction(q_denoiser(*call.args, **call.kwargs)).float()) - ref, ref))

    fp_lat = trajectory(fp_pipe, compare)
    q_lat = trajectory(q_pipe)
    e = torch.stack([err for err, _ in errors])  # [steps, B, C, H, W]
    energy = (e ** 2).sum(dim=(2, 3, 4))  # [steps, B]
    dc = (e.mean(dim=(3, 4)) ** 2).sum(dim=2) * e.shape[3] * e.shape[4]
    coherence = (e.sum(0) ** 2).sum(dim=(1, 2, 3)) / energy.sum(0).clamp_min(1e-20)
    return {"n_images": len(items), "drift": [rel(q, f) for q, f in zip(q_lat, fp_lat)],
            "guided_rel_mse": [rel(err + ref, ref) for err, ref in errors],
            "dc_fraction": (dc.sum(1) / energy.sum(1).clamp_min(1e-20)).tolist(), "coherence": float(coherence.mean())}


@torch.no_grad()
def activation_clipping(q_pipe, items, settings, top: int = 12) -> dict:
    """Per activation quantizer, on the quantized model's own sampling of ``items``: its range in use, the share of
    entries outside it, and its error split into clipping and rounding (each relative to the input's energy).
    Returns the ``top`` quantizers by total relative error (which quantizers dominate, and whether by clipping)."""
    from diffquant.quant.affine import qrange
    from diffquant.quant.quantizers import ActivationQuantizer
    from diffquant.sampling import paired_noise, sample
    from diffquant.wrap import get_denoiser

    stats: dict[str, dict] = {}

    def hook(mod, args, output, name):
        if mod.mode != "quantize":
            return
        x = args[0].float()
        g = mod.current_group()
        g = int(g.flatten()[0]) if torch.is_tensor(g) else g
        scale, zp = mod.broadcast_param(mod.scale[g], x, False), mod.broadcast_param(mod.zero_point[g], x, False)
        qmin, qmax = qrange(int(mod.bits[g]), mod.spec.symmetric, mod.spec.unsigned)
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
        xc = torch.maximum(torch.minimum(x, hi), lo)
        st = stats.setdefault(name, {"n": 0, "clipped": 0, "clip": 0.0, "round": 0.0, "energy": 0.0, "lo": float("inf"), "hi": -float("inf")})
        st["n"] += x.numel()
        st["clipped"] += int((x != xc).sum())
        st["clip"] += float(((x - xc) ** 2).sum())
        st["round"] += float(((output.float() - xc) ** 2).sum())
        st["energy"] += float((x ** 2).sum())
        st["lo"], st["hi"] = min(st["lo"], float(lo.min())), max(st["hi"], float(hi.max()))

    denoiser = get_denoiser(q_pipe)
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in denoiser.named_modules()
               if isinstance(m, ActivationQuantizer)]
    try:
        sample(q_pipe, [it.prompt for it in items], settings, **paired_noise(q_pipe, [it.seed for it in items], settings))
    finally:
        for h in handles:
            h.remove()
    rows = {n: {"range": [st["lo"], st["hi"]], "clipped_share": st["clipped"] / st["n"],
                "clip_rel_err": st["clip"] / max(st["energy"], 1e-20), "round_rel_err": st["round"] / max(st["energy"], 1e-20)}
            for n, st in stats.items() if st["n"]}
    ranked = sorted(rows, key=lambda n: -(rows[n]["clip_rel_err"] + rows[n]["round_rel_err"]))
    return {"n_images": len(items), "quantizers": short({n: rows[n] for n in ranked[:top]}, 4)}

