"""Resampling of scalar/4D/complex/tensor volumes and the common 2 mm grid."""
from __future__ import annotations

import numpy as np

from bssfp2dt.dti.eigen import bep016_to_matrix, matrix_to_bep016
import pytest
from dipy.reconst.dti import decompose_tensor, fractional_anisotropy, mean_diffusivity

from bssfp2dt.errors import UsageError
from bssfp2dt.preprocessing import resampling as rs


def rotation_matrix(axis, degrees):
    """Rodrigues' formula: right-handed rotation about ``axis``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def rigid_about(rotation, centre, translation=(0, 0, 0)):
    """4x4 world map y = R (x - c) + c + t."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = centre - rotation @ centre + np.asarray(translation, float)
    return m


def world_points(affine, shape):
    idx = np.indices(shape, dtype=float).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).T.reshape(shape + (3,))


@pytest.mark.parametrize("order", [0, 1, 3])
def test_identity_on_same_grid_returns_input(order):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(9, 8, 7, 2))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-8, 5, 3]
    out = rs.resample(vol, affine, vol.shape[:3], affine, np.eye(4), order=order)
    np.testing.assert_allclose(out, vol, atol=1e-6 if order == 3 else 1e-12)


def test_world_translation_shifts_by_whole_voxels():
    vol = np.random.default_rng(1).normal(size=(10, 10, 10))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    transform = np.eye(4)
    transform[:3, 3] = [4.0, -2.0, 0.0]  # target point x takes the source value at x + t
    out = rs.resample(vol, affine, vol.shape, affine, transform)
    np.testing.assert_allclose(out[:-2, 1:, :], vol[2:, :-1, :], atol=1e-12)
    assert np.all(out[-2:] == 0.0)


def test_complex_phase_ramp_keeps_its_phase_under_rotation():
    shape = (20, 20, 20)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    k = np.array([0.05, -0.03, 0.04])  # rad/mm: a slow ramp, as the bSSFP background phase
    signal = 3.0 * np.exp(1j * world_points(affine, shape) @ k)
    centre = world_points(affine, shape)[10, 10, 10]
    transform = rigid_about(rotation_matrix([1, 1, 0], 10.0), centre, [1.0, 0.5, -0.7])
    out = rs.resample(signal, affine, shape, affine, transform)
    source_points = world_points(affine, shape) @ transform[:3, :3].T + transform[:3, 3]
    expected = source_points @ k
    interior = (slice(3, -3),) * 3
    phase_error = np.angle(out * np.exp(-1j * expected))[interior]
    assert np.abs(phase_error).max() < 5e-3
    np.testing.assert_allclose(np.abs(out[interior]), 3.0, rtol=1e-2)


def test_common_grid_is_ras_and_covers_an_oblique_las_t1w():
    t1_affine = np.eye(4)
    t1_affine[:3, :3] = rotation_matrix([0, 0, 1], 12.0) @ np.diag([-1.0, 1.0, 1.2])
    t1_affine[:3, 3] = [80.0, -100.0, -60.0]
    t1_shape = (40, 50, 30)
    shape, affine = rs.common_grid(t1_affine, t1_shape, voxel_mm=2.0)
    np.testing.assert_array_equal(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    # Every T1w voxel centre falls inside the new grid's voxel-centre box (within half a voxel).
    t1_centres = world_points(t1_affine, t1_shape).reshape(-1, 3)
    indices = (t1_centres - affine[:3, 3]) / 2.0
    assert indices.min() >= -0.5 and np.all(indices.max(axis=0) <= np.array(shape) - 0.5)
    # No slack: the grid is at most one voxel larger than the field of view per axis.
    extent = t1_centres.max(axis=0) - t1_centres.min(axis=0)
    assert np.all(np.array(shape) * 2.0 <= extent + 2 * 2.0 + 2.0)


def test_common_grid_of_a_1mm_ras_image_halves_the_shape():
    t1_affine = np.eye(4)
    t1_affine[:3, 3] = [-80.0, -96.0, -70.0]
    shape, affine = rs.common_grid(t1_affine, (160, 192, 140))
    assert shape == (80, 96, 70)
    # The 2 mm voxel centre sits midway between two 1 mm voxel centres.
    np.testing.assert_allclose(affine[:3, 3], [-79.5, -95.5, -69.5])


def test_rotation_part_is_the_polar_factor():
    rotation = rotation_matrix([0.3, -1, 2], 37.0)
    stretch = np.array([[1.3, 0.2, 0.0], [0.2, 0.9, 0.1], [0.0, 0.1, 1.1]])  # symmetric positive
    np.testing.assert_allclose(rs.rotation_part(rotation @ stretch), rotation, atol=1e-12)
    np.testing.assert_allclose(rs.rotation_part(stretch @ rotation), rotation, atol=1e-12)
    with pytest.raises(UsageError, match="singular"):
        rs.rotation_part(np.zeros((3, 3)))


def test_anisotropic_voxels_are_not_a_rotation():
    source = np.diag([1.0, 2.0, 3.0, 1.0])
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(rs.tensor_rotation(source, target), np.eye(3), atol=1e-12)


def _linear_tensor_field(points):
    """World-frame tensors linear in position (mm^2/s), positive definite on the test box."""
    v1 = np.array([1.0, 1.0, 0.2]) / np.linalg.norm([1.0, 1.0, 0.2])
    d0 = 1e-3 * (0.4 * np.eye(3) + 1.2 * np.outer(v1, v1))
    g = 1e-3 * np.array([[[0.004, 0.001, 0.0], [0.001, 0.0, 0.0], [0.0, 0.0, -0.002]],
                         [[0.0, 0.002, 0.0], [0.002, 0.003, 0.0], [0.0, 0.0, 0.0]],
                         [[0.0, 0.0, 0.001], [0.0, -0.002, 0.0], [0.001, 0.0, 0.002]]])
    return d0 + np.einsum("...j,jab->...ab", points, g)


@pytest.mark.parametrize("target_flip", [False, True])
def test_tensor_resampling_preserves_fa_md_and_rotates_v1(target_flip):
    source_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    source_affine[:3, 3] = [-24.0, -24.0, -24.0]
    source_shape = (25, 25, 25)
    # The target grid is LAS (x flipped) when target_flip, so voxel axes differ from world axes.
    target_affine = np.diag([-2.0 if target_flip else 2.0, 2.0, 2.0, 1.0])
    target_affine[:3, 3] = [14.0 if target_flip else -14.0, -14.0, -14.0]
    target_shape = (15, 15, 15)
    # Source tensors in source voxel axes (= world for this RAS source).
    source = matrix_to_bep016(_linear_tensor_field(world_points(source_affine, source_shape)))
    rotation = rotation_matrix([1, -2, 0.5], 25.0)
    transform = rigid_about(rotation, np.zeros(3), [1.5, -2.0, 0.5])
    out = rs.resample_tensor(source, source_affine, target_shape, target_affine, transform)

    points = world_points(target_affine, target_shape) @ transform[:3, :3].T + transform[:3, 3]
    truth_world = _linear_tensor_field(points)
    q_t = target_affine[:3, :3] / 2.0
    # The target sees the tissue rotated by R^-1: D_t = Q_t^T R^T D_w(T x) R Q_t.
    truth = q_t.T @ rotation.T @ truth_world @ rotation @ q_t
    evals_out, evecs_out = decompose_tensor(bep016_to_matrix(out))
    evals_ref, evecs_ref = decompose_tensor(truth)
    np.testing.assert_allclose(fractional_anisotropy(evals_out), fractional_anisotropy(evals_ref), atol=1e-3)
    np.testing.assert_allclose(mean_diffusivity(evals_out), mean_diffusivity(evals_ref), atol=1e-3 * 1e-3)
    # Angle between the resampled V1 and R^T v1 of the source tensor (sign-free), in degrees.
    v1_source = decompose_tensor(truth_world)[1][..., :, 0]
    expected_v1 = np.einsum("ij,...j->...i", q_t.T @ rotation.T, v1_source)
    cosine = np.abs(np.sum(evecs_out[..., :, 0] * expected_v1, axis=-1))
    angle = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    assert angle.max() < 1.0
    # The orientation really changed (guards against a test that passes with no rotation at all).
    no_rotation = np.abs(np.sum(evecs_out[..., :, 0] * (q_t.T @ v1_source[..., None])[..., 0], axis=-1))
    assert np.degrees(np.arccos(np.clip(no_rotation, -1, 1))).min() > 5.0


def test_log_euclidean_midpoint_has_the_geometric_mean_determinant():
    a = 1e-3 * np.diag([1.7, 0.3, 0.3])
    b = 1e-3 * np.diag([0.8, 0.8, 0.8])
    field = np.empty((2, 1, 1, 6))
    field[0, 0, 0] = matrix_to_bep016(a)
    field[1, 0, 0] = matrix_to_bep016(b)
    affine = np.eye(4)
    target = np.eye(4)
    target[0, 3] = 0.5  # one voxel centred halfway between the two tensors
    out = rs.resample_tensor(field, affine, (1, 1, 1), target, interpolation="log-euclidean")
    det = np.linalg.det(bep016_to_matrix(out)[0, 0, 0])
    assert det == pytest.approx(np.sqrt(np.linalg.det(a) * np.linalg.det(b)), rel=1e-9)
    linear = rs.resample_tensor(field, affine, (1, 1, 1), target)
    np.testing.assert_allclose(bep016_to_matrix(linear)[0, 0, 0], (a + b) / 2, atol=1e-15)


def test_bad_inputs_raise_usage_errors():
    with pytest.raises(UsageError, match="4x4"):
        rs.resample(np.zeros((3, 3, 3)), np.eye(3), (3, 3, 3), np.eye(4))
    with pytest.raises(UsageError, match="interpolation"):
        rs.resample_tensor(np.zeros((2, 2, 2, 6)), np.eye(4), (2, 2, 2), np.eye(4), interpolation="cubic")
