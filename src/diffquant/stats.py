"""Statistics shared by the evaluation harness and the zoo's quality floors (below both in the import order)."""

from __future__ import annotations

import numpy as np
import torch


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (weights or package missing); the message says why and how to enable it."""


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets x [N, D] and y [M, D] (the FID formula).

    Computed in float64, with the trace of the matrix square root from eigenvalues (as torchmetrics does).
    """
    x = np.asarray(x.double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.double() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise MetricUnavailable("Fréchet distance needs at least 2 images per set; add prompts or seeds")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    # Tr sqrt(S1 S2) = Σ sqrt(eigenvalues of S1 S2): they are real and >= 0 in exact arithmetic (both PSD),
    # and this stays finite for singular covariances (fewer samples than dimensions), unlike sqrtm.
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
