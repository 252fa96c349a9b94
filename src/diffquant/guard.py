"""NaN/Inf caught where they appear: a check after every denoiser call, and a per-layer locator run only after a failure.

``with nonfinite_guard(pipe, "sampling"):`` around any pipeline call (generation, evaluation,
calibration recording) turns the first non-finite denoiser output into one ``NonFiniteError`` line:
which denoiser call (step) and timestep, the first layer whose output is non-finite (found by
re-running that one call with a hook on every layer), and the cause — NaN/Inf weights (a broken
file), a quantized model diverging, or float16 overflow — each with its own fix. The check itself
is one ``isfinite`` per denoiser call; the locator costs one extra call, only after a failure.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from .models.adapters import get_denoiser
from .nn import QuantModule
from .quant.quantizers import OVERFLOW_FIX, NonFiniteError
from .sampling import DenoiserStep, denoiser_calls


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        for item in (output.to_tuple() if hasattr(output, "to_tuple") else output):
            if isinstance(item, torch.Tensor):
                return item
    return None


def _finite(output) -> bool:
    t = _first_tensor(output)
    return t is None or not t.is_floating_point() or bool(torch.isfinite(t).all())


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the parameters and float buffers of ``model`` that hold NaN or Inf."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return [name for name, t in tensors if not bool(torch.isfinite(t).all())]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantModule) for m in model.modules()) or getattr(model, "diffquant", None) is not None


def diagnose(model: nn.Module, layer: str | None = None, quantized: bool | None = None) -> str:
    """The cause of non-finite values in ``model`` and its fix, in one clause.

    ``quantized=None`` asks the model; calibration passes False (its quantizers only observe, outputs are float).
    """
    bad = nonfinite_weights(model)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f"the model's weights hold NaN/Inf ({bad[0]}{more}): the file is broken; re-create or re-download it"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        return f"the {str(dtype).removeprefix('torch.')} model overflows; " + OVERFLOW_FIX.split("; ", 1)[1]
    if is_quantized(model) if quantized is None else quantized:
        keep = f" or keep it float (--keep-float '{layer}')" if layer else ""
        return f"the quantized model diverges here; re-quantize with more calibration prompts or higher --abits{keep}"
    return "the float32 model's activations overflow; lower the guidance scale or check the model's weights and inputs"


def locate(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Re-run one call of ``model`` (``forward``: no model-level hooks) and return the first layer, in execution
    order, whose output is non-finite."""
    found: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, inputs, output) -> None:
            if not found and not _finite(output):
                found.append(name)
        return check

    named = [(n, m) for n, m in model.named_modules() if n and (isinstance(m, QuantModule) or not list(m.children()))]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            model.forward(*args, **kwargs)
    except Exception:  # the locator only adds detail; the original failure is reported either way
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


@contextmanager
def nonfinite_guard(pipe_or_denoiser, what: str = "sampling", quantized: bool | None = None) -> Iterator[None]:
    """Raise ``NonFiniteError`` at the first denoiser call whose output holds NaN/Inf (see the module doc).

    Built on the sampling core's ``denoiser_calls`` hook. A ``NonFiniteError`` raised inside by other code
    (e.g. an activation observer during calibration) gets the same diagnosis of its cause. ``quantized``
    as for :func:`diagnose`.
    """
    denoiser = get_denoiser(pipe_or_denoiser)

    def check(call: DenoiserStep) -> None:
        if _finite(call.output):
            return
        layer = locate(denoiser, call.args, call.kwargs)
        where = f"the denoiser output at {what} step {call.step + 1} (timestep {call.timestep})"
        if layer is not None:
            where += f", first in the output of {layer}"
        error = NonFiniteError(where, diagnose(denoiser, layer, quantized))
        error.diagnosed = True
        raise error

    try:
        with denoiser_calls(denoiser, after=check):
            yield
    except NonFiniteError as e:
        if getattr(e, "diagnosed", False):
            raise
        error = NonFiniteError(e.where, diagnose(denoiser, quantized=quantized))
        error.diagnosed = True
        raise error from None


def guard_pipeline(pipe, what: str = "sampling"):
    """:func:`nonfinite_guard` on ``pipe``'s torch denoiser; no guard for a pipeline without one (another engine)."""
    try:
        get_denoiser(pipe)
    except TypeError:
        return nullcontext()
    return nonfinite_guard(pipe, what)


__all__ = ["NonFiniteError", "diagnose", "guard_pipeline", "locate", "nonfinite_guard", "nonfinite_weights"]
