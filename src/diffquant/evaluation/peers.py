"""Peer baselines (torchao, optimum-quanto) applied to a pipeline's denoiser, plus cost measurement helpers.

Peers run through the same paired harness as diffquant's methods, so their numbers are comparable.
A peer that cannot run on this machine raises :class:`PeerUnavailable` with the library's reason;
bench shows it as a row marked unavailable instead of dropping it silently.
"""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ..wrap import get_denoiser

PEERS: dict[str, str] = {
    "torchao-w8a8": "torchao Int8DynamicActivationInt8WeightConfig (int8 dynamic activations, int8 weights; Linear layers)",
    "torchao-w4": "torchao Int4WeightOnlyConfig (int4 weight-only, group 128; Linear layers)",
    "quanto-w8a8": "optimum-quanto qint8 weights + qint8 activations, activation ranges from its Calibration over the calibration prompts",
    "quanto-w4": "optimum-quanto qint4 weights, float activations",
}


class PeerUnavailable(RuntimeError):
    """The peer library cannot quantize or run this model here; the message says why."""


def parse_peers(spec: str | None) -> list[str]:
    if not spec or spec.strip() in ("", "none"):
        return []
    names = list(PEERS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)} (or 'all', 'none')")
    return names


def apply_peer(name: str, pipe, run_prompts: Callable[[list[str]], None], calibration: list[str]) -> float:
    """Quantize ``pipe``'s denoiser in place with peer ``name``; returns the seconds quantization and calibration took.

    ``run_prompts`` samples ``pipe`` on prompts with the bench's settings: over ``calibration`` for quanto's
    activation ranges, then (untimed) on one prompt to prove the quantized model runs here (some kernels
    fail only at the first forward).
    """
    denoiser = get_denoiser(pipe)
    try:
        start = time.perf_counter()
        if name.startswith("torchao"):
            from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(denoiser, Int8DynamicActivationInt8WeightConfig() if name == "torchao-w8a8" else Int4WeightOnlyConfig())
        else:
            from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

            if name == "quanto-w8a8":
                quantize(denoiser, weights=qint8, activations=qint8)
                with Calibration():
                    run_prompts(calibration)
            else:
                quantize(denoiser, weights=qint4)
            freeze(denoiser)
        seconds = time.perf_counter() - start
        run_prompts(calibration[:1])
        return seconds
    except ImportError as e:
        raise PeerUnavailable(f"{type(e).__name__}: {e}") from None
    except (RuntimeError, NotImplementedError, ValueError, AssertionError, TypeError) as e:
        raise PeerUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _flat_tensors(prefix: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Plain tensors of ``t``: tensor subclasses (torchao, quanto) contribute their inner data, scales, zero points."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            _flat_tensors(f"{prefix}.{name}", getattr(t, name), out)
        return
    out[prefix] = t.detach().cpu().contiguous().clone()


def saved_size_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s state dict written as safetensors, subclass tensors flattened to what they store."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        _flat_tensors(key, value, tensors)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "denoiser.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so memory freed by an earlier row does not hide this row's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory above the starting level, sampled from /proc/self/statm in a thread.

    tracemalloc does not see torch's CPU allocator, so RSS sampling is the honest measure here;
    short spikes between samples (5 ms) can be missed. On CUDA the allocator's peak above its starting level is added.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _trim_heap()
        self._base = self._rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)
        if torch.cuda.is_available():
            self.peak_bytes += max(0, torch.cuda.max_memory_allocated() - self._cuda_base)

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20
