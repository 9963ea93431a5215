"""Vectorised weighted-least-squares diffusion tensor fit and the tensor signal model.

Model: S_i = S0 exp(-b_i g_i^T D g_i) with b in s/mm^2, g unit (zero for b = 0) and D in mm^2/s, so
log S_i = X_i . (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz, log S0) with the design row
X_i = (-b gx^2, -2 b gx gy, -2 b gx gz, -b gy^2, -2 b gy gz, -b gz^2, 1).

Fit (as ``dipy.reconst.dti.TensorModel(gtab, fit_method="WLS")``, Chung et al. 2006):
1. signals are clipped below at ``min_signal`` (dipy's default 1e-4) and logged;
2. ordinary least squares on the log signals;
3. one weighted least squares pass with weights = (OLS-predicted signal)^2.
The weighted normal equations of all voxels of a chunk are built with two matrix products
(pairwise products of design columns @ weights) and solved by a 7x7 Cholesky factorisation unrolled
across voxels (one vector operation per matrix entry); the design columns are scaled to unit norm first
so the normal equations stay well conditioned. Voxels whose normal matrix is numerically singular fall
back to a pseudo-inverse.
Unlike dipy, the fitted tensor is returned as is (dipy rebuilds it from eigenvalues clipped at
1e-6 / max(b), which changes only tensors with negative eigenvalues). A torch backend was measured
slower than this on CPU (batched 7x7 solves cost ~6x more in torch), so there is none.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np

try:  # installed with scikit-learn (nilearn's dependency); without it BLAS keeps its own thread count
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - depends on the environment
    threadpool_limits = None

logger = logging.getLogger(__name__)

#: dipy's MIN_POSITIVE_SIGNAL: signals are clipped to at least this before the log.
MIN_SIGNAL = 1e-4
#: Voxels fitted per chunk: bounds memory to a few (CHUNK_VOXELS, N) float64 arrays.
CHUNK_VOXELS = 8192
#: b-values (s/mm^2) at or below which a non-finite b-vector is read as a b0 and set to zero.
B0_THRESHOLD = 50.0


def design_matrix(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Design matrix (N, 7) of log S against (BEP016 tensor in mm^2/s, log S0).

    Parameters
    ----------
    bvals : (N,) b-values in s/mm^2.
    bvecs : (N, 3) gradient directions, unit for diffusion-weighted volumes; used as given (like dipy).
        Rows of b0 volumes (b <= ``B0_THRESHOLD``) may be zero or NaN (as in dipy's test data).
    """
    bvals, bvecs = _check_gradients(bvals, bvecs)
    gx, gy, gz = bvecs.T
    return np.stack([-bvals * gx * gx, -2.0 * bvals * gx * gy, -2.0 * bvals * gx * gz,
                     -bvals * gy * gy, -2.0 * bvals * gy * gz, -bvals * gz * gz, np.ones_like(bvals)], axis=1)


def _check_gradients(bvals: np.ndarray, bvecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.array(bvecs, dtype=np.float64)
    if bvecs.ndim != 2 or bvecs.shape != (bvals.size, 3):
        if bvecs.shape == (3, bvals.size):  # FSL's bvec files are 3 rows
            bvecs = bvecs.T.copy()
        else:
            raise ValueError(f"bvecs must be (N, 3) or (3, N) with N = {bvals.size} b-values, got {bvecs.shape}")
    undefined = ~np.isfinite(bvecs).all(axis=1)
    if (undefined & ~(bvals <= B0_THRESHOLD)).any() or not np.isfinite(bvals).all():
        raise ValueError("non-finite b-value, or non-finite b-vector for a diffusion-weighted volume")
    bvecs[undefined] = 0.0
    return bvals, bvecs


def dwi_signal(tensor6: np.ndarray, s0: np.ndarray | float, bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Noiseless DWI signal S0 exp(-b g^T D g).

    Parameters
    ----------
    tensor6 : (..., 6) BEP016 tensors in mm^2/s.
    s0 : (...) or scalar, signal without diffusion weighting (arbitrary units).
    bvals : (N,) s/mm^2; bvecs : (N, 3) (see ``design_matrix``).

    Returns
    -------
    (..., N) float64 signals in the units of ``s0``.
    """
    tensor6 = np.asarray(tensor6, dtype=np.float64)
    design = design_matrix(bvals, bvecs)
    return np.asarray(s0, dtype=np.float64)[..., None] * np.exp(tensor6 @ design[:, :6].T)


def fit_tensor(dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray | None = None,
               min_signal: float = MIN_SIGNAL) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares diffusion tensor fit (dipy's WLS: OLS, then one pass weighted by S_OLS^2).

    Parameters
    ----------
    dwi : (..., N) diffusion-weighted signals (arbitrary units, any real dtype).
    bvals : (N,) s/mm^2; bvecs : (N, 3) or (3, N) (see ``design_matrix``); at least 7 volumes that
        determine the 6 tensor elements and S0.
    mask : (...) bool, optional; voxels outside it, and voxels with a non-finite signal, are not fitted
        and get zeros (the latter with a logged warning).
    min_signal : signals below it (zeros, negatives) are raised to it before the log; > 0.

    Returns
    -------
    tensor6 : (..., 6) float64 BEP016 tensor (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz) in mm^2/s.
    s0 : (...) float64 fitted non-diffusion-weighted signal, in the units of ``dwi``.
    """
    if min_signal <= 0:
        raise ValueError(f"min_signal must be > 0, got {min_signal}")
    dwi = np.asarray(dwi)
    design = design_matrix(bvals, bvecs)
    if dwi.shape[-1] != design.shape[0]:
        raise ValueError(f"dwi has {dwi.shape[-1]} volumes but there are {design.shape[0]} b-values")
    if np.linalg.matrix_rank(design) < 7:
        raise ValueError("the b-values/b-vectors do not determine a tensor (design matrix rank < 7)")
    batch_shape = dwi.shape[:-1]
    flat = dwi.reshape(-1, dwi.shape[-1])
    if mask is None:
        voxels = None
        n_fit = flat.shape[0]
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != batch_shape:
            raise ValueError(f"mask shape {mask.shape} does not match dwi shape {batch_shape}")
        voxels = np.flatnonzero(mask)
        n_fit = voxels.size

    solver = _WlsSolver(design)
    params = np.zeros((flat.shape[0], 7))
    # The per-chunk products are thin (V x N x 28); threaded BLAS only adds overhead to them, and on a
    # busy machine its spinning threads made them ~20x slower.
    with threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext():
        for start in range(0, n_fit, CHUNK_VOXELS):
            stop = min(start + CHUNK_VOXELS, n_fit)
            index = slice(start, stop) if voxels is None else voxels[start:stop]
            params[index] = solver.fit(flat[index], min_signal)
    logger.debug("WLS tensor fit of %d voxels, %d volumes", n_fit, design.shape[0])

    not_fitted = np.isnan(params[:, 0])
    if not_fitted.any():
        logger.warning("%d voxels with non-finite DWI signals were not fitted (zero tensor and S0)",
                       int(not_fitted.sum()))
        params[not_fitted] = 0.0
    s0 = np.exp(params[:, 6])
    fitted = np.zeros(flat.shape[0], dtype=bool)
    fitted[slice(None) if voxels is None else voxels] = True
    s0[~fitted | not_fitted] = 0.0
    return params[:, :6].reshape(batch_shape + (6,)), s0.reshape(batch_shape)


class _WlsSolver:
    """Precomputed design quantities for the chunked OLS + WLS fit."""

    def __init__(self, design: np.ndarray):
        self.design = design
        # Unit-norm columns: the normal matrix of b ~ 1000 s/mm^2 columns next to the S0 column would
        # otherwise have a condition number ~1e6 times larger.
        self.column_scale = 1.0 / np.linalg.norm(design, axis=0)
        self.scaled = design * self.column_scale
        self.ols_pinv = np.linalg.pinv(design)  # (7, N)
        rows, columns = np.tril_indices(7)
        self.lower_position = {(row, column): k for k, (row, column) in enumerate(zip(rows, columns))}
        self.pair_products_t = np.ascontiguousarray((self.scaled[:, rows] * self.scaled[:, columns]).T)  # (28, N)

    def fit(self, signals: np.ndarray, min_signal: float) -> np.ndarray:
        """(V, N) signals -> (V, 7) parameters (BEP016 tensor, log S0); NaN for voxels with non-finite signals."""
        signals = signals.astype(np.float64, copy=False)
        finite = np.isfinite(signals).all(axis=1)
        if not finite.all():
            signals = np.where(finite[:, None], signals, 1.0)  # fitted harmlessly, then marked NaN below
        log_signal = np.log(np.maximum(signals, min_signal))
        ols = log_signal @ self.ols_pinv.T
        # Squared OLS-predicted signal, scaled per voxel to a maximum of 1 (the solution does not depend on
        # the scale) so that no voxel's weights underflow or overflow.
        log_weights = 2.0 * (ols @ self.design.T)
        log_weights -= log_weights.max(axis=1, keepdims=True)
        weights = np.exp(log_weights)
        normal_lower = self.pair_products_t @ weights.T  # (28, V): lower triangle of each voxel's X^T W X
        rhs = self.scaled.T @ (weights * log_signal).T  # (7, V)
        with np.errstate(invalid="ignore", divide="ignore"):
            solution = self._cholesky_solve(normal_lower, rhs)
        failed = ~np.isfinite(solution).all(axis=0)
        if failed.any():  # singular normal matrix (e.g. a constant signal): minimum-norm least squares
            solution[:, failed] = self._pinv_solve(normal_lower[:, failed], rhs[:, failed])
        solution[:, ~finite] = np.nan
        return (solution * self.column_scale[:, None]).T

    def _cholesky_solve(self, normal_lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """Solve A x = rhs for every voxel at once: A given by its lower triangle (28, V), rhs (7, V).

        Cholesky A = L L^T, unrolled over the 7x7 entries so every step is one vector operation across
        voxels (a batched numpy.linalg.solve spends ~5x longer in per-matrix LAPACK calls).
        """
        at = self.lower_position
        size = rhs.shape[0]
        factor = {}
        for column in range(size):
            diagonal = normal_lower[at[column, column]] - sum(factor[column, k] ** 2 for k in range(column))
            factor[column, column] = np.sqrt(diagonal)
            inverse = 1.0 / factor[column, column]
            for row in range(column + 1, size):
                value = normal_lower[at[row, column]] - sum(factor[row, k] * factor[column, k] for k in range(column))
                factor[row, column] = value * inverse
        forward = [None] * size
        for row in range(size):  # L y = rhs
            forward[row] = (rhs[row] - sum(factor[row, k] * forward[k] for k in range(row))) / factor[row, row]
        solution = np.empty_like(rhs)
        for row in reversed(range(size)):  # L^T x = y
            solution[row] = (forward[row] - sum(factor[k, row] * solution[k] for k in range(row + 1, size))) \
                / factor[row, row]
        return solution

    def _pinv_solve(self, normal_lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """Minimum-norm solutions (7, V) of A x = rhs with A given by its lower triangle (28, V)."""
        size = rhs.shape[0]
        normal = np.empty((rhs.shape[1], size, size))
        for (row, column), k in self.lower_position.items():
            normal[:, row, column] = normal[:, column, row] = normal_lower[k]
        return (np.linalg.pinv(normal) @ rhs.T[..., None])[..., 0].T
