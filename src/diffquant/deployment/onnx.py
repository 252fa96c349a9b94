"""ONNX with Q/DQ nodes as an engine: ``export --format onnx`` (a file per timestep group); export only.

The graph is ``runtime/onnx.py``'s, of a converted model (``quantize --convert`` or ``export --format torch``);
ONNX Runtime, OpenVINO and TensorRT read it. diffquant runs no ONNX file itself (``load`` is None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import claim_output
from ..registry import Engine, register_engine
from ..runtime.onnx import export_onnx


def export_onnx_file(model: Any, out: str | Path, *, overwrite: bool = False, group: int | None = None, batch: int = 2) -> Path:
    """The converted denoiser of ``model`` as one ONNX file (timestep group ``group``), traced at ``batch`` with the
    pipeline tokenizer's sequence length (at most 77); the batch stays dynamic where the family allows it (not PixArt, SANA)."""
    tokenizer = getattr(model, "tokenizer", None)
    seq_len = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
    with claim_output(out, overwrite=overwrite):  # refused if present; export_onnx writes atomically itself
        return export_onnx(model, out, group=group, batch=batch, seq_len=min(int(seq_len), 77))


def is_onnx_file(path: Path) -> bool:
    return Path(path).suffix == ".onnx" and Path(path).is_file()


register_engine(Engine(
    "onnx", export=export_onnx_file, load=None, is_folder=is_onnx_file,
    summary="ONNX with QuantizeLinear/DequantizeLinear nodes, one timestep group per file (export only)",
))

__all__ = ["export_onnx_file", "is_onnx_file"]
