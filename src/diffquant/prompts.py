"""Prompt input: a text file (one prompt per line), a JSON list of prompts or of {prompt, seed}, or a
registered prompt set such as the mini zoo's (``zoo:heldout[:N]``, ``zoo:calibration[:N]``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .registry import PROMPT_SETS


class PromptFileNotFound(FileNotFoundError, ValueError):
    """A missing prompt file: a user error under either name callers catch."""


def _prompt_set(spec: str) -> list[str]:
    source, split, *rest = spec.split(":")
    make = PROMPT_SETS.get(f"{source}:{split}")
    if make is None or len(rest) > 1:
        named = ", ".join(k for k in PROMPT_SETS if k.startswith(f"{source}:"))
        raise ValueError(f"unknown built-in prompt set {spec!r}; use one of {named} (optionally ':N')")
    try:
        count = int(rest[0]) if rest else None
    except ValueError:
        raise ValueError(f"bad prompt set {spec!r}: the count after the second ':' must be an integer") from None
    return list(make(count) if count is not None else make())


def read_prompts(source: str | Path) -> list[tuple[str, int | None]]:
    """(prompt, seed or None) pairs from ``source``; blank lines and ``#`` comments are skipped."""
    text_source = str(source)
    if text_source.split(":")[0] in {k.split(":")[0] for k in PROMPT_SETS}:
        pairs: list[tuple[str, int | None]] = [(p, None) for p in _prompt_set(text_source)]
    else:
        path = Path(source)
        if not path.is_file():
            raise PromptFileNotFound(f"prompt file {path} not found; pass a .txt (one prompt per line), a .json list "
                                     f"or zoo:heldout")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {path} ({e}); save it as UTF-8 text") from None
        pairs = _parse_json(path, text) if path.suffix.lower() == ".json" else [
            (line.strip(), None) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not pairs:
        raise ValueError(f"prompt set {text_source} is empty (it holds no prompts); add one prompt per line")
    return pairs


def _parse_json(path: Path, text: str) -> list[tuple[str, int | None]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a list of prompts or of {{prompt, seed}}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of prompts or of {{\"prompt\": ..., \"seed\": ...}} objects")
    pairs: list[tuple[str, int | None]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            pairs.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            seed = item.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"{path}, item {i}: 'seed' must be an integer")
            pairs.append((item["prompt"], seed))
        else:
            raise ValueError(f"{path}, item {i}: expected a prompt string or a {{prompt, seed}} object")
    return pairs


def prompt_list(source: str | Path) -> list[str]:
    return [p for p, _ in read_prompts(source)]


def warn_truncated(pipe: Any, prompts: list[str]) -> int:
    """Warn once when prompts exceed the pipeline's text-encoder limit (they are truncated); returns how many do.

    The limit is that of the pipeline's longest-reaching tokenizer (SD3's T5 reads past CLIP's 77 tokens).
    """
    limits = [(t.model_max_length, t) for t in (getattr(pipe, a, None) for a in ("tokenizer", "tokenizer_2", "tokenizer_3"))
              if t is not None and 0 < getattr(t, "model_max_length", 0) < 100_000]
    if not limits or not prompts:
        return 0
    limit, tokenizer = max(limits, key=lambda pair: pair[0])
    lengths = [len(tokenizer(p, truncation=False)["input_ids"]) for p in prompts]
    long = [p for p, n in zip(prompts, lengths) if n > limit]
    if long:
        logging.getLogger("diffquant").warning(
            "warning: %d of %d prompts are longer than the text encoder's %d-token limit and are truncated (first: %r)",
            len(long), len(prompts), limit, long[0][:60] + ("..." if len(long[0]) > 60 else ""))
    return len(long)
