"""What makes two identical runs save byte-identical folders.

Two things differed between identical ``quantize`` runs: the safetensors header (the Rust writer
orders ``__metadata__`` by a per-process hash seed) and wall-clock numbers in the saved report
(calibration seconds, kernel timings). The header is rewritten in sorted order (same length, so the
data offsets stand), and timings move to ``diffquant_timings.json``, a file the manifest does not
hash and ``load`` merges back into the report.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

TIMINGS = "diffquant_timings.json"
_VOLATILE_SUFFIXES = ("seconds", "_ms", "_s")


def _volatile(key: str) -> bool:
    return key.endswith(_VOLATILE_SUFFIXES)


def split_timings(report: dict) -> tuple[dict, dict]:
    """(report without wall-clock entries, those entries), recursively: keys ending in seconds/_ms/_s."""
    stable, timings = {}, {}
    for key, value in report.items():
        if _volatile(key):
            timings[key] = value
        elif isinstance(value, dict):
            inner, inner_timings = split_timings(value)
            stable[key] = inner
            if inner_timings:
                timings[key] = inner_timings
        else:
            stable[key] = value
    return stable, timings


def merge_timings(report: dict, timings: dict) -> dict:
    """Inverse of :func:`split_timings`."""
    merged = dict(report)
    for key, value in timings.items():
        merged[key] = merge_timings(merged.get(key, {}), value) if isinstance(value, dict) and not _volatile(key) else value
    return merged


def canonical_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted ``__metadata__`` keys, in place (same byte length)."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for a reordering; leave the file as written rather than corrupt it
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


__all__ = ["TIMINGS", "canonical_safetensors_header", "merge_timings", "split_timings"]
