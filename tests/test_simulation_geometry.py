"""Geometry of simulated subjects: poses, warps, grids."""
import numpy as np
import pytest

from bssfp2dt.simulation.geometry import (RigidPose, axis_aligned_grid, rotation_angles_deg, rotation_matrix,
                                          sample_warp)


def test_rotation_angles_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angles = rng.uniform(-40, 40, 3)
        np.testing.assert_allclose(rotation_angles_deg(rotation_matrix(angles)), angles, atol=1e-9)
        r = rotation_matrix(angles)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)


def test_pose_maps_scanner_back_to_head():
    pose = RigidPose((5.0, -3.0, 10.0), (2.0, -1.0, 4.0))
    head = np.random.default_rng(1).uniform(-50, 50, (10, 3))
    scanner = head @ pose.rotation.T + np.asarray(pose.translation_mm)
    np.testing.assert_allclose(pose.head_points(scanner), head, atol=1e-10)
    composed = pose.compose(RigidPose((1.0, 2.0, 3.0), (0.5, 0.5, 0.5)))
    np.testing.assert_allclose(composed.matrix, pose.matrix @ RigidPose((1.0, 2.0, 3.0), (0.5, 0.5, 0.5)).matrix,
                               atol=1e-12)


def test_warp_jacobian_matches_finite_differences():
    warp = sample_warp(np.random.default_rng(2), np.zeros(3))
    points = np.random.default_rng(3).uniform(-60, 60, (20, 3))
    step = 1e-4
    numeric = np.stack([(warp.to_template(points + step * e) - warp.to_template(points - step * e)) / (2 * step)
                        for e in np.eye(3)], axis=-1)
    np.testing.assert_allclose(warp.jacobian(points), numeric, atol=1e-7)


def test_warp_displacement_is_within_the_sampled_amplitude():
    rng = np.random.default_rng(4)
    warp = sample_warp(rng, np.zeros(3), displacement_mm=(2.0, 5.0))
    points = rng.uniform(-80, 80, (5000, 3))
    displacement = warp.to_template(points) - points @ warp.linear.T - warp.offset
    assert np.linalg.norm(displacement, axis=1).max() <= 5.0 + 1e-9
    assert np.all(np.linalg.det(warp.jacobian(points)) > 0.3)  # no folding


@pytest.mark.parametrize("flip_x", [False, True])
def test_axis_aligned_grid_covers_the_box(flip_x):
    grid = axis_aligned_grid(np.array([-10.0, -20, -5]), np.array([10.0, 20, 5]), 2.0, flip_x)
    points = grid.world_points()
    assert points.min(axis=0) == pytest.approx([-10, -20, -5], abs=1.01)
    assert points.max(axis=0) == pytest.approx([10, 20, 5], abs=1.01)
    assert (np.linalg.det(grid.affine[:3, :3]) < 0) == flip_x
