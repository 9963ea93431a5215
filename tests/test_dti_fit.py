"""WLS tensor fit against dipy's TensorModel(fit_method="WLS") on real data (small_64D), exact recovery from
noiseless signals, and the forward model against the direct formula S0 exp(-b g^T D g)."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.data import get_fnames
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst import dti as dipy_dti

from bssfp2dt.dti.eigen import bep016_to_matrix, dipy_to_bep016, matrix_to_bep016
from bssfp2dt.dti.fit import design_matrix, dwi_signal, fit_tensor


@pytest.fixture(scope="module")
def small_64d():
    dwi_path, bval_path, bvec_path = get_fnames(name="small_64D")
    bvals, bvecs = read_bvals_bvecs(str(bval_path), str(bvec_path))  # the b0 b-vector is NaN in this file
    return nib.load(str(dwi_path)).get_fdata(), bvals, bvecs


def random_tensors(rng: np.random.Generator, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    evals = rng.uniform(1e-4, 3e-3, size=(n, 3))
    return matrix_to_bep016(q @ (evals[:, :, None] * np.swapaxes(q, 1, 2)))


def test_matches_dipy_wls_on_small_64d(small_64d):
    dwi, bvals, bvecs = small_64d
    reference = dipy_dti.TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS",
                                     return_S0_hat=True).fit(dwi)
    tensor6, s0 = fit_tensor(dwi, bvals, bvecs)
    reference_tensor = dipy_to_bep016(reference.lower_triangular())
    # Brain: dipy's S0 well above the background level (median S0 ~ 210, brain ~ 1000-1700).
    brain = reference.S0_hat > 500.0
    assert brain.sum() > 200
    error = np.linalg.norm(tensor6 - reference_tensor, axis=-1) / np.linalg.norm(reference_tensor, axis=-1)
    assert error[brain].max() <= 1e-4
    np.testing.assert_allclose(s0[brain], reference.S0_hat[brain], rtol=1e-4)


def test_mask_and_bvecs_as_fsl_rows(small_64d):
    dwi, bvals, bvecs = small_64d
    mask = np.zeros(dwi.shape[:3], dtype=bool)
    mask[2:8, 3:7, 4:9] = True
    full_tensor, full_s0 = fit_tensor(dwi, bvals, bvecs)
    tensor6, s0 = fit_tensor(dwi, bvals, bvecs.T, mask=mask)
    np.testing.assert_allclose(tensor6[mask], full_tensor[mask], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(s0[mask], full_s0[mask], rtol=1e-9)
    assert not tensor6[~mask].any() and not s0[~mask].any()


def test_recovers_exact_tensor_from_noiseless_signal():
    rng = np.random.default_rng(20)
    tensor6 = random_tensors(rng, 500).reshape(5, 10, 10, 6)
    s0 = rng.uniform(100.0, 3000.0, size=(5, 10, 10))
    directions = rng.normal(size=(30, 3))
    bvals = np.concatenate([[0.0, 5.0], np.full(15, 1000.0), np.full(15, 2000.0)])
    bvecs = np.concatenate([[[0.0, 0.0, 0.0], [np.nan] * 3], directions / np.linalg.norm(directions, axis=1)[:, None]])
    signal = dwi_signal(tensor6, s0, bvals, bvecs)
    fitted, fitted_s0 = fit_tensor(signal.astype(np.float64), bvals, bvecs)
    np.testing.assert_allclose(fitted, tensor6, rtol=0, atol=1e-6 * 1e-3)
    np.testing.assert_allclose(fitted, tensor6, rtol=0, atol=1e-12)  # in fact to rounding
    np.testing.assert_allclose(fitted_s0, s0, rtol=1e-10)


def test_forward_model_matches_direct_formula():
    rng = np.random.default_rng(21)
    tensor6 = random_tensors(rng, 7)
    s0 = rng.uniform(1.0, 2.0, size=7)
    bvals = np.array([0.0, 1000.0, 2000.0, 700.0])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [0.48, 0.6, 0.64]])
    matrices = bep016_to_matrix(tensor6)
    expected = s0[:, None] * np.exp(-bvals * np.einsum("ni,vij,nj->vn", bvecs, matrices, bvecs))
    np.testing.assert_allclose(dwi_signal(tensor6, s0, bvals, bvecs), expected, rtol=1e-14)
    # The design matrix is dipy's up to the column order and the sign of the S0 column.
    dipy_design = dipy_dti.design_matrix(gradient_table(bvals, bvecs=bvecs))
    np.testing.assert_allclose(design_matrix(bvals, bvecs)[:, :6], dipy_to_bep016(dipy_design[:, :6]), atol=1e-12)
    np.testing.assert_array_equal(design_matrix(bvals, bvecs)[:, 6], -dipy_design[:, 6])


def test_zero_and_negative_signals_are_clipped_like_dipy(small_64d):
    dwi, bvals, bvecs = small_64d
    voxels = dwi[4:6, 4:6, 4:6].reshape(-1, dwi.shape[-1]).copy()
    voxels[:, 10:14] = 0.0
    voxels[:, 20] = -5.0
    voxels[0] = 0.0  # all-zero voxel: a constant log-signal, fitted as D = 0, S0 = min_signal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor6, s0 = fit_tensor(voxels, bvals, bvecs)
    reference = dipy_dti.TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS",
                                     return_S0_hat=True).fit(voxels)
    reference_tensor = dipy_to_bep016(reference.lower_triangular())
    np.testing.assert_allclose(tensor6[1:], reference_tensor[1:], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(tensor6[0], 0.0, atol=1e-15)
    assert s0[0] == pytest.approx(1e-4)


def test_non_finite_voxels_are_not_fitted(small_64d, caplog):
    dwi, bvals, bvecs = small_64d
    voxels = dwi[5, 5, 3:6].copy()
    voxels[1, 7] = np.nan
    tensor6, s0 = fit_tensor(voxels, bvals, bvecs)
    assert not tensor6[1].any() and s0[1] == 0.0
    np.testing.assert_allclose(tensor6[[0, 2]], fit_tensor(voxels[[0, 2]], bvals, bvecs)[0], rtol=1e-12)
    assert "1 voxels with non-finite DWI signals" in caplog.text


def test_bad_gradients_raise():
    bvals = np.array([0.0, 1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 1000.0])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    with pytest.raises(ValueError, match="rank"):
        fit_tensor(np.ones((2, 7)), bvals, bvecs)  # no off-diagonal sensitivity
    with pytest.raises(ValueError, match="volumes"):
        fit_tensor(np.ones((2, 6)), bvals, bvecs)
    bvecs[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_tensor(np.ones((2, 7)), bvals, bvecs)
    with pytest.raises(ValueError, match="bvecs"):
        fit_tensor(np.ones((2, 7)), bvals, np.ones((7, 2)))
