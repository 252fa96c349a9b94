"""Calibration data: denoiser inputs recorded from real sampling trajectories."""

from .collect import CalibrationSet, DenoiserCall, record_denoiser_calls, replay

__all__ = ["CalibrationSet", "DenoiserCall", "record_denoiser_calls", "replay"]
