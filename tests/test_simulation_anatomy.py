"""Anatomies and fibre directions of the simulator."""
import numpy as np
import pytest

from bssfp2dt.simulation.anatomy import MniAnatomy, ProceduralAnatomy, PHANTOM_STRUCTURES
from bssfp2dt.simulation.fibres import dyadic, principal_direction


def _box(x, y, z):
    grid = np.meshgrid(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float), indexing="ij")
    return np.stack(grid, axis=-1).reshape(-1, 3)


@pytest.fixture(scope="module")
def mni():
    return MniAnatomy()


def _white_matter_v1(anatomy, points):
    inside = anatomy.fractions(points)[:, 1] > 0.5
    return anatomy.fibres(points[inside]).v1


def test_mid_sagittal_corpus_callosum_runs_left_right(mni):
    v1 = _white_matter_v1(mni, _box(range(-2, 3), range(-35, 31), range(0, 31)))
    assert len(v1) > 500
    assert np.mean(np.abs(v1[:, 0]) > 0.9) >= 0.90


def test_posterior_limb_of_internal_capsule_runs_inferior_superior(mni):
    v1 = _white_matter_v1(mni, _box(np.r_[-30:-13, 14:31], range(-28, 1), range(-8, 19)))
    assert len(v1) > 1000
    assert np.mean(np.abs(v1[:, 2]) > 0.8) >= 0.80


def test_mni_tissue_fractions_are_probabilities(mni):
    rng = np.random.default_rng(0)
    points = rng.uniform(mni.extent[0], mni.extent[1], (20000, 3))
    fractions = mni.fractions(points)
    assert fractions.min() >= 0 and fractions.sum(axis=1).max() <= 1 + 1e-5
    # a real brain: white and grey matter each fill a good part of the bounding box
    assert 0.1 < fractions[:, 0].mean() < 0.5 and 0.05 < fractions[:, 1].mean() < 0.4


def test_random_fibres_change_the_corpus_callosum():
    random = MniAnatomy(randomise_fibres=np.random.default_rng(7))
    v1 = _white_matter_v1(random, _box(range(-2, 3), range(-20, 11), range(10, 21)))
    assert np.mean(np.abs(v1[:, 0]) > 0.9) < 0.5


def test_procedural_structures_have_their_known_directions():
    phantom = ProceduralAnatomy(scale=1.0)
    for structure in PHANTOM_STRUCTURES:
        centre = np.asarray(structure.centre)[None]
        v1 = phantom.fibres(centre).v1[0]
        expected = np.asarray(structure.direction, float)
        if hasattr(structure, "normal"):
            normal = np.asarray(structure.normal, float) / np.linalg.norm(structure.normal)
            expected = expected - (expected @ normal) * normal
        expected /= np.linalg.norm(expected)
        assert abs(v1 @ expected) > 0.99, structure.name


def test_procedural_tissues_layer_from_csf_to_white_matter():
    phantom = ProceduralAnatomy(scale=1.0)
    # along +x from the surface inwards: outside, CSF, GM, then WM (away from the ventricles)
    depth_points = np.array([[63.0, 0, 0], [61.0, 0, 0], [58.5, 0, 0], [40.0, 0, 0]])
    fractions = phantom.fractions(depth_points)
    assert fractions[0].sum() < 0.1
    assert np.argmax(fractions[1]) == 2 and np.argmax(fractions[2]) == 0 and np.argmax(fractions[3]) == 1
    rng = np.random.default_rng(1)
    sample = phantom.fractions(rng.uniform(-80, 80, (5000, 3)))
    assert sample.min() >= -1e-12 and sample.sum(axis=1).max() <= 1 + 1e-9


def test_principal_direction_of_a_dyadic_mixture():
    x, y = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    v1, share = principal_direction(0.7 * dyadic(x) + 0.3 * dyadic(y))
    assert abs(v1 @ x) == pytest.approx(1.0)
    assert share == pytest.approx(0.4)
