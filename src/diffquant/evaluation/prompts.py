"""Prompt sets for paired evaluation: text files, JSON lists, or the mini zoo's built-in splits.

Every item carries its own seed, so a (prompt, seed) pair names one image in every model's run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..prompts import read_prompts
from ..sampling import check_prompts, is_unconditional, unconditional_prompts

DEFAULT_PROMPTS = "zoo:heldout:16"
DEFAULT_SAMPLES = 16


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
        if m.group(2) and int(m.group(2)) < lo:
            raise ValueError(f"empty --seeds range {part.strip()!r}: write the smaller seed first, e.g. '{m.group(2)}-{lo}'")
        seeds.extend(range(lo, int(m.group(2)) + 1) if m.group(2) else [lo])
    return seeds


def load_prompts(spec: str | Path, seeds: list[int] | None = None, limit: int | None = None) -> list[PromptItem]:
    """Read prompts from ``spec`` (see :func:`diffquant.prompts.read_prompts`) and pair each with seeds.

    A built-in set without a count (``zoo:heldout``) means its first 16 prompts. Prompts without their
    own seed are crossed with ``seeds`` (default [0]). ``limit`` keeps the first items only.
    """
    seeds = seeds or [0]
    spec = str(spec)
    if spec.startswith("zoo:") and spec.count(":") == 1:
        spec += ":16"
    items: list[PromptItem] = []
    for prompt, seed in read_prompts(spec):
        items.extend([PromptItem(prompt, seed)] if seed is not None else [PromptItem(prompt, s) for s in seeds])
    return items[:limit] if limit is not None else items


CALIBRATION_SEED_BASE = 1_000_000


def calibration_seeds(n: int, draw: int = 0) -> list[int]:
    """Seeds of ``n`` calibration samples of an unconditional model in a paired comparison: 1000000 + 100000 * draw + i,
    apart from every evaluation seed below a million (a model calibrated on the images it is judged on would flatter
    itself). ``draw`` picks another, disjoint calibration set (up to 100000 samples each): how much a result owes to
    its calibration draw is measured by repeating it over draws."""
    if n > 100_000 or draw < 0:
        raise ValueError(f"calibration draws hold 1..100000 samples and are numbered from 0; got n={n}, draw={draw}")
    return [CALIBRATION_SEED_BASE + 100_000 * draw + i for i in range(n)]


def sample_items(pipe, prompts: str | None, seeds: str | None, num_samples: int | None) -> list[PromptItem]:
    """The (prompt, seed) items a sampling command runs on ``pipe``: ``prompts`` (default the zoo's held-out set)
    crossed with ``seeds`` for a text model; for an unconditional one, one empty-prompt item per seed (``--seeds``, else
    0..N-1 with N from ``--num-samples``, default 16). Options that do not fit the model are one-line errors."""
    if not is_unconditional(pipe):
        if num_samples is not None:
            raise ValueError(f"--num-samples is for unconditional models; {type(pipe).__name__} is text-conditioned: "
                             "pass --prompts (and --seeds)")
        return load_prompts(prompts or DEFAULT_PROMPTS, parse_seeds(seeds))
    check_prompts(pipe, None if prompts is None else [prompts])
    if seeds is not None and num_samples is not None:
        raise ValueError("give --seeds or --num-samples, not both")
    chosen = parse_seeds(seeds) if seeds is not None else list(range(num_samples or DEFAULT_SAMPLES))
    return [PromptItem(p, s) for p, s in zip(unconditional_prompts(len(chosen)), chosen)]
