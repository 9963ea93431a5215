"""Log-Euclidean tensor coordinates: ``L = logm(D / scale)`` and back, ``D = scale expm(L)``.

In these coordinates every symmetric ``L`` is a valid (positive-definite) tensor, the trace is
``3 log(MD_geometric / scale)`` and the deviatoric part ``L - tr(L)/3 I`` carries orientation and
anisotropy together, so a loss on ``L`` values anisotropy even where the direction is still uncertain
(a per-component loss on ``D`` itself is minimised by an isotropic hedge). Eigenvalues below ``floor``
(noise or partial volume at the brain edge) are raised to it before the logarithm.

Arrays are BEP016 components (..., 6): D11 D12 D13 D22 D23 D33; ``D`` in mm^2/s, ``L`` dimensionless.
"""
from __future__ import annotations

import numpy as np

from bssfp2dt.dti.eigen import eigh_tensor

LOG_SCALE = 1e-3  # mm^2/s: a tensor scale * I has L = 0 (about the brain's mean diffusivity)
EIGENVALUE_FLOOR = 1e-5  # mm^2/s: smallest eigenvalue kept before the logarithm
_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def tensor_from_eigen(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """sum_k values[..., k] v_k v_k^T as BEP016 components: values (..., 3), vectors (..., 3, 3) columns."""
    return np.stack([np.einsum("...k,...k,...k->...", values, vectors[..., i, :], vectors[..., j, :])
                     for i, j in _PAIRS], axis=-1)


def log_tensor(tensor6: np.ndarray, scale: float = LOG_SCALE, floor: float = EIGENVALUE_FLOOR) -> np.ndarray:
    """``logm(D / scale)`` of tensors (..., 6) in mm^2/s; float64 (..., 6). Non-finite tensors give 0."""
    tensor6 = np.asarray(tensor6, dtype=np.float64)
    finite = np.isfinite(tensor6).all(axis=-1)
    safe = np.where(finite[..., None], tensor6, scale * np.array([1, 0, 0, 1, 0, 1.0]))
    values, vectors = eigh_tensor(safe)
    return tensor_from_eigen(np.log(np.maximum(values, floor) / scale), vectors)


def exp_tensor(log6: np.ndarray, scale: float = LOG_SCALE) -> np.ndarray:
    """``scale expm(L)`` of log-Euclidean components (..., 6); float64 (..., 6) in mm^2/s."""
    values, vectors = eigh_tensor(np.asarray(log6, dtype=np.float64))
    return tensor_from_eigen(scale * np.exp(np.clip(values, -30.0, 30.0)), vectors)
