"""Paired generation: every model renders the same (prompt, seed) from the same initial noise, cached on disk.

Images are cached as PNG under ``cache_dir/<model fingerprint>/<key>.png`` (a ``diffquant.checkpoint``
folder keyed by the fingerprint; each PNG written atomically), the key hashing prompt,
seed, steps, guidance and size, so re-running an evaluation (or a bench that shares the FP model)
generates nothing it already has. The fingerprint hashes every weight, buffer and the module
structure of the pipeline, so a quantized model never hits the FP model's cache entries.

Batches are fixed: items ``[b·B, (b+1)·B)`` form batch ``b`` whatever is cached, and a batch with an
image missing is rendered whole (only its missing images are written). An image therefore never
depends on what was cached before: a killed run resumes to the same PNGs, and ``render`` with
``shard=(i, n)`` (process ``i`` of ``n`` under ``accelerate launch``) renders batches ``b % n == i``
into a shared cache with the same result as one process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..guard import guard_pipeline
from ..io import atomic_path
from ..sampling import SamplingSettings, paired_noise, sample
from .prompts import PromptItem


@dataclass
class GenStats:
    generated: int = 0
    cached: int = 0


def _is_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass that stores its data in inner tensors (torchao, quanto), not a plain tensor or parameter."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def plain_tensors(t: torch.Tensor | None, prefix: str = ""):
    """(path, plain tensor) pairs of ``t``: tensor subclasses (torchao, quanto) contribute their inner data, scales
    and zero points; an optional part a subclass does not hold (quanto's unset activation scales) is skipped."""
    if t is None:
        return
    if _is_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from plain_tensors(getattr(t, name), f"{prefix}.{name}")
        return
    yield prefix, t.detach()


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    """Hash a tensor's exact bytes; a tensor subclass hashes its type, its context and its inner tensors."""
    if _is_subclass(t):
        h.update(f"{type(t).__name__}{t.__tensor_flatten__()[1]!r}".encode())
    for name, plain in plain_tensors(t):
        plain = plain.cpu().contiguous().reshape(-1)
        h.update(f"{name}{plain.dtype}{plain.numel()}".encode())  # name is "" for a plain tensor: its earlier hash
        if plain.numel():
            h.update(plain.view(torch.uint8).numpy())


def model_fingerprint(pipe) -> str:
    """Hex digest over the structure, weights and buffers of every module in the pipeline plus its scheduler config.

    Quantizer parameters live in buffers or in the wrapper modules' reprs, so a quantized model's fingerprint
    differs from its FP source even when the stored float weights are equal.
    """
    h = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            h.update(f"{name}:{component!r}".encode())
            for key, value in component.state_dict(keep_vars=False).items():
                h.update(key.encode())
                _hash_tensor(h, value)
        elif name == "scheduler" and component is not None:
            # diffusers lists `_use_default_values` in set order, which changes from process to process
            config = {k: v for k, v in component.config.items() if k != "_use_default_values"}
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cache_key(item: PromptItem, settings: SamplingSettings) -> str:
    """Hash of the prompt, the item's seed and the settings (``settings.seed`` is unused: each item has its own)."""
    fields = {k: v for k, v in settings.to_dict().items() if k != "seed"}
    payload = json.dumps({"prompt": item.prompt, "seed": item.seed, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _write_png(path: Path, image: np.ndarray, item: PromptItem) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", item.prompt)
    info.add_text("seed", str(item.seed))
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


@torch.no_grad()
def cache_paths(cache_dir: str | Path, fingerprint: str, items: list[PromptItem], settings: SamplingSettings) -> list[Path]:
    """Where the PNG of each item rendered by the model with ``fingerprint`` lives in the cache."""
    folder = Path(cache_dir) / fingerprint
    return [folder / f"{cache_key(item, settings)}.png" for item in items]


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNGs as float [N, 3, H, W] in [0, 1]."""
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def render(pipe, items: list[PromptItem], settings: SamplingSettings, cache_dir: str | Path, batch_size: int = 4,
           label: str = "model", fingerprint: str | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[list[Path], GenStats]:
    """Write the missing cache PNGs of this shard's batches; returns every item's PNG path and the counts of this shard."""
    index, num_shards = shard
    fingerprint = fingerprint or model_fingerprint(pipe)
    checkpoint = Checkpoint.keyed(cache_dir, fingerprint, f"the images of {label}").open()
    paths = cache_paths(checkpoint.folder.parent, fingerprint, items, settings)
    mine = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)][index::num_shards]
    todo = [batch for batch in mine if not all(paths[i].exists() for i in batch)]
    stats = GenStats(cached=sum(len(batch) for batch in mine))
    for batch in tqdm(todo, desc=f"generate {label}", unit="batch", disable=not todo):
        noise = paired_noise(pipe, [items[i].seed for i in batch], settings)
        with guard_pipeline(pipe, f"'{label}' sampling"):
            out = sample(pipe, [items[i].prompt for i in batch], settings, **noise, output_type="np")
        images = np.clip(np.round(np.asarray(out, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        for i, image in zip(batch, images):
            if not paths[i].exists():
                _write_png(paths[i], image, items[i])
                stats.generated += 1
                stats.cached -= 1
    checkpoint.reused(stats.cached, "image")
    return paths, stats


def generate(pipe, items: list[PromptItem], settings: SamplingSettings, cache_dir: str | Path, batch_size: int = 4,
             label: str = "model", fingerprint: str | None = None) -> tuple[torch.Tensor, GenStats]:
    """Images for ``items`` as float [N, 3, H, W] in [0, 1] (from the 8-bit PNGs, cached or fresh) and hit counts."""
    paths, stats = render(pipe, items, settings, cache_dir, batch_size, label, fingerprint)
    return load_images(paths), stats
