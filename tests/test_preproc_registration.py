"""Registration recovers known rigid and affine offsets of a synthetic head-like object."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bssfp2dt.errors import UsageError
from bssfp2dt.preprocessing import registration as reg
from bssfp2dt.preprocessing import resampling as rs

VOXEL_MM = 2.5
FAST = reg.RegistrationSettings(level_iters=(100, 50), sigmas=(1.0, 0.0), factors=(2, 1))
# ANTs on the same levels; Mattes MI needs finer bins than dipy's on this small object (32 bins leave
# the cross-contrast case 1.6 deg off, 64 bins 0.6 deg).
ANTS = dataclasses.replace(FAST, backend="ants", nbins=64)
BACKENDS = pytest.mark.parametrize("settings", [FAST, ANTS], ids=["dipy", "ants"])


def head_phantom(shape=(32, 32, 32), voxel=VOXEL_MM, seed=0, blob_contrast=1.0):
    """A smooth-edged ellipsoidal 'head' (80 mm box) holding seven Gaussian blobs of +-contrast.

    The blobs make the object asymmetric, so every rotation changes the image; ``blob_contrast``
    scales (or, negative, inverts) the blobs to mimic another MR contrast of the same anatomy.
    Returns the volume (arbitrary units), its affine (centred on the world origin) and the head mask.
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.array(shape) - 1) / 2
    points = np.indices(shape).reshape(3, -1).T * voxel + affine[:3, 3]
    radius = np.sqrt(((points / np.array([30.0, 33.0, 27.0])) ** 2).sum(axis=1))
    image = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.04))
    for _ in range(7):
        centre = rng.uniform(-18, 18, 3)
        width = rng.uniform(4, 9, 3)
        blob = np.exp(-0.5 * (((points - centre) / width) ** 2).sum(axis=1))
        image += blob_contrast * rng.uniform(-0.8, 0.8) * blob * (radius < 1)
    return image.reshape(shape), affine, (radius < 1).reshape(shape)


def head_points(affine, mask):
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def test_rigid_matrix_and_parameters_round_trip():
    angles, translation = (3.0, -20.0, 47.0), (2.0, -1.0, 0.5)
    matrix = reg.rigid_matrix(angles, translation)
    np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-12)
    got_angles, got_translation = reg.rigid_parameters(matrix)
    np.testing.assert_allclose(got_angles, angles, atol=1e-10)
    np.testing.assert_allclose(got_translation, translation, atol=1e-12)
    # A single axis rotation has that total angle; rotating about a centre keeps the centre fixed.
    assert reg.rotation_angle_deg(reg.rigid_matrix((0, 0, 30), (0, 0, 0))) == pytest.approx(30.0)
    about = reg.rigid_matrix((10, 5, -7), (0, 0, 0), centre_mm=(4, 5, 6))
    np.testing.assert_allclose(about[:3, :3] @ [4, 5, 6] + about[:3, 3], [4, 5, 6], atol=1e-12)


@BACKENDS
def test_rigid_registration_recovers_3deg_2mm(settings):
    static, affine, mask = head_phantom()
    applied = reg.rigid_matrix((3.0, -1.5, 2.0), (2.0, -1.0, 1.5))
    moving = rs.resample(static, affine, static.shape, affine, applied)
    recovered = reg.register(static, affine, moving, affine, "rigid", settings=settings)
    # The registration should undo the resampling transform: recovered @ applied == identity.
    residual = recovered @ applied
    assert reg.rotation_angle_deg(residual) < 0.5
    assert reg.displacement_mm(residual, head_points(affine, mask)).max() < 0.5
    angles, translation = reg.rigid_parameters(np.linalg.inv(applied))
    got_angles, got_translation = reg.rigid_parameters(recovered)
    np.testing.assert_allclose(got_angles, angles, atol=0.5)
    np.testing.assert_allclose(got_translation, translation, atol=0.5)


@BACKENDS
def test_rigid_registration_across_grids_and_contrasts(settings):
    """Moving image on a coarser, shifted grid with inverted blob contrast: MI still aligns it."""
    static, affine, mask = head_phantom()
    other_contrast = head_phantom(blob_contrast=-1.0)[0]
    moving_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    moving_affine[:3, 3] = [-40.0, -38.0, -41.0]
    applied = reg.rigid_matrix((-2.0, 3.0, 1.0), (-1.5, 2.0, 0.0))
    moving = rs.resample(other_contrast, affine, (27, 27, 27), moving_affine, np.linalg.inv(applied))
    recovered = reg.register(static, affine, moving, moving_affine, "rigid", settings=settings)
    # The moving grid was filled by pulling through applied^-1, so recovered == applied.
    residual = np.linalg.inv(applied) @ recovered
    # Looser than the same-grid case: 3 mm voxels and a different contrast blunt the MI optimum.
    assert reg.rotation_angle_deg(residual) < 1.0
    assert reg.displacement_mm(residual, head_points(affine, mask)).max() < 0.75


def test_affine_registration_recovers_a_scaling():
    static, affine, mask = head_phantom()
    applied = reg.rigid_matrix((1.0, 0.0, -2.0), (1.0, 0.0, -1.0))
    applied[:3, :3] = applied[:3, :3] @ np.diag([1.06, 0.95, 1.03])
    moving = rs.resample(static, affine, static.shape, affine, applied)
    recovered = reg.register(static, affine, moving, affine, "affine", settings=FAST)
    residual = recovered @ applied
    # The scaling alone moves the head's edge by up to ~1.8 mm; the residual stays below 0.75 mm.
    assert reg.displacement_mm(residual, head_points(affine, mask)).max() < 0.75
    # The anisotropy of the applied scaling is recovered (MI leaves a ~1 % isotropic bias on
    # this 32^3 object, so ratios of the stretches are compared, not their absolute values).
    stretch = np.sort(np.linalg.svd(np.linalg.inv(recovered[:3, :3]), compute_uv=False))
    np.testing.assert_allclose(stretch / stretch[-1], np.array([0.95, 1.03, 1.06]) / 1.06, atol=0.01)


def test_register_rejects_unknown_kind_and_bad_settings():
    static, affine, _ = head_phantom(shape=(8, 8, 8))
    with pytest.raises(UsageError, match="kind"):
        reg.register(static, affine, static, affine, kind="elastic")
    with pytest.raises(UsageError, match="per level"):
        reg.RegistrationSettings(level_iters=(1, 2), sigmas=(0.0,), factors=(1,))
    with pytest.raises(UsageError, match="backend"):
        reg.RegistrationSettings(backend="elastix")


def test_ants_is_deterministic_and_honours_masks_and_a_start():
    """Same inputs -> the same bytes (seeded sampling); a mask and an explicit 4x4 start are accepted and
    still reach the same optimum."""
    static, affine, mask = head_phantom()
    applied = reg.rigid_matrix((2.0, 1.0, -1.0), (1.0, 0.5, -1.0))
    moving = rs.resample(static, affine, static.shape, affine, applied)
    first = reg.register(static, affine, moving, affine, "rigid", settings=ANTS, initial=np.eye(4))
    again = reg.register(static, affine, moving, affine, "rigid", settings=ANTS, initial=np.eye(4))
    assert first.tobytes() == again.tobytes()
    start = reg.rigid_matrix((0.0, 0.0, 0.0), (0.5, 0.0, 0.0))
    masked = reg.register(static, affine, moving, affine, "rigid", settings=ANTS, static_mask=mask, initial=start)
    for found in (first, masked):
        residual = found @ applied
        assert reg.rotation_angle_deg(residual) < 0.5
        assert reg.displacement_mm(residual, head_points(affine, mask)).max() < 0.5


def test_ants_transform_conversion_matches_itk_definition():
    """ITK's ``y = A (x - c) + c + t`` as a 4x4: a centred rotation keeps its centre fixed."""
    from bssfp2dt.preprocessing.ants_registration import itk_to_matrix

    rotation = reg.rigid_matrix((10.0, -5.0, 3.0), (0, 0, 0))[:3, :3]
    centre, shift = np.array([4.0, -2.0, 7.0]), np.array([1.0, 2.0, 3.0])
    matrix = itk_to_matrix(np.concatenate([rotation.ravel(), shift]), centre)
    np.testing.assert_allclose(matrix[:3, :3] @ centre + matrix[:3, 3], centre + shift, atol=1e-12)
    point = np.array([10.0, 0.0, -3.0])
    np.testing.assert_allclose(matrix[:3, :3] @ point + matrix[:3, 3], rotation @ (point - centre) + centre + shift)


def test_levels_for_shape_drops_only_the_levels_too_coarse_for_the_image():
    settings = reg.RegistrationSettings(level_iters=(100, 50, 10), sigmas=(2.0, 1.0, 0.0), factors=(4, 2, 1))
    assert reg.levels_for_shape(settings, (78, 101, 91, 68)) is settings  # 2 mm head: 19 voxels at 4x
    small = reg.levels_for_shape(settings, (26, 26, 26))
    assert small.factors == (2, 1) and small.sigmas == (1.0, 0.0) and small.level_iters == (100, 10)
    tiny = reg.levels_for_shape(settings, (10, 10, 10))
    assert tiny.factors == (1,) and tiny.level_iters == (100,)
