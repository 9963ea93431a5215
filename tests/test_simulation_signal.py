"""Signal equations of the simulator against independent references (the `ssfp` package, dipy,
brute-force time stepping, closed forms)."""
import itertools

import numpy as np
import pytest
import ssfp
from scipy.optimize import minimize_scalar
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, fractional_anisotropy, mean_diffusivity

from bssfp2dt.dti.eigen import bep016_to_matrix
from bssfp2dt.dti.fit import dwi_signal
from bssfp2dt.simulation.signal import (FibreModel, Mp2rageProtocol, bssfp_steady_state, cylindrical_tensor,
                                        mp2rage_inversions, mp2rage_uni, white_matter_bssfp)
from bssfp2dt.simulation.subject import Protocol, gradient_scheme

TR, TE = 4.8e-3, 2.4e-3
CYCLES = 2 * np.pi * np.arange(12) / 12


def test_bssfp_matches_ssfp_package_over_a_parameter_grid():
    worst = 0.0
    for t1, t2, flip_deg, df in itertools.product((0.3, 0.9, 1.6, 4.2), (0.015, 0.075, 0.11, 1.8),
                                                  (5, 15, 35, 60), (-150.0, -17.4, 0.0, 3.3, 95.0)):
        if t2 > t1:
            continue
        flip = np.deg2rad(flip_deg)
        ours = bssfp_steady_state(t1, t2, TR, TR / 2, flip, df, CYCLES)
        reference = -ssfp.bssfp(t1, t2, TR, flip, field_map=-df, phase_cyc=CYCLES)
        worst = max(worst, np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
    assert worst <= 1e-6


def test_te_factor_uses_physical_off_resonance_only():
    """Moving TE multiplies every cycle by the same exp(i 2 pi df dTE - dTE/T2)."""
    a = bssfp_steady_state(1.0, 0.08, TR, TE, 0.26, 7.0, CYCLES)
    b = bssfp_steady_state(1.0, 0.08, TR, TE + 1e-3, 0.26, 7.0, CYCLES)
    expected = np.exp(1j * 2 * np.pi * 7.0 * 1e-3 - 1e-3 / 0.08)
    np.testing.assert_allclose(b / a, expected, rtol=1e-12)


def _symmetry_error(profile):
    """|| |S(dphi)| - |S(-dphi)| || / || S || for a profile sampled on a periodic grid around 0."""
    magnitude = np.abs(profile)
    mirrored = np.roll(magnitude[::-1], 1)  # index i <-> -i
    return np.linalg.norm(magnitude - mirrored) / np.linalg.norm(profile)


def test_single_pool_profile_is_symmetric():
    increments = np.linspace(-np.pi, np.pi, 361)[:-1]
    profile = bssfp_steady_state(1.0, 0.08, TR, TE, np.deg2rad(15), 0.0, increments)
    assert _symmetry_error(profile) < 1e-12


def _wm_profile(theta_deg, gain, df_b0=0.0):
    sin2 = np.array([np.sin(np.deg2rad(theta_deg)) ** 2])
    return white_matter_bssfp(sin2, np.array([0.7]), np.array([df_b0]), TR, TE, np.deg2rad(15), CYCLES, 3.0,
                              orientation_gain=gain)[0]


def _orientation_residual(theta_deg, gain):
    """The part of the 12-cycle profile change from fibre angle 0 to ``theta_deg`` that no global B0 shift
    (and no complex scale) can mimic, relative to the signal norm (physics.md section 4)."""
    reference = _wm_profile(0.0, gain)

    def residual(df_b0):
        shifted = _wm_profile(theta_deg, gain, df_b0)
        scale = np.vdot(shifted, reference) / np.vdot(shifted, shifted)
        return np.linalg.norm(scale * shifted - reference) / np.linalg.norm(reference)

    return minimize_scalar(residual, bounds=(-20, 20), method="bounded", options={"xatol": 1e-7}).fun


def test_orientation_effect_matches_physics_reference_values():
    """physics.md: 0% at 0 deg, 0.45% at 54.7 deg and 0.81% at 90 deg of the signal norm (DOVE settings)."""
    assert _orientation_residual(0.0, 1.0) < 1e-6
    assert _orientation_residual(54.7, 1.0) == pytest.approx(0.0045, abs=0.0003)
    assert _orientation_residual(90.0, 1.0) == pytest.approx(0.0081, abs=0.0005)


def test_orientation_effect_grows_with_fibre_angle():
    residuals = [_orientation_residual(theta, 1.0) for theta in range(0, 91, 15)]
    assert np.all(np.diff(residuals) > 0)


def test_profile_asymmetry_grows_with_fibre_angle_beyond_the_myelin_offset():
    """Without B0, the magnitude profile's asymmetry rises with the angle once the angle-dependent
    shifts dominate the small angle-independent myelin offset (from ~30 deg on)."""
    errors = [_symmetry_error(_wm_profile(theta, 1.0)) for theta in range(30, 91, 10)]
    assert np.all(np.diff(errors) > 0)


def test_orientation_effect_scales_with_orientation_gain():
    for theta in (45.0, 90.0):
        residuals = [_orientation_residual(theta, gain) for gain in (0.0, 1.0, 2.0, 4.0)]
        assert residuals[0] < 1e-9  # no shifts, no orientation effect
        assert np.all(np.diff(residuals) > 0)
        assert residuals[2] >= 2.0 * residuals[1]  # at least proportional to the gain


def test_frequency_shifts_match_the_closed_form_at_3t():
    """physics.md: at 3 T with the defaults, df_M = 0.43 + 8.59 sin^2 Hz and df_A = -2.14 sin^2 Hz."""
    sin2 = np.array([0.0, 0.5, 1.0])
    df_myelin, df_axon = FibreModel().frequency_shifts(sin2, 3.0)
    np.testing.assert_allclose(df_myelin, 0.4258 + 8.590 * sin2, atol=0.01)
    np.testing.assert_allclose(df_axon, -2.138 * sin2, atol=0.01)


def test_noiseless_dwi_fit_by_dipy_returns_the_input_tensor():
    rng = np.random.default_rng(3)
    bvals, bvecs = gradient_scheme(rng, Protocol())
    v1 = rng.standard_normal((200, 3))
    v1 /= np.linalg.norm(v1, axis=1, keepdims=True)
    tensors = cylindrical_tensor(rng.uniform(0.6e-3, 3e-3, 200), rng.uniform(0, 0.9, 200), v1)
    signal = dwi_signal(tensors, np.full(200, 1000.0), np.asarray(bvals), bvecs)
    fit = TensorModel(gradient_table(np.asarray(bvals), bvecs=bvecs), fit_method="WLS").fit(signal)
    lower = fit.lower_triangular()  # dipy: Dxx, Dxy, Dyy, Dxz, Dyz, Dzz
    dipy_as_bep016 = lower[:, [0, 1, 3, 2, 4, 5]]
    error = np.linalg.norm(dipy_as_bep016 - tensors, axis=1) / np.linalg.norm(tensors, axis=1)
    assert error.max() <= 1e-6


def test_cylindrical_tensor_has_the_requested_fa_and_md():
    rng = np.random.default_rng(4)
    v1 = rng.standard_normal((50, 3))
    v1 /= np.linalg.norm(v1, axis=1, keepdims=True)
    fa, md = rng.uniform(0, 0.95, 50), rng.uniform(0.5e-3, 3e-3, 50)
    tensors = cylindrical_tensor(md, fa, v1)
    evals = np.linalg.eigvalsh(bep016_to_matrix(tensors))
    np.testing.assert_allclose(fractional_anisotropy(evals), fa, atol=1e-9)
    np.testing.assert_allclose(mean_diffusivity(evals), md, rtol=1e-12)
    principal = np.linalg.eigh(bep016_to_matrix(tensors))[1][:, :, 2]
    assert np.all(np.abs(np.sum(principal * v1, axis=1))[fa > 0.01] > 1 - 1e-9)


def _mp2rage_by_time_stepping(t1, protocol, repetitions=60):
    """Brute force: step Mz through every event of many repetitions; read the block-centre signals."""
    p = protocol
    n, half = p.readouts_per_block, p.readouts_per_block // 2
    flips = (np.deg2rad(p.flip1_deg), np.deg2rad(p.flip2_deg))
    starts = (p.ti1 - half * p.readout_tr, p.ti2 - half * p.readout_tr)
    mz, signals = 1.0, [0.0, 0.0]

    def relax(m, dt):
        return 1.0 - (1.0 - m) * np.exp(-dt / t1)

    for _ in range(repetitions):
        mz = -p.inversion_efficiency * mz
        clock = 0.0
        for block, (start, flip) in enumerate(zip(starts, flips)):
            mz = relax(mz, start - clock)
            clock = start
            for pulse in range(n):
                if pulse == half:
                    signals[block] = np.sin(flip) * mz
                mz = relax(mz * np.cos(flip), p.readout_tr)
                clock += p.readout_tr
        mz = relax(mz, p.tr - clock)
    return signals


@pytest.mark.parametrize("t1", [0.8, 1.5, 4.2])
def test_mp2rage_steady_state_matches_time_stepping(t1):
    protocol = Mp2rageProtocol()
    inv1, inv2 = mp2rage_inversions(np.array(t1), protocol=protocol)
    reference = _mp2rage_by_time_stepping(t1, protocol)
    np.testing.assert_allclose([inv1, inv2], reference, rtol=1e-9, atol=1e-12)


def test_mp2rage_uni_decreases_with_t1():
    t1 = np.linspace(0.5, 4.5, 50)
    uni = mp2rage_uni(*mp2rage_inversions(t1))
    assert np.all(np.diff(uni) < 0)
    assert uni.max() <= 0.5 and uni.min() >= -0.5
