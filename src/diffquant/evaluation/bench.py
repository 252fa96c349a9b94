"""``diffquant bench``: methods × bit widths and peer baselines, all scored on the same pairs.

Each row also carries its costs: calibration wall time, peak memory during calibration (RSS above
the level before it), and (from the harness, one computation for every row: ``evaluation.coverage``) its
coverage, average bits over the whole denoiser and the size of the denoiser file that would ship.
"""

from __future__ import annotations

import copy
import json
import re
import time
from typing import Any, Callable

from ..bits import COVERAGE_KEYS
from .harness import EvalOptions, Evaluation
from ..config import CalibrationConfig
from ..sampling import SamplingSettings, default_settings, is_unconditional, sample
from .metrics import psnr
from .peers import PEERS, PeakMemory, PeerUnavailable, apply_peer
from .prompts import PromptItem, calibration_seeds


def parse_bits(spec: str) -> list[tuple[int, int | None]]:
    """'w8a8,w4a8,w4' -> [(8, 8), (4, 8), (4, None)]: ``wX`` or ``wXaf`` is weight-only (float activations)."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*w(\d+)(?:a(\d+|f))?\s*", part.lower())
        if not m:
            raise ValueError(f"bad bit width {part!r}: write each as wXaY (wX or wXaf: weight-only), e.g. --bits w8a8,w4a8,w4")
        out.append((int(m.group(1)), None if m.group(2) in (None, "f") else int(m.group(2))))
    return out


def parse_ranks(spec: str) -> list[int]:
    """'0,8,16' -> [0, 8, 16] (low-rank branch ranks)."""
    try:
        ranks = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        ranks = [-1]
    if not ranks or min(ranks) < 0:
        raise ValueError(f"bad --lowrank-rank {spec!r}: write ranks >= 0 separated by commas, e.g. 0,8,16")
    return ranks


def options_tag(options: dict[str, Any]) -> str:
    """A row label's method options, ``[iterations=1000]``: rows that differ only in ``--option`` stay apart."""
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]" if options else ""


def _sampler(pipe, settings: SamplingSettings, batch_size: int):
    def run(prompts: list[str]) -> None:
        for i in range(0, len(prompts), batch_size):
            sample(pipe, prompts[i:i + batch_size], settings.replace(seed=i))
    return run


def quantize_copy(fp_pipe, cfg, calibration: list[str], **kwargs):
    """``(pipe, seconds, peak MiB)``: a quantized deep copy of ``fp_pipe``, its wall time and its peak RSS above the start.

    ``kwargs`` go to ``diffquant.quantize`` (e.g. ``workdir``, ``progress``). An unconditional pipeline calibrates from
    ``cfg.calibration`` alone (its number of samples and seeds; ``calibration``, empty prompts, only sizes it)."""
    import diffquant

    pipe = copy.deepcopy(fp_pipe)
    start = time.perf_counter()
    with PeakMemory() as mem:
        diffquant.quantize(pipe, cfg, calibration=None if is_unconditional(fp_pipe) else calibration, **kwargs)
    return pipe, time.perf_counter() - start, mem.mib


def run_bench(fp_pipe, model_spec: str, items: list[PromptItem], settings: SamplingSettings, options: EvalOptions,
              methods: list[str], bits: list[tuple[int, int]], peers: list[str], calibration: list[str],
              prompts_spec: str = "", deploy: Callable[[Any], Any] | None = None, deploy_label: str = "openvino",
              granularities: list[str] | tuple[str, ...] = ("per_tensor",), ranks: list[int] | tuple[int, ...] = (0,),
              config: dict[str, Any] | None = None, method_options: dict[str, dict[str, Any]] | None = None) -> Evaluation:
    """Quantize copies of ``fp_pipe`` with every (method, bits, activation granularity) and peer, score each on the
    pairs, return the evaluation.

    ``deploy`` (a quantized pipeline -> the same model on an engine, e.g. OpenVINO) adds a row
    ``<label>-<deploy_label>`` after each method's fake-quant row, scored against FP like every row and
    against the fake-quant images (``psnr_to_fake_quant``): does the deployed form keep the calibrated model?
    ``ranks``: low-rank branch ranks (``QuantConfig.lowrank_rank``, 0: none), one row each; ``config``: further
    ``QuantConfig`` fields of every row (e.g. ``timestep_groups``); ``method_options``: method name -> its options.
    An unconditional ``fp_pipe`` calibrates from ``len(calibration)`` samples (empty prompts) drawn from
    ``calibration_seeds``, never from the evaluation's seeds.
    """
    from diffquant import QuantConfig

    ev = Evaluation(fp_pipe, model_spec, items, settings, options, prompts_spec=prompts_spec)
    # Methods and peers calibrate with the bench's own sampling settings.
    # Extras the defaults policy supplies (mini-flux's max_sequence_length) come back when calibration resolves.
    implied = default_settings(fp_pipe).extras
    own = settings.replace(extras={k: v for k, v in settings.extras.items() if implied.get(k, object()) != v})
    unconditional = is_unconditional(fp_pipe)
    calib_cfg = CalibrationConfig.from_sampling(own, num_prompts=len(calibration), batch_size=options.batch_size,
                                                seeds=calibration_seeds(len(calibration)) if unconditional else None)
    for method in methods:
        for (wbits, abits), granularity, rank in ((b, g, r) for b in bits for g in granularities for r in ranks):
            if abits is None and granularity != granularities[0]:
                continue  # weight-only: no activation granularity, one row
            cfg = QuantConfig(method=method, wbits=wbits, abits=abits, act_granularity=granularity, lowrank_rank=rank,
                              calibration=calib_cfg, options=(method_options or {}).get(method, {}), **(config or {}))
            pipe, seconds, mib = quantize_copy(fp_pipe, cfg, calibration)
            suffix = options_tag(cfg.options)
            label, tag = cfg.label + suffix, f"{cfg.label} {json.dumps(cfg.options, sort_keys=True)}"
            row = ev.add(label, pipe, spec=f"diffquant {tag}", extra={"calibration_s": seconds, "peak_memory_mib": mib})
            if deploy is not None:
                deployed = f"{cfg.label}-{deploy_label}{suffix}"
                same = {k: row["summary"][k] for k in COVERAGE_KEYS}  # the same layers at the same bits, in the engine's graph
                entry = ev.add(deployed, deploy(pipe), spec=f"diffquant {tag} deployed on {deploy_label}", extra=same)
                entry["summary"]["psnr_to_fake_quant"] = float(psnr(ev.images[deployed], ev.images[label]).double().mean())
            del pipe
    for name in peers:
        pipe = copy.deepcopy(fp_pipe)
        try:
            with PeakMemory() as mem:
                costs = apply_peer(name, pipe, _sampler(pipe, settings, options.batch_size), calibration, calib_cfg)
        except PeerUnavailable as e:
            ev.add_unavailable(name, str(e))
            continue
        ev.add(name, pipe, spec=PEERS[name], extra={"peak_memory_mib": mem.mib, **costs})
        del pipe
    return ev
