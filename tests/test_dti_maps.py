"""Tensor maps against dipy (FA, MD, AD, RD, colour-FA), against closed forms (angles of known axes),
and their invariances (rotation, sign of V1), on random, real (dipy's small_64D) and degenerate tensors."""
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

from bssfp2dt.dti.eigen import bep016_to_matrix, dipy_to_bep016, matrix_to_bep016
from bssfp2dt.dti.maps import MAP_NAMES, color_fa, tensor_maps, v1_angles

SCALE = 3e-3  # mm^2/s


def dipy_reference(tensor6: np.ndarray) -> dict[str, np.ndarray]:
    evals, evecs = dipy_dti.decompose_tensor(bep016_to_matrix(tensor6))
    fa = dipy_dti.fractional_anisotropy(evals)
    return {"fa": fa, "md": dipy_dti.mean_diffusivity(evals), "ad": dipy_dti.axial_diffusivity(evals),
            "rd": dipy_dti.radial_diffusivity(evals), "rgb": dipy_dti.color_fa(fa, evecs), "v1": evecs[..., 0],
            "gap12": evals[..., 0] - evals[..., 1]}


def assert_matches_dipy(maps: dict, reference: dict, select=Ellipsis, direction_gap: float = 1e-6 * SCALE):
    for name, scale in (("fa", 1.0), ("md", SCALE), ("ad", SCALE), ("rd", SCALE)):
        np.testing.assert_allclose(maps[name][select], reference[name][select], rtol=0, atol=1e-6 * scale,
                                   err_msg=name)
    # Colour-FA and V1 only where V1 is defined (l1 > l2); V1 up to sign.
    defined = (reference["gap12"] > direction_gap)[select]
    np.testing.assert_allclose(maps["rgb"][select][defined], reference["rgb"][select][defined], rtol=0, atol=1e-6)
    cosine = np.abs(np.einsum("...i,...i->...", maps["v1"][select], reference["v1"][select]))
    np.testing.assert_allclose(cosine[defined], 1.0, rtol=0, atol=1e-6)


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def tensors(evals: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    return matrix_to_bep016(rotations @ (evals[..., :, None] * np.swapaxes(rotations, -1, -2)))


def test_random_spd_tensors_match_dipy():
    rng = np.random.default_rng(10)
    evals = rng.uniform(1e-4, SCALE, size=(3000, 3))
    tensor6 = tensors(evals, random_rotations(rng, 3000)).reshape(30, 10, 10, 6)
    maps = tensor_maps(tensor6)
    assert_matches_dipy(maps, dipy_reference(tensor6))
    assert set(maps) == set(MAP_NAMES)
    assert maps["v1"].shape == maps["rgb"].shape == (30, 10, 10, 3) and maps["fa"].shape == (30, 10, 10)


def test_dipy_small_64d_fit_matches_dipy_maps():
    dwi_path, bval_path, bvec_path = get_fnames(name="small_64D")
    bvals, bvecs = read_bvals_bvecs(str(bval_path), str(bvec_path))
    fit = dipy_dti.TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(
        nib.load(str(dwi_path)).get_fdata())
    tensor6 = dipy_to_bep016(fit.lower_triangular())
    maps = tensor_maps(tensor6)
    assert_matches_dipy(maps, dipy_reference(tensor6))
    # ...and dipy's own TensorFit properties.
    np.testing.assert_allclose(maps["fa"], fit.fa, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps["md"], fit.md, rtol=0, atol=1e-6 * SCALE)
    np.testing.assert_allclose(maps["rgb"], dipy_dti.color_fa(fit.fa, fit.evecs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("evals", [(8e-4, 8e-4, 8e-4), (1.7e-3, 3e-4, 3e-4), (1.1e-3, 1.1e-3, 2e-4),
                                   (0.0, 0.0, 0.0), (1e-3, 2e-4, -1e-4), (-1e-4, -2e-4, -3e-4)])
def test_degenerate_and_non_physical_tensors_match_dipy(evals):
    rng = np.random.default_rng(11)
    true_evals = np.tile(evals, (100, 1))
    tensor6 = tensors(true_evals, random_rotations(rng, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = tensor_maps(tensor6)
    reference = dipy_reference(tensor6)
    assert_matches_dipy(maps, reference, direction_gap=1e-5)
    clipped = np.maximum(np.sort(evals)[::-1], 0.0)
    np.testing.assert_allclose(maps["ad"], clipped[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(maps["rd"], clipped[1:].mean(), rtol=0, atol=1e-12)
    if not any(evals):
        assert not maps["fa"].any() and not maps["rgb"].any()


def test_without_clipping_md_is_trace_over_three():
    rng = np.random.default_rng(12)
    tensor6 = tensors(np.tile([1e-3, 2e-4, -1e-4], (50, 1)), random_rotations(rng, 50))
    maps = tensor_maps(tensor6, min_diffusivity=None)
    np.testing.assert_allclose(maps["md"], (tensor6[:, 0] + tensor6[:, 3] + tensor6[:, 5]) / 3, rtol=0, atol=1e-18)
    np.testing.assert_allclose(maps["rd"], 0.5e-4, rtol=0, atol=1e-18)


@pytest.mark.parametrize("axis, inclination, azimuth", [
    ((1, 0, 0), 90.0, 0.0), ((0, 1, 0), 90.0, 90.0), ((0, 0, 1), 0.0, 0.0), ((0, 0, -1), 0.0, 0.0),
    ((-1, 0, 0), 90.0, 0.0), ((0, -1, 0), 90.0, 90.0), ((1, 1, 2 ** 0.5), 45.0, 45.0),
    ((-1, 0, -1), 45.0, 0.0), ((1, -3 ** 0.5, 0), 90.0, 120.0), ((-1, -1, 2 ** 0.5), 45.0, -135.0)])
def test_inclination_and_azimuth_of_known_axes(axis, inclination, azimuth):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    # A prolate tensor with this principal axis; l1 = 1.7e-3, l2 = l3 = 3e-4 mm^2/s.
    matrix = 3e-4 * np.eye(3) + 1.4e-3 * np.outer(axis, axis)
    maps = tensor_maps(matrix_to_bep016(matrix))
    assert maps["inclination"] == pytest.approx(inclination, abs=1e-9)
    assert maps["azimuth"] == pytest.approx(azimuth, abs=1e-9)
    canonical = axis if (axis[2], axis[1], axis[0]) > (0, 0, 0) else -axis
    np.testing.assert_allclose(maps["v1"], canonical, atol=1e-12)
    np.testing.assert_allclose(v1_angles(axis), (inclination, azimuth), atol=1e-9)
    np.testing.assert_allclose(v1_angles(-axis), (inclination, azimuth), atol=1e-9)


def test_mask_nan_and_colour_fa_helper():
    rng = np.random.default_rng(13)
    tensor6 = tensors(rng.uniform(1e-4, SCALE, size=(4, 5, 3)), random_rotations(rng, 20).reshape(4, 5, 3, 3))
    tensor6[0, 0, 2] = np.nan
    mask = np.ones((4, 5), dtype=bool)
    mask[3] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = tensor_maps(tensor6, mask)
    for name in MAP_NAMES:
        assert not maps[name][3].any() and not maps[name][0, 0].any(), name
    inside = mask.copy()
    inside[0, 0] = False
    assert_matches_dipy(maps, dipy_reference(np.nan_to_num(tensor6)), select=inside)
    np.testing.assert_allclose(color_fa(maps["fa"], maps["v1"]), maps["rgb"], atol=1e-15)
    assert maps["rgb"].min() >= 0.0 and maps["rgb"].max() <= 1.0


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (3,), elements=st.floats(1e-5, 4e-3)),
       arrays(np.float64, (3, 3), elements=st.floats(-1.0, 1.0)),
       arrays(np.float64, (3, 3), elements=st.floats(-1.0, 1.0)))
def test_fa_md_rotation_invariant_fa_in_unit_interval(evals, frame, rotation_seed):
    frame_q = np.linalg.qr(frame + 3 * np.eye(3))[0]
    rotation = np.linalg.qr(rotation_seed + 3 * np.eye(3))[0]
    matrix = frame_q @ np.diag(evals) @ frame_q.T
    tensor6 = matrix_to_bep016(np.stack([matrix, rotation @ matrix @ rotation.T]))
    maps = tensor_maps(tensor6)
    np.testing.assert_allclose(maps["fa"][0], maps["fa"][1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(maps["md"][0], maps["md"][1], rtol=1e-12)
    np.testing.assert_allclose(maps["md"], np.trace(matrix) / 3, rtol=1e-12)
    assert np.all((maps["fa"] >= 0) & (maps["fa"] <= 1))
    expected_fa = np.sqrt(1.5 * ((evals - evals.mean()) ** 2).sum() / (evals ** 2).sum())
    np.testing.assert_allclose(maps["fa"], expected_fa, rtol=0, atol=1e-9)
