"""Prompt input: a text file (one prompt per line), a JSON list of prompts or of {prompt, seed}."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(source: str | Path) -> list[tuple[str, int | None]]:
    """(prompt, seed or None) pairs from ``source``; blank lines and ``#`` comments are skipped.

    ``zoo:calibration`` and ``zoo:heldout`` name the mini zoo's built-in sets.
    """
    text_source = str(source)
    if text_source.startswith("zoo:"):
        from . import zoo

        sets = {"calibration": zoo.calibration_prompts, "heldout": zoo.heldout_prompts}
        which = text_source.split(":", 1)[1]
        if which not in sets:
            raise ValueError(f"unknown built-in prompt set {text_source!r}; use zoo:calibration or zoo:heldout")
        return [(p, None) for p in sets[which]()]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; pass a .txt (one prompt per line) or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path} ({e}); save it as UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); expected a list of prompts or of {{prompt, seed}}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of prompts or of {{\"prompt\": ..., \"seed\": ...}} objects")
        pairs = []
        for item in data:
            if isinstance(item, str):
                pairs.append((item, None))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                pairs.append((item["prompt"], None if item.get("seed") is None else int(item["seed"])))
            else:
                raise ValueError(f"{path}: entry {item!r} is neither a prompt nor a {{prompt, seed}} object")
    else:
        pairs = [(line.strip(), None) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not pairs:
        raise ValueError(f"prompt file {path} holds no prompts; add one prompt per line")
    return pairs


def prompt_list(source: str | Path) -> list[str]:
    return [p for p, _ in read_prompts(source)]
