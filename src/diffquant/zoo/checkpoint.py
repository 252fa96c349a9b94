"""Training checkpoints of the mini zoo: EMA shadows, atomic save and exact resume (weights, EMA, AdamW moments)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..outputs import claim_output, recover_output


class EMA:
    """Exponential moving average of parameters (float32 shadows); sampling uses the EMA weights."""

    def __init__(self, modules: dict[str, nn.Module], decay: float = 0.999) -> None:
        self.decay = decay
        self.modules = modules
        self.shadow = {f"{n}.{k}": p.detach().float().clone() for n, m in modules.items()
                       for k, p in m.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, m in self.modules.items():
            for k, p in m.named_parameters():
                self.shadow[f"{n}.{k}"].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        for n, m in modules.items():
            for k, p in m.named_parameters():
                p.copy_(self.shadow[f"{n}.{k}"])


def save_checkpoint(folder: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, ema: EMA | None = None) -> None:
    """Atomically write weights, EMA, AdamW state (safetensors) and the step (JSON) to ``folder`` (a folder swap
    through ``diffquant.outputs``: the previous checkpoint stays whole until the new one replaces it)."""
    with claim_output(folder, overwrite=True) as output:
        _write_checkpoint(output.tmp, step, modules, optimizer, extra, ema)
        output.publish()


def _write_checkpoint(tmp: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                      extra: dict | None, ema: EMA | None) -> None:
    tmp.mkdir()
    # clone: tied weights (T5's shared embedding) share storage, which safetensors refuses
    tensors = {f"{n}.{k}": v.detach().cpu().clone() for n, m in modules.items() for k, v in m.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    opt_tensors, opt_steps = {}, {}
    state = optimizer.state_dict()["state"]
    for idx, st in state.items():
        for key, val in st.items():
            if key == "step":
                opt_steps[str(idx)] = float(val)
            elif torch.is_tensor(val):
                opt_tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "optimizer_steps": opt_steps, "time": time.time(), **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None,
                    ema: EMA | None = None) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step (0 when there is none)."""
    folder = Path(folder)
    recover_output(folder)  # a checkpoint swap killed half-way
    if not (folder / "state.json").exists():
        return 0
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    for n, m in modules.items():
        prefix = n + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if ema is not None and (folder / "ema.safetensors").exists():
        ema.shadow = {k: v.float() for k, v in load_file(str(folder / "ema.safetensors")).items()}
    if optimizer is not None:
        opt_t = load_file(str(folder / "optimizer.safetensors"))
        sd = optimizer.state_dict()
        state: dict[int, dict] = {}
        for key, val in opt_t.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = val
        for idx, s in meta["optimizer_steps"].items():
            state.setdefault(int(idx), {})["step"] = torch.tensor(s)
        sd["state"] = state
        optimizer.load_state_dict(sd)
    return int(meta["step"])
