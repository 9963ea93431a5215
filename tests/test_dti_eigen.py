"""Component orders and the closed-form eigen-decomposition, against dipy, numpy.linalg.eigh and
tensors built from known eigenpairs (random, real small_64D, degenerate)."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.data import get_fnames
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst import dti as dipy_dti
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bssfp2dt.dti.eigen import (NEARLY_ISOTROPIC, bep016_to_dipy, bep016_to_fsl, bep016_to_matrix, dipy_to_bep016,
                                eigh_tensor, fsl_to_bep016, matrix_to_bep016)

SCALE = 3e-3  # mm^2/s, the largest diffusivity in brain


def tensors_from_eigenpairs(evals: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """BEP016 tensors (n, 6) of R diag(evals) R^T for evals (n, 3) and rotations (n, 3, 3)."""
    return matrix_to_bep016(rotations @ (evals[:, :, None] * np.swapaxes(rotations, 1, 2)))


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def random_spd(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    evals = np.sort(rng.uniform(1e-4, SCALE, size=(n, 3)), axis=1)[:, ::-1]
    rotations = random_rotations(rng, n)
    return tensors_from_eigenpairs(evals, rotations), evals, rotations


def assert_decomposition(tensor6: np.ndarray, evals: np.ndarray, evecs: np.ndarray, tolerance: float) -> None:
    """V diag(evals) V^T reproduces the tensor, V is orthonormal and evals descend."""
    matrices = bep016_to_matrix(tensor6)
    scale = np.abs(matrices).max(axis=(-2, -1), keepdims=True) + 1e-300
    rebuilt = evecs @ (evals[..., :, None] * np.swapaxes(evecs, -1, -2))
    assert np.all(np.abs(rebuilt - matrices) <= tolerance * scale)
    assert np.allclose(np.swapaxes(evecs, -1, -2) @ evecs, np.eye(3), atol=tolerance)
    assert np.all(np.diff(evals, axis=-1) <= tolerance * scale[..., 0])


def test_component_orders_match_dipy_and_fsl():
    rng = np.random.default_rng(1)
    matrices = bep016_to_matrix(rng.normal(size=(5, 6)))
    tensor6 = matrix_to_bep016(matrices)
    lower = dipy_dti.lower_triangular(matrices)  # dipy's own Dxx, Dxy, Dyy, Dxz, Dyz, Dzz
    np.testing.assert_array_equal(bep016_to_dipy(tensor6), lower)
    np.testing.assert_array_equal(dipy_to_bep016(lower), tensor6)
    np.testing.assert_array_equal(dipy_dti.from_lower_triangular(lower), matrices)
    # BEP016 order by definition: D11, D12, D13, D22, D23, D33.
    np.testing.assert_array_equal(tensor6[0], matrices[0][[0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]])
    np.testing.assert_array_equal(fsl_to_bep016(bep016_to_fsl(tensor6)), tensor6)
    np.testing.assert_array_equal(bep016_to_fsl(tensor6), tensor6)


def test_random_spd_matches_dipy_decompose_tensor_and_truth():
    rng = np.random.default_rng(2)
    tensor6, true_evals, rotations = random_spd(rng, 4000)
    evals, evecs = eigh_tensor(tensor6)
    dipy_evals, dipy_evecs = dipy_dti.decompose_tensor(bep016_to_matrix(tensor6))
    np.testing.assert_allclose(evals, dipy_evals, rtol=0, atol=1e-9 * SCALE)
    np.testing.assert_allclose(evals, true_evals, rtol=0, atol=1e-9 * SCALE)
    # Eigenvectors up to sign, where the eigenvalue is at least 1e-4 mm^2/s from its neighbours
    # (closer pairs make any solver's vectors sensitive to rounding).
    gaps = np.diff(true_evals, axis=1)
    for j in range(3):
        separated = np.ones(len(tensor6), dtype=bool)
        if j > 0:
            separated &= -gaps[:, j - 1] > 1e-4 * SCALE
        if j < 2:
            separated &= -gaps[:, j] > 1e-4 * SCALE
        cosine = np.abs(np.einsum("ni,ni->n", evecs[:, :, j], dipy_evecs[:, :, j]))[separated]
        np.testing.assert_allclose(cosine, 1.0, atol=1e-12)
        true_cosine = np.abs(np.einsum("ni,ni->n", evecs[:, :, j], rotations[:, :, j]))[separated]
        np.testing.assert_allclose(true_cosine, 1.0, atol=1e-12)
    assert_decomposition(tensor6, evals, evecs, 1e-12)


def test_dipy_small_64d_tensors_match_dipy():
    dwi_path, bval_path, bvec_path = get_fnames(name="small_64D")
    bvals, bvecs = read_bvals_bvecs(str(bval_path), str(bvec_path))
    fit = dipy_dti.TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(
        nib.load(str(dwi_path)).get_fdata())
    tensor6 = dipy_to_bep016(fit.lower_triangular())
    evals, evecs = eigh_tensor(tensor6)
    dipy_evals, dipy_evecs = dipy_dti.decompose_tensor(fit.quadratic_form, min_diffusivity=-np.inf)
    np.testing.assert_allclose(evals, dipy_evals, rtol=0, atol=1e-9 * SCALE)
    assert_decomposition(tensor6, evals, evecs, 1e-12)
    gap = dipy_evals[..., 0] - dipy_evals[..., 1]
    cosine = np.abs(np.einsum("...i,...i->...", evecs[..., 0], dipy_evecs[..., 0]))
    np.testing.assert_allclose(cosine[gap > 1e-6 * SCALE], 1.0, atol=1e-9)


@pytest.mark.parametrize("evals", [(1.7e-3, 3e-4, 3e-4), (1.1e-3, 1.1e-3, 2e-4), (8e-4, 8e-4, 8e-4),
                                   (1.7e-3, 3e-4 * (1 + 1e-9), 3e-4), (1e-3 * (1 + 1e-12), 1e-3, 1e-3),
                                   (1e-3, 0.0, -1e-4)])
def test_degenerate_and_nearly_degenerate_spectra(evals):
    rng = np.random.default_rng(3)
    n = 200
    true_evals = np.tile(evals, (n, 1))
    rotations = random_rotations(rng, n)
    tensor6 = tensors_from_eigenpairs(true_evals, rotations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, vectors = eigh_tensor(tensor6)
    np.testing.assert_allclose(values, true_evals, rtol=0, atol=1e-12 * SCALE)
    np.testing.assert_allclose(values, dipy_dti.decompose_tensor(bep016_to_matrix(tensor6), min_diffusivity=-1)[0],
                               rtol=0, atol=1e-12 * SCALE)
    assert_decomposition(tensor6, values, vectors, 1e-12)
    # A distinct first (last) eigenvalue has a defined axis, whatever the other two do.
    for j, distinct in ((0, evals[0] - evals[1] > 1e-5), (2, evals[1] - evals[2] > 1e-5)):
        if distinct:
            cosine = np.abs(np.einsum("ni,ni->n", vectors[:, :, j], rotations[:, :, j]))
            np.testing.assert_allclose(cosine, 1.0, atol=1e-12)


def test_nearly_isotropic_voxels_use_lapack_and_stay_accurate():
    rng = np.random.default_rng(4)
    n = 100
    true_evals = 1e-3 * (1.0 + np.sort(rng.uniform(0, NEARLY_ISOTROPIC, size=(n, 3)), axis=1)[:, ::-1])
    tensor6 = tensors_from_eigenpairs(true_evals, random_rotations(rng, n))
    values, vectors = eigh_tensor(tensor6)
    np.testing.assert_allclose(values, true_evals, rtol=0, atol=1e-15)
    assert_decomposition(tensor6, values, vectors, 1e-12)


def test_zero_nan_and_masked_voxels_give_zeros_without_warnings():
    rng = np.random.default_rng(5)
    tensor6 = np.zeros((4, 3, 2, 6))
    tensor6[1:] = random_spd(rng, 18)[0].reshape(3, 3, 2, 6)
    tensor6[2, 0, 0, 3] = np.nan
    tensor6[3, 1, 1, 0] = np.inf
    mask = np.ones((4, 3, 2), dtype=bool)
    mask[1, 2, 1] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evals, evecs = eigh_tensor(tensor6, mask)
    zero_voxels = [(2, 0, 0), (3, 1, 1), (1, 2, 1)]
    for voxel in zero_voxels:
        assert not evals[voxel].any() and not evecs[voxel].any()
    assert not evals[0].any()  # all-zero tensors: zero eigenvalues
    np.testing.assert_allclose(np.swapaxes(evecs[0], -1, -2) @ evecs[0], np.broadcast_to(np.eye(3), (3, 2, 3, 3)))
    computed = mask.copy()
    computed[0] = False
    for voxel in zero_voxels:
        computed[voxel] = False
    reference = dipy_dti.decompose_tensor(bep016_to_matrix(tensor6[computed]))[0]
    np.testing.assert_allclose(evals[computed], reference, rtol=0, atol=1e-12 * SCALE)


def test_float32_input_and_shapes():
    rng = np.random.default_rng(6)
    tensor6 = random_spd(rng, 24)[0].reshape(2, 3, 4, 6)
    evals, evecs = eigh_tensor(tensor6.astype(np.float32))
    assert evals.shape == (2, 3, 4, 3) and evecs.shape == (2, 3, 4, 3, 3) and evals.dtype == np.float64
    np.testing.assert_allclose(evals, eigh_tensor(tensor6)[0], rtol=0, atol=1e-6 * SCALE)
    with pytest.raises(ValueError, match="shape"):
        eigh_tensor(tensor6[..., :5])
    with pytest.raises(ValueError, match="mask"):
        eigh_tensor(tensor6, mask=np.ones((2, 3), dtype=bool))


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (6,), elements=st.floats(-1.0, 1.0, allow_subnormal=False)),
       st.integers(-12, 3))
def test_any_symmetric_matrix_is_decomposed(components, exponent):
    tensor6 = (components * 10.0 ** exponent)[None]
    evals, evecs = eigh_tensor(tensor6)
    assert_decomposition(tensor6, evals, evecs, 1e-11)
    lapack = np.linalg.eigvalsh(bep016_to_matrix(tensor6))[:, ::-1]
    scale = np.abs(tensor6).max() + 1e-300
    np.testing.assert_allclose(evals, lapack, rtol=0, atol=1e-12 * scale)


def test_exact_multiples_of_identity_match_numpy_eigh():
    tensor6 = np.zeros((3, 6))
    tensor6[:, [0, 3, 5]] = np.array([[3e-3], [0.0], [-1e-4]])
    evals, evecs = eigh_tensor(tensor6)
    lapack_values, lapack_vectors = np.linalg.eigh(bep016_to_matrix(tensor6))
    np.testing.assert_array_equal(evals, lapack_values[:, ::-1])
    np.testing.assert_array_equal(evecs, lapack_vectors[:, :, ::-1])
