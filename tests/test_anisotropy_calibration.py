"""Anisotropy calibration: the gain keeps eigenvectors and MD, and restores a hedged network's FA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bssfp2dt.dti.logeuclid import exp_tensor, log_tensor
from bssfp2dt.dti.maps import tensor_maps
from bssfp2dt.models.checkpoint import load_release_checkpoint, save_release_checkpoint
from bssfp2dt.models.generator import build_generator, scale_anisotropy
from bssfp2dt.training.calibration import calibrate_anisotropy, median_anisotropy_ratio

ROWS, COLS = (0, 0, 0, 1, 1, 2), (0, 1, 2, 1, 2, 2)


def random_tensors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 6) positive-definite tensors, mm^2/s."""
    a = np.random.default_rng(seed).standard_normal((n, 3, 3))
    return ((a @ a.transpose(0, 2, 1) + 0.2 * np.eye(3)) * 5e-4)[:, ROWS, COLS]


def maps_of(log6: np.ndarray) -> dict[str, np.ndarray]:
    tensors = exp_tensor(log6)
    return tensor_maps(tensors, np.ones(tensors.shape[:-1], dtype=bool))


def test_the_gain_keeps_eigenvectors_and_md_and_raises_fa():
    log6 = log_tensor(random_tensors(200))
    scaled = scale_anisotropy(torch.from_numpy(log6.T[None].copy()), 1.5)[0].T.numpy()
    before, after = maps_of(log6), maps_of(scaled)
    np.testing.assert_allclose(after["md"], before["md"], rtol=1e-10)
    np.testing.assert_allclose(np.abs((after["v1"] * before["v1"]).sum(-1)), 1.0, atol=1e-8)
    assert np.all(after["fa"] > before["fa"])
    np.testing.assert_allclose(scale_anisotropy(torch.from_numpy(log6.T[None].copy()), 1.0)[0].T.numpy(), log6,
                               atol=1e-12)


def test_median_ratio_recovers_a_known_shrink():
    target = log_tensor(random_tensors(500, seed=1))
    shrunk = scale_anisotropy(torch.from_numpy(target.T[None].copy()), 0.6)[0].T.numpy()
    assert median_anisotropy_ratio(target, shrunk) == pytest.approx(1 / 0.6, rel=1e-9)
    assert median_anisotropy_ratio(target[:0], shrunk[:0]) == 1.0


def _volume_pair(generator, gain: float) -> dict[str, torch.Tensor]:
    """A whole volume whose target is the generator's own output with its anisotropy times ``gain``."""
    torch.manual_seed(0)
    x = torch.rand(1, 6, 20, 18, 16)  # not multiples of 16: the calibration pads like inference
    padded = torch.nn.functional.pad(x, (0, 0, 0, 14, 0, 12))
    with torch.no_grad():
        output = generator(padded, "t1w")[:, :, :20, :18, :16]
    wm = torch.zeros(1, 1, 20, 18, 16)
    wm[..., 4:16, 4:14, 2:14] = 1.0
    return {"input": x[0], "target": scale_anisotropy(output, gain)[0], "mask": torch.ones(1, 20, 18, 16),
            "wm": wm[0]}


def test_calibration_restores_a_shrunk_anisotropy_and_lives_in_the_checkpoint(tmp_path):
    generator = build_generator("tiny", ["t1w"], norm="none", structure_scales=(1.0,), dropout=0.0).eval()
    volume = _volume_pair(generator, 1.8)
    factor = calibrate_anisotropy(generator, "t1w", [volume])
    assert factor == pytest.approx(1.8, rel=1e-4)
    path = save_release_checkpoint(tmp_path / "model.pt", generator, config={}, stage="direct", modality="t1w",
                                   normalization={})
    loaded, _ = load_release_checkpoint(path)
    padded = torch.nn.functional.pad(volume["input"][None], (0, 0, 0, 14, 0, 12))
    with torch.no_grad():
        output = loaded(padded, "t1w")[0, :, :20, :18, :16]
    torch.testing.assert_close(output, volume["target"], rtol=1e-4, atol=1e-5)


def test_a_gain_outside_the_limits_is_refused_and_old_checkpoints_load_with_gain_one(tmp_path):
    generator = build_generator("tiny", ["t1w"], norm="none", structure_scales=(1.0,), dropout=0.0).eval()
    assert calibrate_anisotropy(generator, "t1w", [_volume_pair(generator, 10.0)]) == 1.0
    assert float(generator.heads["t1w"].anisotropy_gain) == 1.0
    path = save_release_checkpoint(tmp_path / "model.pt", generator, config={}, stage="direct", modality="t1w",
                                   normalization={})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {key: value for key, value in payload["state_dict"].items() if "anisotropy_gain" not in key}
    torch.save(payload, path)
    loaded, _ = load_release_checkpoint(path)
    assert float(loaded.heads["t1w"].anisotropy_gain) == 1.0
