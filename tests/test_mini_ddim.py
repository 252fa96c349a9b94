"""mini-ddim: its trainer (checkpoint, exact resume, export as a DDIMPipeline folder) and the unconditional quality floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffquant.zoo.evaluator import EVALUATOR_DIR

needs_evaluator = pytest.mark.skipif(not (EVALUATOR_DIR / "model.safetensors").exists(), reason="evaluator weights not installed")


def test_training_checkpoints_resumes_exactly_and_exports_a_ddim_folder(tmp_path: Path):
    from diffusers import DDIMPipeline
    from safetensors.torch import load_file

    from diffquant.zoo.ddim_training import train_ddim

    kw = dict(batch_size=2, width=8, checkpoint_every=2, device="cpu")
    ckpt = train_ddim(tmp_path / "run", steps=2, export=False, **kw)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and (ckpt / "optimizer.safetensors").exists() and (ckpt / "ema.safetensors").exists()
    # An interrupted run resumed 2 -> 3 equals an uninterrupted 0 -> 3 (batches and noise are functions of the step).
    resumed = train_ddim(tmp_path / "run", steps=3, **kw)
    straight = train_ddim(tmp_path / "straight", steps=3, export=False, **kw)
    a, b = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # The export is a plain DDIMPipeline folder: fp16 weights, the training record beside them.
    weights = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert json.loads((resumed / "training.json").read_text())["steps_done"] == 3
    pipe = DDIMPipeline.from_pretrained(str(resumed))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


@needs_evaluator
def test_valid_scene_judge_passes_real_scenes_and_refuses_noise():
    from diffquant.zoo.data import real_scenes as real
    from diffquant.zoo.evaluator import load_evaluator

    def real_scenes(n):
        return torch.from_numpy(real(n))

    ev = load_evaluator()
    assert all(ev.valid_scenes(real_scenes(128)))
    noise = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not any(ev.valid_scenes(noise))
    blurred = real_scenes(32)[:16] * 0.5 + real_scenes(32)[16:] * 0.5  # two scenes on top of each other
    assert sum(ev.valid_scenes(blurred)) < 12


@needs_evaluator
def test_unconditional_floor_reports_valid_scenes_and_fd_to_real():
    from diffquant.models.tiny_unconditional import tiny_ddim_pipeline
    from diffquant.zoo.quality import evaluate_unconditional, format_table

    result = evaluate_unconditional("mini-ddim", tiny_ddim_pipeline(), n=4, num_inference_steps=2)
    assert result["valid_scenes"] == 0.0 and not result["passed"]  # random weights draw no scene
    assert result["real_valid_scenes"] == 1.0 and result["fd_real"] > 0 and result["real_fd_real"] >= 0  # 4 samples: FD noisy
    assert "BELOW FLOOR" in format_table(result)
