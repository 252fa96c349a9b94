"""Shared fixtures: tiny pipelines built from configs, quantized once per session."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two threads on CI's 2-core machine; OMP_NUM_THREADS, when set, wins (on a shared machine 2 threads beside
# other jobs made ops 50-100x slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
logging.getLogger("diffusers").setLevel(logging.ERROR)

from tinyutil import PROMPTS, calibration_config, sample_latents  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipes():
    from diffquant.models.tiny import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    return {"sd": tiny_sd_pipeline(), "sdxl": tiny_sdxl_pipeline(), "sd3": tiny_sd3_pipeline()}


@pytest.fixture(scope="session")
def rtn_results(tiny_pipes):
    """Each tiny family quantized with RTN at W8A8 and W4A8, with float and quantized latents."""
    import diffquant
    from diffquant import QuantConfig

    results = {}
    for family, pipe in tiny_pipes.items():
        ref = sample_latents(pipe)
        for wbits in (8, 4):
            qpipe = copy.deepcopy(pipe)
            cfg = QuantConfig(method="rtn", wbits=wbits, abits=8, calibration=calibration_config())
            diffquant.quantize(qpipe, cfg, calibration=PROMPTS, progress=False)
            results[(family, wbits)] = {"pipe": qpipe, "ref": ref, "out": sample_latents(qpipe)}
    return results
