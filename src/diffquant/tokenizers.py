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

    Merges are *learned* over the word list (BPE training until every word is one symbol) rather
    than written word by word: BPE applies merges by global rank, so a merge from one word ("a n</w>"
    of "an") could otherwise fire inside another ("cyan") and split it. Encoding replays training,
    so every listed word is exactly one token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    pieces = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w})]
    merges: list[str] = []
    while any(len(p) > 1 for p in pieces):
        counts: dict[tuple[str, str], int] = {}
        for p in pieces:
            for pair in zip(p, p[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, ties alphabetical
        merges.append(f"{best[0]} {best[1]}")
        vocab.setdefault(best[0] + best[1], len(vocab))
        for k, p in enumerate(pieces):
            i, out = 0, []
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[k] = out
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
