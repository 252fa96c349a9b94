"""Time information precalculation (EMF): time-dependent projections become float lookup tables.

Every layer the adapter names as time-dependent (UNet: the time-embedding MLP, SDXL's
``text_time`` add-embedding, each ResNet's ``time_emb_proj``; SD3: the timestep/pooled-text
embedders and every adaLN modulation ``linear``; Flux the same plus guidance; PixArt/SANA the shared
adaLN-single projection) depends only on the timestep and, where the model has it, the per-prompt
pooled conditioning. The adapter runs that path alone (``time_path``) and names its inputs
(``time_condition``). Its output is computed once per
(timestep, conditioning) key in full precision and afterwards looked up, so those layers leave
the quantized graph (they stay plain float ``nn.Linear``) and cost no matmul in the loop. A time layer may also
be a fake-quantized ``QuantLinear`` / ``QuantConv2d`` (EMF's ``time_layers="quantized"``): the table then caches
its quantized output, computed once per key like the float one.

Readings chosen (the paper gives only figure captions):

- Keys are ``(t rounded to 1e-3, digest of the sample's pooled conditioning rows)``; for SD 1.x/2.x
  the digest is empty, so one entry per step serves every prompt. SDXL keys on ``text_embeds`` and
  ``time_ids``; SD3 on ``pooled_projections``, Flux on it and ``guidance``. t is put on a 0..1000 axis
  first (Flux passes the scheduler's t / 1000).
- Only the matmuls are replaced; the elementwise ops between them (sinusoidal projection, SiLU)
  still run, in float (they are cheap and never quantized).
- ``precalculate`` fills the tables for given (t, conditioning) rows before a loop (training:
  every dataset row; generation with ``attach_scheduler``: every step of the schedule on the
  first call of a prompt batch). A key still missing is computed live and stored (``misses``).
- Tables are not saved: a saved model keeps the time layers as float ``nn.Linear`` weights and
  computes them live after ``diffquant.load`` (the same values: generation fills a table one step at a time, each
  call shaped as the live one, so CPU kernels chosen by row count round alike);
  ``TimePrecalculation.install(denoiser)`` rebuilds the tables on a loaded model.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.adapters import get_adapter

Key = tuple[float, str]


def _flat_cond(bound: dict[str, Any], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name in names:
        value = bound.get(name)
        if torch.is_tensor(value):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items() if torch.is_tensor(v)})
    return flat


def row_keys(timesteps: torch.Tensor, cond: dict[str, torch.Tensor], batch: int, timestep_range: float = 1000.0) -> list[Key]:
    """One key per sample: the timestep (on a 0..1000 axis, rounded to 1e-3) and a digest of that sample's conditioning rows."""
    t = torch.as_tensor(timesteps).detach().flatten().double().cpu() * (1000.0 / timestep_range)
    if t.numel() == 1:
        t = t.expand(batch)
    rows = [hashlib.blake2b(digest_size=12) for _ in range(batch)]
    for name in sorted(cond):
        value = cond[name].detach().float().cpu().contiguous()
        if value.dim() == 0 or value.shape[0] != batch:
            value = value.reshape(1, -1).expand(batch, -1).contiguous()
        for i in range(batch):
            rows[i].update(name.encode())
            rows[i].update(value[i].numpy().tobytes())
    return [(round(float(t[i]), 3), rows[i].hexdigest()) for i in range(batch)]


class _Lookup:
    """Instance ``forward`` of one float time layer: rows come from its table, misses run live.

    A plain callable (not a module), so the layer's state dict and class stay untouched.
    """

    def __init__(self, owner: TimePrecalculation, layer: nn.Module) -> None:
        self.owner, self.layer = owner, layer
        self.table: dict[Key, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.owner.keys
        live = type(self.layer).forward
        if keys is None or len(keys) != x.shape[0]:
            return live(self.layer, x)
        missing = [i for i, k in enumerate(keys) if k not in self.table]
        if missing:
            scale = self.owner.adapter.timestep_range / 1000.0
            with torch.no_grad(), self.owner.groups_of(torch.tensor([keys[i][0] * scale for i in missing])):
                rows = live(self.layer, x[missing]).detach()
            for i, row in zip(missing, rows):
                self.table.setdefault(keys[i], row)
            self.owner.misses += len(missing)
        return torch.stack([self.table[k] for k in keys]).to(x.dtype)


class TimePrecalculation:
    """Lookup tables for a denoiser's time-dependent layers (see the module docstring)."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.adapter = adapter = get_adapter(denoiser)
        self.denoiser, self.family = denoiser, adapter.family
        self.layer_names = adapter.time_layers()
        self.keys: list[Key] | None = None
        self.misses = 0
        self.scheduler = None
        self._signature = inspect.signature(denoiser.forward)
        self._lookups: dict[str, _Lookup] = {}
        self._handle = None
        self.bypass = False  # live_time_layers: every layer computes live, the tables are neither read nor filled

    @classmethod
    def install(cls, denoiser: nn.Module) -> TimePrecalculation:
        """Route every time layer of ``denoiser`` through a table; returns the installed object."""
        existing = getattr(denoiser, "diffquant_time_tables", None)
        if existing is not None:
            return existing
        self = cls(denoiser)
        for name in self.layer_names:
            layer = denoiser.get_submodule(name)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):  # float, or diffquant's fake-quant subclasses
                raise ValueError(f"time layer {name} is {type(layer).__name__}; install tables before converting the model")
            lookup = _Lookup(self, layer)
            layer.forward = lookup
            self._lookups[name] = lookup
        self._handle = denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        denoiser.diffquant_time_tables = self
        return self

    def remove(self) -> None:
        """Back to live computation of every time layer."""
        for name in self._lookups:
            del self.denoiser.get_submodule(name).forward
        self._lookups.clear()
        if self._handle is not None:
            self._handle.remove()
        del self.denoiser.diffquant_time_tables

    @property
    def condition_args(self) -> tuple[str, ...]:
        """The denoiser arguments (besides t) the time path reads: the keys' conditioning."""
        return self.adapter.time_condition

    @contextmanager
    def groups_of(self, timesteps: torch.Tensor) -> Iterator[None]:
        """While computing rows of ``timesteps``, quantized time layers (a wrapped denoiser's) use those rows' own
        activation groups, not the group of the call in flight: a table row may belong to any step of the schedule."""
        record = getattr(self.denoiser, "diffquant", None)
        if record is None:
            yield
            return
        context = record.context
        saved = context.timestep, context.group
        context.set_timestep(timesteps)
        try:
            yield
        finally:
            context.timestep, context.group = saved

    def attach_scheduler(self, scheduler: Any) -> None:
        """Precalculate every step of ``scheduler.timesteps`` when a new prompt batch first calls the denoiser."""
        self.scheduler = scheduler

    def clear(self) -> None:
        """Drop every table row (the layers stay routed): rows are computed again as calls need them."""
        for lookup in self._lookups.values():
            lookup.table.clear()

    def entries(self) -> int:
        return sum(len(lookup.table) for lookup in self._lookups.values())

    def table(self, name: str) -> dict[Key, torch.Tensor]:
        return self._lookups[name].table

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.bypass:
            self.keys = None
            return
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        first = next(v for v in bound.values() if torch.is_tensor(v))
        t = bound.get("timestep")
        if t is None:
            self.keys = None
            return
        cond = _flat_cond(bound, self.condition_args)
        self.keys = row_keys(torch.as_tensor(t), cond, first.shape[0], self.adapter.timestep_range)
        if self.scheduler is not None and self._lookups:
            probe = next(iter(self._lookups.values())).table
            if any(k not in probe for k in self.keys):
                steps = torch.as_tensor(self.scheduler.timesteps).flatten()
                if self.adapter.timestep_range != 1000.0:  # as the pipeline computes it (Flux: float32 t / 1000)
                    steps = steps.float() / (1000.0 / self.adapter.timestep_range)
                # One step at a time, shaped as the live call: CPU GEMM kernels are chosen by the row count (on
                # AVX-512 a row's result differs in the last bits between 1, 2 and 16 rows), so a table filled in
                # one call of steps x batch rows would differ from live computation by float rounding.
                keys = self.keys
                for step in steps:
                    self.precalculate(step.expand(first.shape[0]), cond)
                self.keys = keys

    @torch.no_grad()
    def precalculate(self, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Fill the tables for rows (timesteps[i], cond rows i) by running only the time path in float.

        ``cond`` holds the flat conditioning arguments (``pooled_projections``,
        ``added_cond_kwargs.text_embeds`` ...), one row per timestep.
        """
        param = next(self.denoiser.parameters())
        t = torch.as_tensor(timesteps).flatten().to(param.device)
        n = t.shape[0]
        cond = {k: v.to(param.device, param.dtype if v.is_floating_point() else None) for k, v in cond.items()}
        self.keys = row_keys(t, cond, n, self.adapter.timestep_range)
        misses = self.misses  # filling is not a miss
        try:
            with self.groups_of(t):
                self.adapter.time_path(t, cond)
        finally:
            self.keys = None
            self.misses = misses


@contextmanager
def live_time_layers(denoiser: nn.Module) -> Iterator[None]:
    """While inside, ``denoiser``'s time layers compute live, tables kept (a no-op without tables). What a graph
    export must trace: a table lookup is Python, so a trace would bake in the example call's rows as constants and
    every later call would get them whatever its timestep (an EMF model on OpenVINO generated nothing)."""
    tables = getattr(denoiser, "diffquant_time_tables", None)
    if tables is None:
        yield
        return
    tables.bypass = True
    try:
        yield
    finally:
        tables.bypass = False
