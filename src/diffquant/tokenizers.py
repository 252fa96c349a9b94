"""Word-level CLIP tokenizers built offline from a word list.

No machine here reaches a model hub, so every pipeline the project builds (tiny test pipelines,
the mini zoo) gets a ``CLIPTokenizer`` whose vocabulary is the 256 byte symbols plus whole words.
With no merges, unknown words fall back to byte symbols, so any prompt tokenizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def build_clip_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` for ``words`` into ``folder`` and load a CLIPTokenizer from it.

    Each word becomes a single token (``word</w>``); the merges list spells every word from its
    characters so the BPE tokenizer reassembles it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if w}):
        # Merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    return tokenizer
