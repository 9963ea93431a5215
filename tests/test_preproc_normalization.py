"""Dataset-wide normalisation: fitting, round trips, serialisation, out-of-range warning."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from bssfp2dt.errors import MissingInputError, UsageError
from bssfp2dt.preprocessing import normalization as norm


def _subjects(n=3, seed=0):
    """Tiny per-subject tensors (mm^2/s), T1w, masks; the mask excludes a corner of outliers."""
    rng = np.random.default_rng(seed)
    tensors, t1ws, masks = [], [], []
    for _ in range(n):
        tensor = np.zeros((6, 5, 4, 6))
        tensor[..., norm.DIAGONAL] = rng.uniform(0.2e-3, 3.0e-3, (6, 5, 4, 3))
        tensor[..., norm.OFF_DIAGONAL] = rng.uniform(-0.5e-3, 0.5e-3, (6, 5, 4, 3))
        mask = np.ones((6, 5, 4), bool)
        mask[0, 0, 0] = False
        tensor[0, 0, 0] = 1.0  # outside the mask: must not influence the fit
        tensors.append(tensor)
        t1ws.append(rng.uniform(100, 900, (6, 5, 4)))
        masks.append(mask)
    return tensors, t1ws, masks


def test_fit_is_global_min_max_over_subjects_and_mask():
    tensors, t1ws, masks = _subjects()
    params = norm.fit_normalization(tensors=tensors, t1ws=t1ws, masks=masks)
    diag = np.concatenate([t[m][:, norm.DIAGONAL].ravel() for t, m in zip(tensors, masks)])
    off = np.concatenate([t[m][:, norm.OFF_DIAGONAL].ravel() for t, m in zip(tensors, masks)])
    assert params.tensor_diagonal == norm.Range(diag.min(), diag.max())
    assert params.tensor_offdiagonal == norm.Range(off.min(), off.max())
    assert params.t1w.low == min(t[m].min() for t, m in zip(t1ws, masks))
    assert params.magnitude is None and params.phase is None


def test_percentile_fit_matches_numpy_on_pooled_values():
    rng = np.random.default_rng(1)
    volumes = [rng.normal(size=(4, 4, 4, 12)) for _ in range(3)]
    volumes[0][0, 0, 0, 0] = 1e6  # one outlier voxel leaves a robust range untouched
    fitted = norm.fit_range(volumes, percentiles=(1.0, 99.0))
    pooled = np.concatenate([v.ravel() for v in volumes]).astype(np.float32)
    low, high = np.percentile(pooled, [1.0, 99.0])
    assert fitted.low == pytest.approx(low) and fitted.high == pytest.approx(high)
    assert fitted.high < 10


def test_tensor_round_trip_is_exact_in_range():
    tensors, _, masks = _subjects()
    params = norm.fit_normalization(tensors=tensors, masks=masks)
    normalised = norm.normalize_tensor(tensors[1], params, masks[1], dtype=np.float64)
    inside = normalised[masks[1]]
    assert inside.min() >= 0.0 and inside.max() <= 1.0
    # Diagonal and off-diagonal each reach 0 and 1 across the training set (separate ranges).
    back = norm.denormalize_tensor(normalised, params, masks[1])
    np.testing.assert_allclose(back[masks[1]], tensors[1][masks[1]], rtol=0, atol=1e-18)
    assert np.all(back[~masks[1]] == 0.0)
    # float32 (the network's dtype) round trip: within float32 resolution of the range.
    back32 = norm.denormalize_tensor(norm.normalize_tensor(tensors[1], params, masks[1]), params, masks[1])
    span = params.tensor_diagonal.high - params.tensor_diagonal.low
    np.testing.assert_allclose(back32[masks[1]], tensors[1][masks[1]], rtol=0, atol=1e-6 * span)


def test_diagonal_and_offdiagonal_use_their_own_ranges():
    params = norm.Normalization(tensor_diagonal=norm.Range(0.0, 3e-3), tensor_offdiagonal=norm.Range(-1e-3, 1e-3))
    tensor = np.array([1.5e-3, 0.0, 0.5e-3, 3e-3, -1e-3, 0.0])[None, None, None]
    out = norm.normalize_tensor(tensor, params, dtype=np.float64)[0, 0, 0]
    np.testing.assert_allclose(out, [0.5, 0.5, 0.75, 1.0, 0.0, 0.0])


def test_bssfp_and_t1w_map_onto_unit_interval():
    rng = np.random.default_rng(2)
    mags = [rng.uniform(0, 500, (4, 4, 4, 12)) for _ in range(2)]
    phases = [rng.uniform(-np.pi, np.pi, (4, 4, 4, 12)) for _ in range(2)]
    params = norm.fit_normalization(magnitudes=mags, phases=phases)
    m, p = norm.normalize_bssfp(mags[0], phases[0], params)
    expected = (phases[0] - params.phase.low) / (params.phase.high - params.phase.low)
    np.testing.assert_allclose(p, expected, atol=1e-6)
    assert 0.0 <= m.min() and m.max() <= 1.0 and m.dtype == np.float32
    with pytest.raises(UsageError, match="t1w"):
        norm.normalize_t1w(mags[0][..., 0], params)


def test_dict_and_json_round_trip(tmp_path):
    tensors, t1ws, masks = _subjects()
    params = norm.fit_normalization(tensors=tensors, t1ws=t1ws, masks=masks, percentiles=(0.5, 99.5))
    assert norm.Normalization.from_dict(params.to_dict()) == params
    path = params.save(tmp_path / "normalization.json")
    assert norm.Normalization.load(path) == params
    with pytest.raises(UsageError, match="version"):
        norm.Normalization.from_dict({**params.to_dict(), "version": 99})
    with pytest.raises(MissingInputError, match="not found"):
        norm.Normalization.load(tmp_path / "missing.json")
    with pytest.raises(Exception):
        params.t1w = None  # frozen


def test_out_of_range_warning_fires_and_values_are_clipped(caplog):
    value_range = norm.Range(0.0, 10.0)
    volume = np.full((4, 4, 4), 5.0)
    volume[0] = 20.0  # 25 % of the voxels above the range
    with caplog.at_level(logging.WARNING, logger="bssfp2dt.preprocessing.normalization"):
        out = norm.apply_range(volume, value_range, warn_fraction=0.1, name="test T1w")
    assert any("test T1w" in r.message and "25.0%" in r.message for r in caplog.records)
    assert out.max() == 1.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bssfp2dt.preprocessing.normalization"):
        norm.apply_range(volume, value_range, warn_fraction=0.3)
        # Masked-out voxels do not count.
        mask = np.ones((4, 4, 4), bool)
        mask[0] = False
        norm.apply_range(volume, value_range, mask=mask, warn_fraction=0.0)
    assert not caplog.records


def test_bad_ranges_and_percentiles_raise():
    with pytest.raises(UsageError, match="low < high"):
        norm.Range(1.0, 1.0)
    with pytest.raises(UsageError, match="percentiles"):
        norm.fit_range([np.zeros((2, 2, 2))], percentiles=(50.0, 10.0))
    with pytest.raises(UsageError, match="no voxels"):
        norm.fit_range([np.zeros((2, 2, 2))], [np.zeros((2, 2, 2), bool)])
