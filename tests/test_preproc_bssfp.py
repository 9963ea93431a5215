"""bSSFP preprocessing: phase rescale, global phase removal, Gibbs removal, channel layout."""
from __future__ import annotations

import numpy as np
import pytest

from bssfp2dt.errors import UsageError
from bssfp2dt.preprocessing import bssfp


def test_rescale_phase_endpoints_and_linearity():
    q = np.arange(0, 4096)
    phi = bssfp.rescale_phase(q)
    assert phi[0] == pytest.approx(-np.pi, abs=1e-12)
    assert phi[-1] == pytest.approx(np.pi - 2 * np.pi / 4096, abs=1e-12)
    assert phi[-1] < np.pi
    # Linear with the closed-form step 2 pi / 4096.
    np.testing.assert_allclose(np.diff(phi), 2 * np.pi / 4096, rtol=0, atol=1e-12)
    assert np.all((phi >= -np.pi) & (phi < np.pi))


def test_rescale_phase_radians_is_noop_and_bad_units_raise():
    phi = np.random.default_rng(0).uniform(-np.pi, np.pi, (4, 4, 4, 12))
    np.testing.assert_array_equal(bssfp.rescale_phase(phi, units="rad"), phi)
    with pytest.raises(UsageError, match="units"):
        bssfp.rescale_phase(phi, units="degrees")


def test_to_complex_matches_polar_form():
    rng = np.random.default_rng(1)
    mag = rng.uniform(0, 10, (3, 3, 3, 12))
    phase = rng.uniform(-np.pi, np.pi, mag.shape)
    z = bssfp.to_complex(mag, phase)
    np.testing.assert_allclose(np.abs(z), mag, atol=1e-12)
    np.testing.assert_allclose(np.angle(z), phase, atol=1e-12)


@pytest.mark.parametrize("use_mask", [False, True])
def test_remove_global_phase_zeroes_every_cycle_sum(use_mask):
    rng = np.random.default_rng(2)
    shape = (8, 9, 7)
    spatial = np.linspace(0, 1.5, np.prod(shape)).reshape(shape)  # smooth spatial phase pattern
    offsets = rng.uniform(-np.pi, np.pi, 12)                       # per-cycle global offsets
    mag = rng.uniform(0.5, 2.0, shape + (12,))
    signal = mag * np.exp(1j * (spatial[..., None] + offsets))
    mask = (rng.uniform(size=shape) > 0.3) if use_mask else None
    out = bssfp.remove_global_phase(signal, mask)
    sums = out[mask].sum(axis=0) if use_mask else out.reshape(-1, 12).sum(axis=0)
    np.testing.assert_allclose(np.angle(sums), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.abs(out), mag, atol=1e-12)
    # Only a constant per cycle was removed: phase differences between voxels are unchanged.
    diff_in = np.angle(signal[1:] * np.conj(signal[:-1]))
    diff_out = np.angle(out[1:] * np.conj(out[:-1]))
    np.testing.assert_allclose(diff_out, diff_in, atol=1e-9)


def _ringing_step(n=64, upsample=4, phase=0.7):
    """A sharp step acquired with only ``n`` k-space samples along x (truncation -> Gibbs ringing).

    The step is drawn on a grid ``upsample`` times finer (edge off the voxel centres), then only
    the central ``n`` frequencies are kept and reconstructed on the ``n``-voxel grid, as a scanner
    does, so the ringing has the acquired resolution that the sub-voxel-shift method assumes.
    """
    fine = n * upsample
    step = np.zeros((fine, 16, 2))
    step[fine // 4 + 3: 3 * fine // 4 + 3] = 1.0
    k = np.fft.fftshift(np.fft.fft(step, axis=0), axes=0)
    acquired = k[fine // 2 - n // 2: fine // 2 + n // 2]
    image = np.fft.ifft(np.fft.ifftshift(acquired, axes=0), axis=0).real / upsample
    return image * np.exp(1j * phase)


def _overshoot(magnitude):
    """Peak above the plateau (1.0) plus the dip below zero, in units of the step height."""
    profile = magnitude[:, 8, 0]
    return (profile.max() - 1.0) + max(0.0, -profile.min())


@pytest.mark.parametrize("mode", ["complex", "magnitude"])
def test_gibbs_removal_reduces_overshoot_of_truncated_step(mode):
    ringing = _ringing_step()
    before = _overshoot(np.abs(ringing))
    assert before > 0.03  # the truncation really rings at the sampled points
    corrected = bssfp.remove_gibbs(ringing, mode=mode)
    after = _overshoot(np.abs(corrected))
    assert after < 0.5 * before
    # The global phase (0.7 rad) survives the correction where the signal is.
    inside = np.abs(corrected) > 0.5
    np.testing.assert_allclose(np.angle(corrected[inside]), 0.7, atol=1e-6)
    # The plateau and the background keep their levels (no blurring into a different image).
    profile = np.abs(corrected)[:, 8, 0]
    assert profile[32] == pytest.approx(1.0, abs=0.02) and profile[2] == pytest.approx(0.0, abs=0.02)


def test_gibbs_removal_on_4d_real_keeps_shape():
    ringing = np.repeat(_ringing_step().real[..., None], 3, axis=-1)
    out = bssfp.remove_gibbs(ringing)
    assert out.shape == ringing.shape and not np.iscomplexobj(out)
    assert _overshoot(out[..., 1]) < 0.5 * _overshoot(ringing[..., 1])


def test_interleave_order_and_inverse():
    mag = np.arange(2 * 12).reshape(1, 1, 2, 12).astype(float)
    phase = -mag
    channels = bssfp.interleave_channels(mag, phase)
    assert channels.shape == (1, 1, 2, 24)
    np.testing.assert_array_equal(channels[0, 0, 1, :4], [12, -12, 13, -13])
    m, p = bssfp.deinterleave_channels(channels)
    np.testing.assert_array_equal(m, mag)
    np.testing.assert_array_equal(p, phase)


def test_single_bssfp_repeats_first_cycle():
    cycles = np.random.default_rng(3).normal(size=(2, 3, 4, 12))
    single = bssfp.single_bssfp(cycles)
    assert single.shape == cycles.shape
    for k in range(12):
        np.testing.assert_array_equal(single[..., k], cycles[..., 0])


def test_prepare_bssfp_chain(tmp_path):
    """The bSSFP step before registration: scanner phase rescaled, complex, each cycle's global phase removed."""
    from bssfp2dt.io.nifti import load_nifti, save_nifti
    from bssfp2dt.preprocessing.steps import PreprocSettings, prepare_bssfp

    rng = np.random.default_rng(4)
    mag = rng.uniform(1, 2, (6, 6, 4, 12))
    q = rng.integers(0, 4096, mag.shape)
    magnitude = save_nifti(mag, np.eye(4), tmp_path / "mag.nii.gz", dtype=np.float32)
    phase = save_nifti(q, np.eye(4), tmp_path / "phase.nii.gz", dtype=np.uint16)
    complex_path, _, record = prepare_bssfp(str(magnitude), str(phase), "arbitrary",
                                            PreprocSettings(gibbs=False).node_options(), str(tmp_path))
    out = load_nifti(complex_path)[0]
    np.testing.assert_allclose(np.abs(out), mag, rtol=1e-6)
    np.testing.assert_allclose(np.angle(out.reshape(-1, 12).sum(axis=0)), 0, atol=1e-5)
    assert len(record["global_phases_rad"]) == 12
