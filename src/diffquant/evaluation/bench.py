"""``diffquant bench``: methods × bit widths and peer baselines, all scored on the same pairs.

Each row also carries its costs: calibration wall time, peak memory during calibration (RSS above
the level before it), and the denoiser's size on disk as saved.
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .harness import EvalOptions, Evaluation
from ..config import CalibrationConfig
from ..sampling import SamplingSettings, default_settings, sample
from ..wrap import get_denoiser
from .metrics import psnr
from .peers import PEERS, PeakMemory, PeerUnavailable, apply_peer, saved_size_bytes
from .prompts import PromptItem


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """'w8a8,w4a8' -> [(8, 8), (4, 8)]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*w(\d+)a(\d+)\s*", part.lower())
        if not m:
            raise ValueError(f"bad bit width {part!r}: write each as wXaY, e.g. --bits w8a8,w4a8")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _folder_bytes(folder: Path, denoiser_names: tuple[str, ...] = ("unet", "transformer")) -> int:
    """Bytes of the denoiser's weight files inside a saved pipeline folder (all weight files if none is named so)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")]
    denoiser_files = [p for p in files if any(part in denoiser_names for part in p.relative_to(folder).parts)]
    return sum(p.stat().st_size for p in (denoiser_files or files))


def _shipped_bytes(pipe) -> int:
    """The float denoiser's size as shipped (its files in the folder it was loaded from), else its safetensors re-save."""
    origin = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    if origin and Path(origin).is_dir():
        return _folder_bytes(Path(origin))
    return saved_size_bytes(get_denoiser(pipe))


def _sampler(pipe, settings: SamplingSettings, batch_size: int):
    def run(prompts: list[str]) -> None:
        for i in range(0, len(prompts), batch_size):
            sample(pipe, prompts[i:i + batch_size], settings.replace(seed=i))
    return run


def quantize_copy(fp_pipe, cfg, calibration: list[str], **kwargs):
    """``(pipe, seconds, peak MiB)``: a quantized deep copy of ``fp_pipe``, its wall time and its peak RSS above the start.

    ``kwargs`` go to ``diffquant.quantize`` (e.g. ``workdir``, ``progress``)."""
    import diffquant

    pipe = copy.deepcopy(fp_pipe)
    start = time.perf_counter()
    with PeakMemory() as mem:
        diffquant.quantize(pipe, cfg, calibration=calibration, **kwargs)
    return pipe, time.perf_counter() - start, mem.mib


def run_bench(fp_pipe, model_spec: str, items: list[PromptItem], settings: SamplingSettings, options: EvalOptions,
              methods: list[str], bits: list[tuple[int, int]], peers: list[str], calibration: list[str],
              prompts_spec: str = "", deploy: Callable[[Any], Any] | None = None, deploy_label: str = "openvino",
              granularities: list[str] | tuple[str, ...] = ("per_tensor",)) -> Evaluation:
    """Quantize copies of ``fp_pipe`` with every (method, bits, activation granularity) and peer, score each on the
    pairs, return the evaluation.

    ``deploy`` (a quantized pipeline -> the same model on an engine, e.g. OpenVINO) adds a row
    ``<label>-<deploy_label>`` after each method's fake-quant row, scored against FP like every row and
    against the fake-quant images (``psnr_to_fake_quant``): does the deployed form keep the calibrated model?
    """
    import diffquant
    from diffquant import QuantConfig

    ev = Evaluation(fp_pipe, model_spec, items, settings, options, prompts_spec=prompts_spec)
    ev.reference["summary"]["denoiser_mib"] = _shipped_bytes(fp_pipe) / 2**20
    # Methods and peers calibrate with the bench's own sampling settings.
    # Extras the defaults policy supplies (mini-flux's max_sequence_length) come back when calibration resolves.
    implied = default_settings(fp_pipe).extras
    own = settings.replace(extras={k: v for k, v in settings.extras.items() if implied.get(k, object()) != v})
    calib_cfg = CalibrationConfig.from_sampling(own, num_prompts=len(calibration), batch_size=options.batch_size)
    for method in methods:
        for (wbits, abits), granularity in ((b, g) for b in bits for g in granularities):
            cfg = QuantConfig(method=method, wbits=wbits, abits=abits, act_granularity=granularity, calibration=calib_cfg)
            pipe, seconds, mib = quantize_copy(fp_pipe, cfg, calibration)
            with tempfile.TemporaryDirectory() as folder:
                diffquant.save(pipe, folder)
                size = _folder_bytes(Path(folder))
            ev.add(cfg.label, pipe, spec=f"diffquant {cfg.label}",
                   extra={"calibration_s": seconds, "peak_memory_mib": mib, "denoiser_mib": size / 2**20})
            if deploy is not None:
                label = f"{cfg.label}-{deploy_label}"
                entry = ev.add(label, deploy(pipe), spec=f"diffquant {cfg.label} deployed on {deploy_label}")
                entry["summary"]["psnr_to_fake_quant"] = float(psnr(ev.images[label], ev.images[cfg.label]).double().mean())
            del pipe
    for name in peers:
        pipe = copy.deepcopy(fp_pipe)
        try:
            with PeakMemory() as mem:
                costs = apply_peer(name, pipe, _sampler(pipe, settings, options.batch_size), calibration, calib_cfg)
        except PeerUnavailable as e:
            ev.add_unavailable(name, str(e))
            continue
        costs.setdefault("denoiser_mib", saved_size_bytes(get_denoiser(pipe)) / 2**20)
        ev.add(name, pipe, spec=PEERS[name], extra={"peak_memory_mib": mem.mib, **costs})
        del pipe
    return ev
