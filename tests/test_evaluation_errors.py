"""Error maps, tissue statistics and image metrics against hand computations, dipy, skimage and MONAI."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bssfp2dt.errors import MissingInputError
from bssfp2dt.evaluation.errors import (ERROR_METRICS, TENSOR_ELEMENTS, ErrorFloors, axis_angle_errors,
                                        axis_angle_errors_about, error_maps, relative_error)
from bssfp2dt.evaluation.metrics import frechet_distance, image_metrics, normalised_tensors, psnr, ssim
from bssfp2dt.evaluation.statistics import EvaluationEntities, tissue_statistics

ENTITIES = EvaluationEntities("01", "1", "2", "pc-bssfp")


def tensors_from(evals: np.ndarray, v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """BEP016 tensors (..., 6) from eigenvalues (..., 3) and orthonormal first two eigenvectors (..., 3)."""
    v3 = np.cross(v1, v2)
    matrix = sum(evals[..., k, None, None] * vec[..., :, None] * vec[..., None, :]
                 for k, vec in enumerate((v1, v2, v3)))
    return np.stack([matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 0, 2], matrix[..., 1, 1], matrix[..., 1, 2],
                     matrix[..., 2, 2]], axis=-1)


def random_tensors(shape, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain-like tensors (mm^2/s): eigenvalues about 1.7/0.4/0.25e-3 (+-20 % each), random orientation."""
    frames = Rotation.random(int(np.prod(shape)), random_state=rng).as_matrix().reshape(*shape, 3, 3)
    v1, v2 = frames[..., :, 0], frames[..., :, 1]
    evals = np.array([1.7e-3, 0.4e-3, 0.25e-3]) * rng.uniform(0.8, 1.2, shape + (3,))
    return tensors_from(evals, v1, v2), evals, v1, v2


def test_ten_percent_too_large_gives_relative_error_point_one_everywhere():
    rng = np.random.default_rng(1)
    reference, *_ = random_tensors((6, 5, 4), rng)
    mask = np.ones((6, 5, 4), bool)
    maps = error_maps(1.1 * reference, reference, mask)
    assert set(maps) == set(ERROR_METRICS)
    for k, name in enumerate(TENSOR_ELEMENTS):
        evaluated = np.abs(reference[..., k]) >= 1e-6  # random off-diagonals can cross zero: excluded
        np.testing.assert_allclose(maps[name][evaluated], 0.1, rtol=1e-9, err_msg=name)
        assert np.isnan(maps[name][~evaluated]).all()
    for name in ("md", "ad", "rd"):
        np.testing.assert_allclose(maps[name], 0.1, rtol=1e-9, err_msg=name)
    # FA is scale invariant and a scaled tensor keeps its eigenvectors.
    np.testing.assert_allclose(maps["fa"], 0.0, atol=1e-9)
    for name in ("inclination", "azimuth", "v1angle"):
        np.testing.assert_allclose(maps[name], 0.0, atol=1e-4, err_msg=name)


def test_fa_md_errors_match_dipy():
    from dipy.reconst.dti import fractional_anisotropy, mean_diffusivity

    rng = np.random.default_rng(2)
    reference, evals_ref, *_ = random_tensors((5, 4, 3), rng)
    predicted, evals_pred, *_ = random_tensors((5, 4, 3), rng)
    maps = error_maps(predicted, reference, np.ones((5, 4, 3), bool))
    for name, function in (("fa", fractional_anisotropy), ("md", mean_diffusivity)):
        expected = np.abs(function(evals_pred) - function(evals_ref)) / np.abs(function(evals_ref))
        np.testing.assert_allclose(maps[name], expected, rtol=1e-8, err_msg=name)


def test_v1_rotated_by_30_degrees_gives_30_degrees():
    rng = np.random.default_rng(3)
    reference, evals, v1, v2 = random_tensors((4, 4, 4), rng)
    # Rotate each frame by 30 deg about its own second eigenvector: V1 moves by exactly 30 deg.
    rotation = Rotation.from_rotvec(np.radians(30.0) * v2.reshape(-1, 3)).as_matrix().reshape(*v2.shape, 3)
    rotated_v1 = np.einsum("...ij,...j->...i", rotation, v1)
    predicted = tensors_from(evals, rotated_v1, v2)
    maps = error_maps(predicted, reference, np.ones((4, 4, 4), bool))
    np.testing.assert_allclose(maps["v1angle"], 30.0, atol=1e-6)


@pytest.mark.parametrize("rotvec_axis, inclination, azimuth", [((0, 0, 1), 0.0, 30.0), ((0, 1, 0), 30.0, 0.0)])
def test_inclination_and_azimuth_of_a_rotated_x_axis(rotvec_axis, inclination, azimuth):
    v1 = np.array([1.0, 0.0, 0.0])
    rotated = Rotation.from_rotvec(np.radians(30.0) * np.array(rotvec_axis, float)).apply(v1)
    errors = axis_angle_errors(rotated[None], v1[None])
    assert errors["inclination"][0] == pytest.approx(inclination, abs=1e-9)
    assert errors["azimuth"][0] == pytest.approx(azimuth, abs=1e-9)
    assert errors["v1angle"][0] == pytest.approx(30.0, abs=1e-9)


def test_axis_sign_flip_near_the_xy_plane_is_not_a_180_degree_azimuth_error():
    epsilon = np.radians(0.5)
    reference = np.array([[np.cos(epsilon), 0.0, np.sin(epsilon)]])
    predicted = np.array([[-np.cos(epsilon), 0.0, np.sin(epsilon)]])  # = -(cos, 0, -sin): 1 deg away as an axis
    errors = axis_angle_errors(predicted, reference)
    assert errors["azimuth"][0] == pytest.approx(0.0, abs=1e-9)
    assert errors["inclination"][0] == pytest.approx(1.0, abs=1e-9)
    assert errors["v1angle"][0] == pytest.approx(1.0, abs=1e-9)


def test_near_zero_references_are_excluded_and_counted():
    rng = np.random.default_rng(4)
    reference, *_ = random_tensors((4, 4, 4), rng)
    reference[0, :, :, 1] = 0.0  # D12 exactly zero on 16 voxels
    reference[1, 0, :, 1] = 5e-7  # below the 1e-6 mm^2/s floor on 4 more
    mask = np.ones((4, 4, 4), bool)
    mask[3, 3, 3] = False
    maps = error_maps(1.2 * reference, reference, mask)
    assert np.count_nonzero(np.isnan(maps["D12"][mask])) == 20
    np.testing.assert_allclose(maps["D12"][1:][np.isfinite(maps["D12"][1:])], 0.2, rtol=1e-9)
    assert np.isnan(maps["D11"][3, 3, 3])  # outside the mask
    wm = np.zeros((4, 4, 4))
    wm[:2] = 1.0  # the 32 voxels of x = 0, 1, all inside the mask
    rows = tissue_statistics(maps, {"WM": wm}, mask, ENTITIES, threshold=0.5)
    d12 = {row["statistic"]: row for row in rows if row["metric"] == "D12" and row["tissue"] == "WM"}
    assert d12["median"]["n_voxels"] == 12 and d12["median"]["n_excluded"] == 20
    assert d12["weighted_mean"]["n_excluded"] == 20
    assert d12["mean"]["value"] == pytest.approx(0.2)
    brain = {row["statistic"]: row for row in rows if row["metric"] == "D12" and row["tissue"] == "brain"}
    assert brain["median"]["n_voxels"] == 63 - 20 and brain["median"]["n_excluded"] == 20
    off = {row["statistic"]: row for row in rows if row["metric"] == "offdiagonal" and row["tissue"] == "WM"}
    assert off["median"]["n_voxels"] == 3 * 32 - 20 and off["median"]["n_excluded"] == 20
    assert all(np.isfinite(row["value"]) for row in rows if row["value"] is not None)


def test_relative_error_floor_is_absolute_value():
    error = relative_error(np.array([1.0, 2.0, 3.0]), np.array([-2e-6, 0.5e-6, -1.0]), 1e-6)
    np.testing.assert_allclose(error, [(1.0 + 2e-6) / 2e-6, np.nan, 4.0])


def test_tissue_weighting_matches_hand_computation():
    errors = np.array([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1)
    probability = np.array([1.0, 0.5, 0.25, 0.0]).reshape(4, 1, 1)
    mask = np.ones((4, 1, 1), bool)
    rows = tissue_statistics({"fa": errors}, {"GM": probability}, mask, ENTITIES, threshold=0.2)
    stats = {row["statistic"]: row for row in rows if row["tissue"] == "GM"}
    # sum(p e) / sum(p) = (0.1 + 0.1 + 0.075) / 1.75 over the 3 voxels with p > 0.
    assert stats["weighted_mean"]["value"] == pytest.approx(0.275 / 1.75)
    assert stats["weighted_mean"]["n_voxels"] == 3
    # p > 0.2 selects 0.1, 0.2, 0.3; linear percentiles at rank q/100 * (n - 1).
    expected = {"median": 0.2, "p01": 0.1 + 0.02 * 0.1, "p25": 0.15, "p75": 0.25, "p99": 0.2 + 0.98 * 0.1,
                "mean": 0.2, "std": np.sqrt(((0.1) ** 2 + 0 + (0.1) ** 2) / 3)}
    for name, value in expected.items():
        assert stats[name]["value"] == pytest.approx(value), name
        assert stats[name]["n_voxels"] == 3
    brain = {row["statistic"]: row["value"] for row in rows if row["tissue"] == "brain"}
    assert brain["weighted_mean"] == pytest.approx(0.25) and brain["median"] == pytest.approx(0.25)


def test_empty_tissue_gives_missing_values_not_nan():
    rows = tissue_statistics({"md": np.full((2, 2, 2), 0.1)}, {"CSF": np.zeros((2, 2, 2))}, np.ones((2, 2, 2), bool),
                             ENTITIES)
    csf = [row for row in rows if row["tissue"] == "CSF"]
    assert csf and all(row["value"] is None and row["n_voxels"] == 0 for row in csf)


def _sphere(n: int) -> np.ndarray:
    grid = np.indices((n, n, n)) - (n - 1) / 2
    return (grid ** 2).sum(axis=0) < (0.45 * n) ** 2


def test_psnr_is_the_closed_form_on_the_normalised_tensor():
    rng = np.random.default_rng(5)
    mask = _sphere(12)
    reference, *_ = random_tensors((12, 12, 12), rng)
    predicted = reference + rng.normal(0, 5e-5, reference.shape)
    scaled_pred, scaled_ref = normalised_tensors(predicted, reference, mask)
    # Independent normalisation: min-max of the reference's diagonal / off-diagonal inside the mask.
    diagonal = reference[mask][:, [0, 3, 5]]
    np.testing.assert_allclose(scaled_ref[mask][:, [0, 3, 5]],
                               (diagonal - diagonal.min()) / (diagonal.max() - diagonal.min()), atol=1e-12)
    assert np.all(scaled_pred[~mask] == 0)
    mse = np.mean((scaled_pred[mask] - scaled_ref[mask]) ** 2)
    assert psnr(scaled_pred, scaled_ref, mask) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-6)
    assert psnr(scaled_ref, scaled_ref, mask) is None


def test_ssim_matches_skimage_inside_the_mask():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(6)
    n = 16
    mask = _sphere(n)
    reference = rng.uniform(0, 1, (n, n, n, 2)) * mask[..., None]
    predicted = np.clip(reference + rng.normal(0, 0.1, reference.shape), 0, 1) * mask[..., None]
    maps = [structural_similarity(predicted[..., c], reference[..., c], data_range=1.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False, full=True)[1] for c in range(2)]
    interior = np.zeros_like(mask)
    interior[5:-5, 5:-5, 5:-5] = True  # window centres that see no padding
    expected = np.mean(np.mean(maps, axis=0)[interior & mask])
    assert ssim(predicted, reference, mask) == pytest.approx(expected, abs=1e-4)
    assert ssim(reference, reference, mask) == pytest.approx(1.0, abs=1e-5)
    assert ssim(reference[:10, :10, :10], reference[:10, :10, :10], mask[:10, :10, :10]) is None


def test_frechet_distance_matches_monai_and_vanishes_for_identical_samples():
    import torch
    from monai.metrics.fid import get_fid_score

    rng = np.random.default_rng(7)
    a = rng.normal(0, 1, (400, 4)) @ rng.normal(0, 1, (4, 4))
    b = rng.normal(0.5, 2, (300, 4))
    expected = float(get_fid_score(torch.from_numpy(a), torch.from_numpy(b)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Fewer samples than features (rank-deficient covariances) stays finite and real.
    few = rng.normal(0, 1, (6, 64))
    assert np.isfinite(frechet_distance(few, few + 0.1))


def test_fid_needs_a_weights_file_and_uses_it_when_given(tmp_path):
    import torch

    from bssfp2dt.models.medicalnet import build_medicalnet_resnet10

    rng = np.random.default_rng(8)
    mask = _sphere(16)
    reference, *_ = random_tensors((16, 16, 16), rng)
    predicted = reference * rng.uniform(0.8, 1.2, reference.shape)
    without = image_metrics(predicted, reference, mask)
    assert without.fid is None and "weights" in without.not_computed["fid"]
    assert without.psnr is not None and without.ssim is not None
    torch.manual_seed(0)
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in build_medicalnet_resnet10().state_dict().items()}}, weights)
    with_fid = image_metrics(predicted, reference, mask, fid_weights=weights)
    assert with_fid.fid is not None and with_fid.fid > 0 and "fid" not in with_fid.not_computed
    assert image_metrics(reference, reference, mask, fid_weights=weights).fid == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MissingInputError, match="does not exist"):
        image_metrics(predicted, reference, mask, fid_weights=tmp_path / "absent.pth")


def test_angle_floor_excludes_isotropic_reference_voxels():
    rng = np.random.default_rng(9)
    reference, *_ = random_tensors((3, 3, 3), rng)
    reference[0] = np.array([1e-3, 0, 0, 1e-3, 0, 1e-3])  # isotropic: FA 0, V1 undefined
    maps = error_maps(reference, reference, np.ones((3, 3, 3), bool), ErrorFloors(fa_for_angles=0.05))
    assert np.isnan(maps["v1angle"][0]).all() and np.isfinite(maps["v1angle"][1:]).all()


def test_angles_about_an_axis_are_sign_invariant_and_separate_inclination_from_azimuth():
    """About B0 (tilted from z), a prediction turned about B0 keeps its inclination exactly and shows the turn as
    azimuth error (modulo 180: axes); reversing either vector changes nothing; the hemisphere-aligned
    inclination about z does count the turn."""
    b0 = Rotation.from_rotvec([np.radians(10.0), 0.0, 0.0]).apply([0.0, 0.0, 1.0])
    reference = Rotation.from_rotvec(np.radians(60.0) * np.array([0.0, 1.0, 0.0])).apply(b0)[None]
    turned = Rotation.from_rotvec(np.radians(150.0) * b0).apply(reference)
    errors = axis_angle_errors_about(turned, reference, b0)
    assert errors["inclination"][0] == pytest.approx(0.0, abs=1e-9)
    assert errors["azimuth"][0] == pytest.approx(30.0)  # 150 deg of turn is 30 deg for an axis
    flipped = axis_angle_errors_about(-turned, reference, -b0)
    assert flipped["inclination"][0] == pytest.approx(0.0, abs=1e-9) and flipped["azimuth"][0] == pytest.approx(30.0)
    tilted = Rotation.from_rotvec(np.radians(20.0) * np.cross(b0, reference[0]) / np.linalg.norm(
        np.cross(b0, reference[0]))).apply(reference)
    assert axis_angle_errors_about(tilted, reference, b0)["inclination"][0] == pytest.approx(20.0)
    assert axis_angle_errors(turned, reference)["inclination"][0] > 10.0
    assert np.isnan(axis_angle_errors_about(turned, reference, b0, valid=np.array([False]))["azimuth"][0])
