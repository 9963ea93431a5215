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


# ---------------------------------------------------------------- memory-sized batch
MIB = 2 ** 20


def test_activation_count_of_a_known_network_scales_with_the_patch_volume():
    """Conv (2 -> 4 channels) then a ReLU that is not in place: distinct tensors are the input (2 channels),
    the convolution's output (4) and the ReLU's output (4): 10 float32 values per voxel."""
    from bssfp2dt.inference.predict import patch_activation_bytes

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU())
    assert patch_activation_bytes(network, 2, patch_size=4, probe_size=4) == 10 * 4 ** 3 * 4
    assert patch_activation_bytes(network, 2, patch_size=16, probe_size=4) == 10 * 16 ** 3 * 4
    in_place = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(inplace=True))
    assert patch_activation_bytes(in_place, 2, patch_size=8, probe_size=4) == 6 * 8 ** 3 * 4


def test_activation_count_of_the_generator_scales_linearly_from_the_probe():
    """The tiny generator at 32^3 from a 16^3 probe: the count equals a direct 32^3 count and exceeds
    three full-resolution 24-channel tensors (input, head output and more)."""
    from bssfp2dt.inference.predict import patch_activation_bytes
    from bssfp2dt.models.generator import build_generator

    generator = build_generator("tiny", ["pc-bssfp"]).eval()

    def predictor(patches):
        return generator(patches, "pc-bssfp")

    scaled = patch_activation_bytes(predictor, 24, patch_size=32, probe_size=16)
    assert scaled == patch_activation_bytes(predictor, 24, patch_size=32, probe_size=32)
    assert scaled > 3 * 24 * 32 ** 3 * 4  # input, head output and more at 24 channels


@pytest.mark.parametrize("requested, patch, budget, expected", [
    (8, 100, 350, 3), (8, 100, 10_000, 8), (8, 100, 50, 1), (4, 100, None, 4), (1, 100, 10_000, 1)])
def test_sliding_window_batch_is_the_largest_that_fits(requested, patch, budget, expected):
    from bssfp2dt.inference.predict import sliding_window_batch

    assert sliding_window_batch(requested, patch, budget) == expected


def test_cpu_budget_is_mem_minus_resident_memory_minus_the_volume_buffers(monkeypatch):
    from bssfp2dt.inference import predict

    monkeypatch.setattr(predict, "resident_bytes", lambda: 300 * MIB)
    buffers = predict.sliding_window_buffer_bytes((24, 40, 50, 10), out_channels=6, patch_size=16)
    assert buffers == 4 * 40 * 50 * 16 * 13  # z padded to one patch; 6 + 1 accumulators, 6 returned
    assert predict.memory_budget_bytes(1000, torch.device("cpu"), buffers) == 700 * MIB - buffers
    assert predict.memory_budget_bytes(None, torch.device("cpu"), buffers) is None
    assert predict.memory_budget_bytes(200, torch.device("cpu"), buffers) == 0


def test_mem_bounds_the_batch_and_the_choice_is_logged(monkeypatch, caplog):
    from bssfp2dt.inference import predict

    network = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU())
    shape = (3, 20, 20, 20)
    per_patch = predict.patch_activation_bytes(network, 3, patch_size=16, probe_size=8)
    buffers = predict.sliding_window_buffer_bytes(shape, 4, 16)
    monkeypatch.setattr(predict, "resident_bytes", lambda: 100 * MIB - buffers - int(2.5 * per_patch))
    with caplog.at_level("INFO", logger="bssfp2dt.inference.predict"):
        batch = predict.choose_batch_size(network, shape, 4, requested=8, patch_size=16, probe_size=8, mem_mb=100,
                                          device=torch.device("cpu"))
    assert batch == 2
    assert "sliding-window batch 2 of --batch-size 8" in caplog.text
    assert predict.choose_batch_size(network, shape, 4, requested=8, patch_size=16, probe_size=8, mem_mb=None,
                                     device=torch.device("cpu")) == 8


# ---------------------------------------------------------------- CUDA out of memory
def _oom_fallback_case(fail_times: int, batch_size: int = 4):
    """``run`` predicts on the CPU with a 1x1x1 convolution; as 'cuda' it raises OutOfMemoryError the first
    ``fail_times`` calls. Returns (result, calls, volume, network)."""
    from bssfp2dt.inference.predict import predict_with_oom_fallback

    torch.manual_seed(0)
    network = torch.nn.Conv3d(3, 2, 1)
    volume = np.random.default_rng(1).standard_normal((3, 20, 18, 17)).astype(np.float32)
    calls = []

    def run(batch, device):
        calls.append((batch, device.type))

        def predictor(patches):
            if device.type == "cuda" and len(calls) <= fail_times:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return network(patches)

        return predict_volume(predictor, volume, patch_size=16, overlap=0.5, batch_size=batch)

    result = predict_with_oom_fallback(run, batch_size, torch.device("cuda"), cpu_batch_size=lambda: 3)
    return result, calls, volume, network


def test_gpu_oom_twice_halves_the_batch_then_falls_back_to_the_cpu(caplog):
    with caplog.at_level("INFO", logger="bssfp2dt.inference.predict"):
        result, calls, volume, network = _oom_fallback_case(fail_times=2)
    assert calls == [(4, "cuda"), (2, "cuda"), (3, "cpu")]
    with torch.no_grad():
        plain = predict_volume(network, volume, patch_size=16, overlap=0.5, batch_size=3)
    np.testing.assert_array_equal(result, plain)
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "on the CPU" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage() and warnings[0].exc_info is None


def test_gpu_oom_once_succeeds_at_half_the_batch_without_the_cpu(caplog):
    with caplog.at_level("INFO", logger="bssfp2dt.inference.predict"):
        _, calls, _, _ = _oom_fallback_case(fail_times=1, batch_size=5)
    assert calls == [(5, "cuda"), (2, "cuda")]
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_oom_on_the_cpu_and_other_errors_are_not_caught():
    from bssfp2dt.inference.predict import predict_with_oom_fallback

    def out_of_memory(batch, device):
        raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict_with_oom_fallback(out_of_memory, 2, torch.device("cpu"))

    def broken(batch, device):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        predict_with_oom_fallback(broken, 2, torch.device("cuda"))


# ---------------------------------------------------------------- whole-volume pass
def _conv_network(seed: int = 0, norm: bool = False) -> torch.nn.Module:
    """Two 3x3x3 convolutions (receptive-field radius 2 voxels) with a 2x down/up-sampling in between."""
    torch.manual_seed(seed)
    layers = [torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool3d(2),
              torch.nn.Upsample(scale_factor=2), torch.nn.Conv3d(4, 2, 3, padding=1)]
    if norm:
        layers.insert(1, torch.nn.InstanceNorm3d(4))
    return torch.nn.Sequential(*layers).eval()


def _interior(n: int, patch: int, stride: int, radius: int) -> np.ndarray:
    """Along one axis: positions at least ``radius`` from every inner window edge (MONAI's window starts:
    every ``stride``, the last one flush with the end); the volume's own ends are no inner edge."""
    starts = sorted(set(list(range(0, n - patch + 1, stride)) + [n - patch]))
    inside = np.ones(n, dtype=bool)
    for start in starts:
        for x in range(start, start + patch):
            near_low = x - start < radius and start > 0
            near_high = start + patch - 1 - x < radius and start + patch < n
            inside[x] &= not (near_low or near_high)
    return inside


def test_whole_volume_pass_agrees_with_sliding_windows_up_to_border_blending():
    """Where no window edge lies within the receptive field, every window sees what the whole volume sees, so
    the Gaussian-blended windows equal the single pass there; near inner window edges they differ by the zero
    padding each window adds (the border blending)."""
    from bssfp2dt.inference.predict import predict_whole

    network = _conv_network()
    volume = np.random.default_rng(1).standard_normal((3, 40, 40, 40)).astype(np.float32)
    whole = predict_whole(network, volume, multiple=2)
    windows = predict_volume(network, volume, patch_size=24, overlap=0.5)
    assert whole.shape == windows.shape == (2, 40, 40, 40)
    difference = np.abs(whole - windows)
    # Receptive field: 3x3x3 conv (1) + 2x pooling and up-sampling (2) + 3x3x3 conv (1).
    axis = _interior(40, 24, 12, radius=4)
    interior = axis[:, None, None] & axis[None, :, None] & axis[None, None, :]
    assert 0.05 < interior.mean() < 0.95
    assert difference[:, interior].max() < 1e-5
    assert difference[:, ~interior].max() > 1e-3  # the borders really are blended: the test can tell
    assert difference.max() < 0.5 * np.abs(whole).max()
    # With a point-wise network there are no borders at all: identical everywhere.
    pointwise = torch.nn.Conv3d(3, 2, 1).eval()
    np.testing.assert_allclose(predict_whole(pointwise, volume), predict_volume(pointwise, volume, patch_size=16),
                               atol=1e-5)


def test_predict_auto_picks_whole_volume_only_when_it_is_the_same_function_and_fits(caplog):
    import logging

    from bssfp2dt.inference.predict import extent_dependent_layers, predict_auto, predict_whole

    volume = np.random.default_rng(2).standard_normal((3, 20, 18, 16)).astype(np.float32)
    plain, normed = _conv_network(), _conv_network(norm=True)
    assert extent_dependent_layers(plain) == [] and extent_dependent_layers(normed) == ["1"]
    common = dict(multiple=2, probe_size=4, patch_size=16, overlap=0.5)
    with caplog.at_level(logging.INFO, logger="bssfp2dt.inference.predict"):
        result = predict_auto(plain, volume, network=plain, mem_mb=None, **common)
    assert "whole-volume pass" in caplog.text
    np.testing.assert_array_equal(result, predict_whole(plain, volume, multiple=2))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bssfp2dt.inference.predict"):
        tight = predict_auto(plain, volume, network=plain, mem_mb=1, **common)  # 1 MB: cannot fit
        normalised = predict_auto(normed, volume, network=normed, mem_mb=None, **common)
    assert caplog.text.count("sliding windows") == 2 and "own extent" in caplog.text
    np.testing.assert_array_equal(tight, predict_volume(plain, volume, patch_size=16, overlap=0.5))
    np.testing.assert_array_equal(normalised, predict_volume(normed, volume, patch_size=16, overlap=0.5))
