"""Closed-form tensor quantities the simulator needs for its ground truth (no eigen-decomposition)."""
from __future__ import annotations

import numpy as np


def fa_md(tensor6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FA and MD (mm^2/s) of tensors (..., 6) in BEP016 order, from invariants:
    MD = tr/3, FA = sqrt(3/2) ||D - MD I||_F / ||D||_F (0 for a zero tensor)."""
    d = np.asarray(tensor6, dtype=np.float64)
    md = (d[..., 0] + d[..., 3] + d[..., 5]) / 3.0
    deviatoric = (d[..., 0] - md) ** 2 + (d[..., 3] - md) ** 2 + (d[..., 5] - md) ** 2 \
        + 2.0 * (d[..., 1] ** 2 + d[..., 2] ** 2 + d[..., 4] ** 2)
    norm = d[..., 0] ** 2 + d[..., 3] ** 2 + d[..., 5] ** 2 + 2.0 * (d[..., 1] ** 2 + d[..., 2] ** 2 + d[..., 4] ** 2)
    fa = np.sqrt(1.5 * np.divide(deviatoric, norm, out=np.zeros_like(norm), where=norm > 0))
    return np.clip(fa, 0.0, 1.0), md


def ols_tensor_fit(signal: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-linear least-squares tensor fit of noiseless signals (M, N): exact for a single compartment.

    bvals (N,) s/mm^2, bvecs (N, 3) unit (any for b = 0). Returns tensors (M, 6) BEP016 order (mm^2/s)
    and S0 (M,).
    """
    g = np.asarray(bvecs, dtype=np.float64)
    b = np.asarray(bvals, dtype=np.float64)
    design = np.column_stack([np.ones_like(b),
                              -b * g[:, 0] ** 2, -2 * b * g[:, 0] * g[:, 1], -2 * b * g[:, 0] * g[:, 2],
                              -b * g[:, 1] ** 2, -2 * b * g[:, 1] * g[:, 2], -b * g[:, 2] ** 2])
    log_signal = np.log(np.maximum(np.asarray(signal, dtype=np.float64), 1e-12))
    coefficients = log_signal @ np.linalg.pinv(design).T
    return coefficients[:, 1:], np.exp(coefficients[:, 0])
