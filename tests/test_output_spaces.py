"""Template-space outputs: ANTs affine normalisation and tensor reorientation on small synthetic grids.

The subject is the template turned by a known rotation (and shifted); its tensor field is the template's
rotated with it. Registering the subject to the template and resampling the tensor must give back the
template's field: principal eigenvectors within 2 degrees.
"""
from __future__ import annotations

import numpy as np
import pytest

from bssfp2dt.preprocessing.resampling import rotation_part
from bssfp2dt.spaces import normalize, templates

VOXEL = 2.0
SHAPE = (30, 30, 26)
L1, L2 = 1.7e-3, 0.3e-3  # mm^2/s


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def grid_affine() -> np.ndarray:
    affine = np.diag([VOXEL, VOXEL, VOXEL, 1.0])
    affine[:3, 3] = -VOXEL * (np.asarray(SHAPE) - 1) / 2
    return affine


def world(affine: np.ndarray) -> np.ndarray:
    ijk = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*SHAPE, 3)


def head(points: np.ndarray) -> np.ndarray:
    """An asymmetric 'brain': ellipsoid (semi-axes 20, 16, 12 mm) with a bright off-centre lobe."""
    x, y, z = np.moveaxis(points, -1, 0)
    body = ((x / 20) ** 2 + (y / 16) ** 2 + (z / 12) ** 2) <= 1
    lobe = (((x - 8) / 7) ** 2 + ((y - 5) / 5) ** 2 + ((z + 3) / 4) ** 2) <= 1
    ridge = (np.abs(y + 6) < 2.5) & (x < 0)
    return 100.0 * body + 80.0 * (lobe & body) + 40.0 * (ridge & body)


def smooth(image: np.ndarray) -> np.ndarray:
    """Edges a voxel wide, as in a real image (flat blocks give the registration metric no gradient)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(image, 1.0)


def direction(points: np.ndarray) -> np.ndarray:
    """Smoothly varying fibre direction of the template (unit vectors)."""
    x = points[..., 0]
    v = np.stack([np.ones_like(x), x / 30.0, np.full_like(x, 0.3)], axis=-1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def tensor_of(v: np.ndarray) -> np.ndarray:
    outer = v[..., :, None] * v[..., None, :]
    matrix = L2 * np.eye(3) + (L1 - L2) * outer
    return np.stack([matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 0, 2], matrix[..., 1, 1],
                     matrix[..., 1, 2], matrix[..., 2, 2]], axis=-1)


def principal(tensor: np.ndarray) -> np.ndarray:
    d = tensor
    matrix = np.stack([d[..., [0, 1, 2]], d[..., [1, 3, 4]], d[..., [2, 4, 5]]], axis=-2)
    return np.linalg.eigh(matrix)[1][..., -1]


def subject_of(turn: np.ndarray, shift: np.ndarray):
    """The subject: template world t -> subject world s = turn t + shift; image and rotated tensor field."""
    affine = grid_affine()
    s = world(affine)
    t = (s - shift) @ turn  # turn^T (s - shift), row vectors
    image = head(t)
    v = direction(t) @ turn.T  # the fibre turns with the head
    return image, tensor_of(v) * (image > 0)[..., None], image > 0, affine


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)), 0.0, 1.0)))


def test_ants_affine_parameters_become_the_ras_matrix():
    """ITK affine x -> A (x - c) + t + c in LPS, checked on a point by hand."""
    a = rotation(30, 0)
    parameters = np.concatenate([a.ravel(), [1.0, 2.0, 3.0]])
    centre = np.array([5.0, -4.0, 2.0])
    ras = normalize.ants_affine_to_ras(parameters, centre)
    point_ras = np.array([10.0, 20.0, 30.0])
    point_lps = point_ras * [-1, -1, 1]
    moved_lps = a @ (point_lps - centre) + [1.0, 2.0, 3.0] + centre
    np.testing.assert_allclose(ras[:3, :3] @ point_ras + ras[:3, 3], moved_lps * [-1, -1, 1], atol=1e-12)


def test_known_rotation_is_undone_by_the_reorientation():
    turn, shift = rotation(25, 10), np.array([3.0, -2.0, 1.0])
    _, tensor, mask, affine = subject_of(turn, shift)
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = turn, shift
    moved, moved_mask = normalize.tensor_to_template(tensor, mask, affine, SHAPE, affine, transform)
    truth = direction(world(affine))
    inner = moved_mask & (head(world(affine)) > 0)
    errors = angle_deg(principal(moved)[inner], truth[inner])
    assert inner.sum() > 1000 and np.percentile(errors, 95) < 2.0
    # without the reorientation the vectors stay turned: the check can fail
    unturned = principal(tensor_of(direction(world(affine)) @ turn.T))[inner]
    assert np.median(angle_deg(unturned, truth[inner])) > 10


def test_ants_registration_recovers_the_rotation_and_the_tensor_directions():
    turn, shift = rotation(15, 8), np.array([2.0, -3.0, 1.5])
    image, tensor, mask, affine = subject_of(turn, shift)
    template = head(world(affine))
    transform = normalize.register_to_template(smooth(image), affine, smooth(template), affine)
    found = rotation_part(transform[:3, :3])  # an affine also scales a little; only its rotation is compared
    recovered = np.degrees(np.arccos(np.clip((np.trace(found.T @ turn) - 1) / 2, -1, 1)))
    assert recovered < 2.0, transform
    np.testing.assert_allclose(transform[:3, 3], shift, atol=1.0)  # mm
    moved, moved_mask = normalize.tensor_to_template(tensor, mask, affine, SHAPE, affine, transform)
    inner = moved_mask & (template > 0)
    errors = angle_deg(principal(moved)[inner], direction(world(affine))[inner])
    assert np.median(errors) < 2.0 and np.percentile(errors, 90) < 4.0


def test_output_spaces_keep_t1w_first_and_refuse_bad_names():
    from bssfp2dt.errors import UsageError

    assert templates.check_output_spaces(["MNI152NLin2009aSym", "T1w", "MNI152NLin2009aSym:res-2"]) == (
        "T1w", "MNI152NLin2009aSym")
    assert templates.check_output_spaces(["MNI152NLin6Asym:res-4"]) == ("T1w", "MNI152NLin6Asym:res-4")
    for bad in ("MNI/152", "MNI152NLin6Asym:cohort-1", "MNI152NLin6Asym:res-0"):
        with pytest.raises(UsageError):
            templates.check_output_spaces([bad])


def test_offline_template_comes_through_templateflow(tmp_path, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    path = templates.template_file("MNI152NLin2009aSym", tmp_path)  # home: <work_dir>/templateflow
    assert path.parent.parent == tmp_path / "templateflow"
    assert path.name == "tpl-MNI152NLin2009aSym_res-1_T1w.nii.gz" and path.stat().st_size > 1_000_000
    assert (path.parent / "NOTICE-bssfp2dt.txt").read_text().startswith("The ICBM 2009a")
    t1w, brain, shape, affine = normalize.template_grid(path)
    assert np.allclose(np.diag(affine)[:3], 2.0) and 0.05 < brain.mean() < 0.6 and t1w.shape == shape


def test_moments_start_scales_a_small_head_to_the_template():
    """The similarity start: centres of mass aligned, volume ratio 1/8 -> scale 0.5."""
    affine = grid_affine()
    points = world(affine)
    big = head(points)
    small = head(points * 2.0 - [4.0, 0.0, 0.0])  # half size, centred at x = 2 mm
    transform = normalize.moments_similarity(big, affine, small, affine)
    np.testing.assert_allclose(np.diag(transform)[:3], 0.5, atol=0.03)


def test_the_environment_is_left_as_it_was(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    templates.templateflow_api(tmp_path / "tf")
    assert "TEMPLATEFLOW_HOME" not in os.environ
    import templateflow.conf

    assert templateflow.conf.TF_HOME == tmp_path / "tf" or str(templateflow.conf.TF_HOME) == str(tmp_path / "tf")


def test_a_nonlinear_twist_is_undone_voxel_by_voxel():
    """A twist about z whose angle grows with z (no single rotation undoes it): the local Jacobian does."""
    affine = grid_affine()
    t = world(affine)  # template voxels (world mm)
    rate = np.radians(2.0)  # rad per mm: +-25 degrees at the top and bottom of the grid

    def twist(points: np.ndarray) -> np.ndarray:
        angle = rate * points[..., 2]
        c, s = np.cos(angle), np.sin(angle)
        x, y = points[..., 0], points[..., 1]
        return np.stack([c * x - s * y, s * x + c * y, points[..., 2]], axis=-1)

    def untwist(points: np.ndarray) -> np.ndarray:
        angle = -rate * points[..., 2]
        c, s = np.cos(angle), np.sin(angle)
        x, y = points[..., 0], points[..., 1]
        return np.stack([c * x - s * y, s * x + c * y, points[..., 2]], axis=-1)

    s = world(affine)  # subject voxels; the subject is the twisted template
    back = untwist(s)
    v = direction(back)
    angle = rate * s[..., 2]
    c, sn = np.cos(angle), np.sin(angle)
    local = np.zeros(s.shape[:3] + (3, 3))  # Jacobian of the twist at back: rotation by angle + shear
    local[..., 0, 0], local[..., 0, 1], local[..., 1, 0], local[..., 1, 1], local[..., 2, 2] = c, -sn, sn, c, 1
    local[..., 0, 2] = -rate * (sn * back[..., 0] + c * back[..., 1])
    local[..., 1, 2] = rate * (c * back[..., 0] - sn * back[..., 1])
    u, _, vt = np.linalg.svd(local)
    turned = np.einsum("...ij,...j->...i", u @ vt, v)  # each fibre turned by the local rotation (finite strain)
    subject = tensor_of(turned) * (head(back) > 0)[..., None]
    moved = normalize.tensor_through_field(subject, affine, twist(t), affine)
    inner = (head(t) > 0) & (np.abs(t[..., 2]) < 8)
    errors = angle_deg(principal(moved)[inner], direction(t)[inner])
    assert inner.sum() > 500 and np.median(errors) < 2.0 and np.percentile(errors, 90) < 4.0
    # one global rotation (the twist's mean, zero) leaves the directions turned
    unturned = angle_deg(principal(subject)[inner], direction(t)[inner])
    assert np.median(unturned) > 5


def test_a_template_missing_offline_is_one_exit_66_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bssfp2dt.errors import MissingInputError

    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    config = SimpleNamespace(model=SimpleNamespace(output_spaces=("T1w", "NoSuchTemplate")),
                             paths=SimpleNamespace(work_dir=tmp_path))
    with pytest.raises(MissingInputError) as error:
        normalize.prepare_templates(config)
    assert error.value.exit_code == 66 and "MNI152NLin2009aSym" in error.value.message
