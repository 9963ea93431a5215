"""Between-subject tissue sampling: ranges, and the water-content link that lets the inputs carry MD."""
import numpy as np
import pytest

from bssfp2dt.simulation.signal import PoolRelaxation, mp2rage_inversions, mp2rage_uni
from bssfp2dt.simulation.subject import (MD_MEAN, MD_SPREAD, T1_RANGE_S, TISSUES, sample_pool_relaxation,
                                         sample_tissues)

N_SUBJECTS = 400


@pytest.fixture(scope="module")
def sampled():
    rng = np.random.default_rng(11)
    tissues = [sample_tissues(rng) for _ in range(N_SUBJECTS)]
    pools = [sample_pool_relaxation(rng, t) for t in tissues]
    return tissues, pools


def _column(tissues, attribute, tissue):
    return np.array([getattr(t, attribute)[tissue] for t in tissues])


@pytest.mark.parametrize("tissue", TISSUES)
def test_t1_and_md_stay_in_their_documented_ranges(sampled, tissue):
    tissues, _ = sampled
    t1, md = _column(tissues, "t1", tissue), _column(tissues, "md", tissue)
    low, high = T1_RANGE_S[tissue]
    assert low <= t1.min() and t1.max() <= high
    assert (t1.max() - t1.min()) > 0.9 * (high - low)  # the whole range is used
    deviation = md / MD_MEAN[tissue] - 1.0
    assert np.abs(deviation).max() <= MD_SPREAD[tissue] + 1e-12
    assert np.abs(deviation).max() > 0.8 * MD_SPREAD[tissue]
    assert abs(deviation.mean()) < 0.15 * MD_SPREAD[tissue]


@pytest.mark.parametrize("tissue", TISSUES)
def test_md_follows_t1_across_subjects(sampled, tissue):
    tissues, _ = sampled
    correlation = np.corrcoef(_column(tissues, "t1", tissue), _column(tissues, "md", tissue))[0, 1]
    assert correlation > 0.95


def test_fa_scales_stay_independent_of_water_content(sampled):
    tissues, _ = sampled
    water = _column(tissues, "water_content", "WM")
    for attribute in ("fa_wm_coherent", "fa_wm_general"):
        values = np.array([getattr(t, attribute) for t in tissues])
        assert abs(np.corrcoef(water, values)[0, 1]) < 0.2


def test_white_matter_pool_t1_follows_the_wm_water_content(sampled):
    tissues, pools = sampled
    water = _column(tissues, "water_content", "WM")
    pool_t1 = np.array([p.t1_intra_extra for p in pools])
    np.testing.assert_allclose(pool_t1, PoolRelaxation().t1_intra_extra * (1 + 0.10 * water), rtol=1e-12)
    myelin_t1 = np.array([p.t1_myelin for p in pools])
    assert abs(np.corrcoef(water, myelin_t1)[0, 1]) < 0.2  # the other pool times vary on their own


def test_the_t1w_contrast_predicts_white_matter_md(sampled):
    """The MP2RAGE UNI value of white matter, a closed-form function of its T1, explains most of the
    between-subject MD variance: the information a T1w model needs to beat the tissue mean."""
    tissues, _ = sampled
    uni = mp2rage_uni(*mp2rage_inversions(_column(tissues, "t1", "WM")))
    md = _column(tissues, "md", "WM")
    slope, intercept = np.polyfit(uni, md, 1)
    residual = md - (slope * uni + intercept)
    assert 1.0 - residual.var() / md.var() > 0.9
