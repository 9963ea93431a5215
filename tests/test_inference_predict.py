"""Sliding-window inference and the device helper."""
import numpy as np
import pytest
import torch

from bssfp2dt.errors import UsageError
from bssfp2dt.inference.device import resolve_device
from bssfp2dt.inference.predict import predict_volume


@pytest.mark.parametrize("shape, patch, overlap", [((3, 40, 37, 29), 16, 0.5), ((2, 12, 20, 9), 16, 0.25),
                                                   ((1, 33, 33, 33), 32, 0.0)])
def test_identity_network_returns_the_input(shape, patch, overlap):
    """Gaussian blending is a normalised weighted mean, so an identity network reproduces the volume."""
    volume = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    predicted = predict_volume(lambda x: x, volume, patch_size=patch, overlap=overlap, batch_size=3)
    np.testing.assert_allclose(predicted, volume, atol=1e-5)


def test_prediction_is_zero_outside_the_mask_and_maps_channels():
    volume = np.ones((24, 20, 20, 20), dtype=np.float32)
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    network = torch.nn.Conv3d(24, 6, 1)
    predicted = predict_volume(network, volume, patch_size=16, mask=mask, out_channels=6)
    assert predicted.shape == (6, 20, 20, 20)
    assert np.all(predicted[:, ~mask] == 0)
    with torch.no_grad():
        expected = network(torch.ones(1, 24, 1, 1, 1))[0, :, 0, 0, 0].numpy()
    np.testing.assert_allclose(predicted[:, 10, 10, 10], expected, rtol=1e-5)


def test_wrong_channel_count_is_reported():
    with pytest.raises(ValueError, match="expected 6"):
        predict_volume(lambda x: x, np.zeros((2, 16, 16, 16), np.float32), patch_size=16, out_channels=6)


def test_device_helper():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError, match="not one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda:0")
