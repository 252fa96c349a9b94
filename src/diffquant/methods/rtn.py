"""Round-to-nearest baseline: min/max weights, activation ranges from recorded FP calibration calls."""

from __future__ import annotations

from ..calibration import replay
from ..nn import QuantState, set_state
from ..wrap import wrap_denoiser
from .base import Method, QuantJob


class RTN(Method):
    """Weights rounded to nearest on their observed range; activations get static ranges from the
    float model's inputs at the recorded sampling steps (per timestep group when configured)."""

    name = "rtn"

    def run(self, job: QuantJob) -> None:
        wrap_denoiser(job.denoiser, job.config)
        if job.config.abits is not None:
            calibration = job.calibration_set()
            set_state(job.denoiser, QuantState.CALIBRATING, seed=job.config.seed)
            replay(job.denoiser, calibration, progress=job.progress, desc="rtn: activation ranges")
        set_state(job.denoiser, QuantState.FROZEN)
