"""Prompt sets for paired evaluation: text files, JSON lists, or the mini zoo's built-in splits.

Every item carries its own seed, so a (prompt, seed) pair names one image in every model's run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    seed: int


def parse_seeds(spec: str | None) -> list[int]:
    """'0,1,2' or '0-3' (inclusive) or a mix like '0-2,7'; None or '' means [0]."""
    if not spec:
        return [0]
    seeds: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"bad --seeds value {spec!r}: use integers like '0,1,2' or a range like '0-3'")
        lo = int(m.group(1))
        seeds.extend(range(lo, int(m.group(2)) + 1) if m.group(2) else [lo])
    return seeds


def _zoo_prompts(split: str, n: int) -> list[str]:
    try:
        from diffquant import zoo
    except ImportError as e:
        raise ValueError(f"prompt set 'zoo:{split}' needs diffquant.zoo, which failed to import ({e}); pass a prompt file instead") from None
    if split in ("heldout", "eval", "test"):
        return list(zoo.heldout_prompts(n))
    if split in ("calibration", "calib", "train"):
        return list(zoo.calibration_prompts(n))
    raise ValueError(f"unknown built-in prompt set 'zoo:{split}': use zoo:heldout or zoo:calibration (optionally ':N')")


def load_prompts(spec: str | Path, seeds: list[int] | None = None, limit: int | None = None) -> list[PromptItem]:
    """Read prompts from ``spec`` and pair each with seeds.

    ``spec`` is a ``.txt`` file (one prompt per line, blank lines and '#' comments ignored), a ``.json`` file
    (a list of strings or of ``{"prompt": ..., "seed": ...}`` objects; objects keep their own seed), or a
    built-in set ``zoo:heldout[:N]`` / ``zoo:calibration[:N]`` (N defaults to 16). Prompts without their own
    seed are crossed with ``seeds`` (default [0]). ``limit`` keeps the first items only.
    """
    seeds = seeds or [0]
    spec = str(spec)
    entries: list[tuple[str, int | None]]
    if spec.startswith("zoo:"):
        _, split, *rest = spec.split(":")
        try:
            n = int(rest[0]) if rest else 16
        except ValueError:
            raise ValueError(f"bad prompt set {spec!r}: the count after the second ':' must be an integer") from None
        entries = [(p, None) for p in _zoo_prompts(split, n)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"prompt file {spec!r} not found: pass a .txt (one prompt per line), a .json list, or zoo:heldout")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"prompt file {spec!r} is not valid JSON ({e.msg} at line {e.lineno}); fix it or use a .txt file") from None
            if not isinstance(data, list):
                raise ValueError(f"prompt file {spec!r} must hold a JSON list of strings or {{'prompt', 'seed'}} objects")
            entries = []
            for i, item in enumerate(data):
                if isinstance(item, str):
                    entries.append((item, None))
                elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                    seed = item.get("seed")
                    if seed is not None and not isinstance(seed, int):
                        raise ValueError(f"prompt file {spec!r}, item {i}: 'seed' must be an integer")
                    entries.append((item["prompt"], seed))
                else:
                    raise ValueError(f"prompt file {spec!r}, item {i}: expected a string or an object with a 'prompt' string")
        else:
            entries = [(line.strip(), None) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    items: list[PromptItem] = []
    for prompt, seed in entries:
        items.extend([PromptItem(prompt, seed)] if seed is not None else [PromptItem(prompt, s) for s in seeds])
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"prompt set {spec!r} is empty: add at least one prompt (one per line)")
    return items
