"""The azimuth-free recipe: the target turned about z to the prediction's azimuth, and the phase-cycle turn
that stands for a global off-resonance offset (checked against the simulator's steady-state signal)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from bssfp2dt.dti.logeuclid import log_tensor
from bssfp2dt.preprocessing.bssfp import interleave_channels, remove_global_phase
from bssfp2dt.simulation.signal import bssfp_steady_state, cylindrical_tensor
from bssfp2dt.training import data
from bssfp2dt.training.losses import TensorLoss, axis_azimuth, canonical_azimuth, turn_about_z
from bssfp2dt.training.recipes import RECIPES


def axis(inclination: float, azimuth: float) -> np.ndarray:
    return np.array([np.sin(inclination) * np.cos(azimuth), np.sin(inclination) * np.sin(azimuth),
                     np.cos(inclination)])


def log_cylinder(inclination: float, azimuth: float, fa: float = 0.7) -> torch.Tensor:
    """Log-tensor (1, 6, 1, 1, 1) of a cylinder with MD 0.8e-3 mm^2/s along the given axis (rad)."""
    tensor = cylindrical_tensor(0.8e-3, fa, axis(inclination, azimuth))
    return torch.tensor(log_tensor(tensor), dtype=torch.float64).reshape(1, 6, 1, 1, 1)


def test_turn_about_z_is_the_matrix_rotation():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 3))
    matrix = a + a.T
    angle = 0.7
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    expected = rotation @ matrix @ rotation.T
    six = torch.tensor(matrix[[0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]).reshape(1, 6, 1)
    turned = turn_about_z(six, torch.full((1, 1, 1), angle, dtype=torch.float64))
    np.testing.assert_allclose(turned.reshape(6).numpy(), expected[[0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]],
                               atol=1e-12)


def test_axis_azimuth_takes_the_axis_in_the_upper_hemisphere():
    assert abs(float(axis_azimuth(log_cylinder(0.6, 0.3))) - 0.3) < 1e-6
    # the same axis written with the opposite sign, below the xy plane: its azimuth is the upper one's
    tensor = cylindrical_tensor(0.8e-3, 0.7, -axis(0.6, 2.5))
    below = torch.tensor(log_tensor(tensor)).reshape(1, 6, 1, 1, 1)
    assert abs(float(axis_azimuth(below)) - 2.5) < 1e-6


def test_canonical_target_lies_at_azimuth_zero_and_keeps_its_angle_to_z():
    target = log_cylinder(0.6, 2.3)
    canonical = canonical_azimuth(target)
    torch.testing.assert_close(canonical, log_cylinder(0.6, 0.0), atol=1e-9, rtol=0)
    torch.testing.assert_close(canonical[:, 5], target[:, 5])  # zz: the angle to z stays
    torch.testing.assert_close(canonical[:, [0, 3, 5]].sum(1), target[:, [0, 3, 5]].sum(1))  # MD stays


def test_azimuth_free_loss_ignores_the_azimuth_but_not_the_angle_to_b0():
    mask = torch.ones(1, 1, 1, 1, 1)
    free, full = TensorLoss(azimuth_free=True), TensorLoss()
    target = log_cylinder(0.6, 2.0).float()
    canonical = log_cylinder(0.6, 0.0).float()  # the same angle to z at azimuth 0
    other_inclination = log_cylinder(1.2, 0.0).float()
    assert float(free(canonical, target, mask)["total"]) < 1e-6
    assert float(free(canonical, log_cylinder(0.6, -1.1).float(), mask)["total"]) < 1e-6
    assert float(full(canonical, target, mask)["total"]) > 0.3
    assert float(free(other_inclination, target, mask)["total"]) > 0.3


def test_the_azimuth_free_recipe_is_the_default_recipe_but_for_the_azimuth_and_the_cycle_turn():
    default, free = RECIPES["log-euclidean"], RECIPES["log-euclidean-azimuth-free"]
    assert free.azimuth_free and not default.azimuth_free
    assert free.augmentation == "phase-cycles" and free.cycle_profile and not default.cycle_profile
    differences = ("name", "azimuth_free", "augmentation", "cycle_profile")
    assert {k: v for k, v in vars(free).items() if k not in differences} == \
        {k: v for k, v in vars(default).items() if k not in differences}


@pytest.mark.parametrize("name, changed", [
    ("log-euclidean-profile", {"augmentation": "phase-cycles", "cycle_profile": True}),
    ("log-euclidean-input-shortcut", {"input_shortcut": True}),
])
def test_the_other_default_variants_change_only_what_they_say(name, changed):
    default, variant = vars(RECIPES["log-euclidean"]), vars(RECIPES[name])
    assert {k: v for k, v in variant.items() if v != default[k]} == {"name": name, **changed}


def preprocessed_cycles(df_hz: np.ndarray, tr: float = 4.8e-3, te: float = 2.4e-3, n: int = 12) -> np.ndarray:
    """Interleaved magnitude/phase (X, 2n) after the global-phase removal, for voxels of three tissues at
    off-resonances ``df_hz`` (X,)."""
    t1 = np.array([0.9, 1.4, 4.0])[np.arange(len(df_hz)) % 3]
    t2 = np.array([0.07, 0.09, 2.0])[np.arange(len(df_hz)) % 3]
    signal = bssfp_steady_state(t1, t2, tr, te, np.deg2rad(15.0), df_hz, 2 * np.pi * np.arange(n) / n)
    signal = remove_global_phase(signal[:, None, None, :])[:, 0, 0, :]
    return interleave_channels(np.abs(signal), np.angle(signal))


def test_phase_cycle_turn_is_a_global_off_resonance_offset():
    rng = np.random.default_rng(0)
    df = rng.uniform(-60.0, 60.0, 30)
    tr, n = 4.8e-3, 12
    original = preprocessed_cycles(df, tr=tr, n=n)
    for k in (1, 5):
        shifted = preprocessed_cycles(df + k / (n * tr), tr=tr, n=n)
        turned = np.roll(original, 2 * k, axis=-1)  # PhaseCycleTurn by C - k cycles
        np.testing.assert_allclose(np.abs(np.exp(1j * shifted[:, 1::2]) - np.exp(1j * turned[:, 1::2])), 0,
                                   atol=1e-9)
        np.testing.assert_allclose(shifted[:, 0::2], turned[:, 0::2], rtol=1e-9)


def test_phase_cycle_turn_moves_magnitude_phase_pairs_together_and_only_for_pc_bssfp():
    channels = torch.arange(24, dtype=torch.float32).reshape(24, 1, 1, 1).expand(24, 4, 4, 4).clone()
    subject = tio.Subject(input=tio.ScalarImage(tensor=channels.clone()),
                          target=tio.ScalarImage(tensor=torch.zeros(6, 4, 4, 4)))
    torch.manual_seed(1)
    turned = data.PhaseCycleTurn("pc-bssfp")(subject)["input"].data[:, 0, 0, 0]
    shift = int(turned[0]) // 2
    assert shift != 0
    expected = torch.roll(torch.arange(24, dtype=torch.float32), -2 * shift)
    torch.testing.assert_close(turned, expected)
    for modality in ("bssfp", "t1w"):  # one repeated cycle: nothing to turn; T1w: no cycles
        size = 24 if modality == "bssfp" else 6
        plain = tio.Subject(input=tio.ScalarImage(tensor=channels[:size].clone()))
        torch.testing.assert_close(data.PhaseCycleTurn(modality)(plain)["input"].data, channels[:size])


# --------------------------------------------------------------------------- phase-cycle profile features
def normalised_channels(signal: np.ndarray, magnitude_high: float = 3000.0) -> torch.Tensor:
    """Complex cycles (N, C) -> interleaved channels (1, 2C, N, 1, 1) normalised as the app does: magnitude
    [0, ``magnitude_high``] and phase [-pi, pi] onto [0, 1]."""
    channels = interleave_channels(np.abs(signal) / magnitude_high, (np.angle(signal) + np.pi) / (2 * np.pi))
    return torch.tensor(channels.T[None, :, :, None, None], dtype=torch.float64)


def profile_module(magnitude_high: float = 3000.0):
    from bssfp2dt.models.generator import PhaseCycleProfile

    module = PhaseCycleProfile(24).double()
    module.magnitude_range.copy_(torch.tensor([0.0, magnitude_high]))
    return module


def profile_reference(signal: np.ndarray) -> np.ndarray:
    """numpy version of the profile features (N, 29) of complex cycles (N, 12), without the level channel."""
    modes = np.fft.fft(signal, axis=-1)
    zero = modes[:, :1]
    cross = modes[:, 1:6] * modes[:, [11, 10, 9, 8, 7]] / zero ** 2
    chain = modes[:, 2:6] * np.conj(modes[:, 1:5]) * np.conj(modes[:, 1:2]) * zero / np.abs(zero) ** 4
    return np.concatenate([np.log(np.abs(modes[:, 1:]) / np.abs(zero) + 1e-6), cross.real, cross.imag,
                           chain.real, chain.imag], axis=1)


def test_cycle_profile_is_free_of_gain_common_phase_and_cycle_turns():
    rng = np.random.default_rng(5)
    df = rng.uniform(-80, 80, 40)
    signal = 900.0 * bssfp_steady_state(1.0, 0.08, 4.8e-3, 2.4e-3, np.deg2rad(15.0), df,
                                        2 * np.pi * np.arange(12) / 12)
    module = profile_module()
    assert module.out_channels == 30
    features = module(normalised_channels(signal))[0, :, :, 0, 0].T.numpy()  # (N, 30)
    np.testing.assert_allclose(features[:, :29], profile_reference(signal), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features[:, 29], np.log(np.abs(signal).mean(axis=1) / 3000.0 + 1e-3), rtol=1e-5)
    # another gain, transmit/receive phase and a turn by 5 cycles: the shape is the same, only the level moves
    other = np.roll(signal, 5, axis=1) * 0.6 * np.exp(1j * rng.uniform(-3, 3, (40, 1)))
    changed = module(normalised_channels(other))[0, :, :, 0, 0].T.numpy()
    np.testing.assert_allclose(changed[:, :29], features[:, :29], atol=2e-4)
    assert np.all(changed[:, 29] < features[:, 29])
    # and the shape tells tissues apart: another T2 gives other features
    grey = 900.0 * bssfp_steady_state(1.4, 0.05, 4.8e-3, 2.4e-3, np.deg2rad(15.0), df, 2 * np.pi * np.arange(12) / 12)
    assert np.abs(module(normalised_channels(grey))[0, :29, :, 0, 0].T.numpy() - features[:, :29]).max() > 0.05


def test_only_the_phase_cycled_head_gets_the_profile_and_checkpoints_keep_it(tmp_path):
    from bssfp2dt.models.checkpoint import load_release_checkpoint, save_release_checkpoint
    from bssfp2dt.models.generator import build_generator
    from bssfp2dt.preprocessing.normalization import Normalization, Range

    generator = build_generator("tiny", ["pc-bssfp", "bssfp", "t1w"], norm="none", cycle_profile=True)
    assert generator.heads["pc-bssfp"].profile is not None
    assert generator.heads["bssfp"].profile is None and generator.heads["t1w"].profile is None
    generator.set_input_ranges(Normalization(magnitude=Range(0.5, 4000.0), phase=Range(-3.1, 3.1)))
    path = save_release_checkpoint(tmp_path / "m.pt", generator, config={}, stage="direct", modality="pc-bssfp",
                                   normalization={})
    loaded, metadata = load_release_checkpoint(path)
    assert metadata.size.cycle_profile
    torch.testing.assert_close(loaded.heads["pc-bssfp"].profile.magnitude_range, torch.tensor([0.5, 4000.0]))
    torch.testing.assert_close(loaded.heads["pc-bssfp"].profile.phase_range, torch.tensor([-3.1, 3.1]))
    x = torch.rand(1, 24, 16, 16, 16)
    torch.testing.assert_close(loaded(x, "pc-bssfp"), generator.eval()(x, "pc-bssfp"))


def test_voxel_map_start_fits_a_non_linear_profile_map_and_the_head_reproduces_it():
    from bssfp2dt.models.generator import InputHead
    from bssfp2dt.training.initialisation import _fit_voxel_map

    head = InputHead(24, 4, normalise=False, cycle_profile=True)
    rng = np.random.default_rng(0)
    design = rng.normal(2.0, 3.0, (4000, head.profile.out_channels))  # the profile part: the last columns
    z = (design - 2.0) / 3.0
    residual = np.stack([np.tanh(z[:, 0]) * z[:, 1], z[:, 2] ** 2 - 1, np.abs(z[:, 3]) - 0.8, z[:, 4] * 0,
                         np.maximum(z[:, 5], 0) - 0.4, z[:, 0] * z[:, 2]], axis=1)
    weights = np.ones(len(design))
    fitted = _fit_voxel_map(head, design, residual, weights, seed=0)
    explained = 1.0 - ((residual - fitted) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    assert explained > 0.8  # no linear map could do this: every column is a non-linear function
    linear = np.linalg.lstsq(np.c_[design, np.ones(len(design))], residual, rcond=None)[0]
    linear_explained = 1.0 - ((residual - np.c_[design, np.ones(len(design))] @ linear) ** 2).sum() \
        / ((residual - residual.mean(0)) ** 2).sum()
    assert explained > linear_explained + 0.3
    with torch.no_grad():
        auxiliary = torch.from_numpy(design.T[None, :, :, None, None].astype(np.float32))
        through_head = head.voxel_map(head.standardised_profile(auxiliary))[0, :, :, 0, 0].T.numpy()
    np.testing.assert_allclose(through_head, fitted, atol=1e-4)


def test_fitted_profile_features_are_clipped_to_their_training_range_and_old_maps_are_not():
    from bssfp2dt.models.generator import PROFILE_BOUND, InputHead

    head = InputHead(24, 4, normalise=False, cycle_profile=True)
    count = head.profile.out_channels
    profile = torch.zeros(1, count, 2, 1, 1)
    profile[0, 0, 0] = 1e6  # a shape channel far outside the fitted range (a dark band, the brain's edge)
    profile[0, -1, 0] = 50.0  # the level channel is never clipped
    assert torch.equal(head.bounded_profile(profile), profile)  # nothing fitted yet: untouched
    with torch.no_grad():
        head.profile_mean.fill_(1.0)
        head.profile_scale.fill_(2.0)
        head.profile_bounded.fill_(True)
    bounded = head.bounded_profile(profile)
    assert bounded[0, 0, 0].item() == pytest.approx(1.0 + 2.0 * PROFILE_BOUND)
    assert bounded[0, -1, 0].item() == 50.0 and torch.equal(bounded[:, :, 1], profile[:, :, 1])
    state = {k: v for k, v in head.state_dict().items() if k != "profile_bounded"}  # a map saved before the bound
    fresh = InputHead(24, 4, normalise=False, cycle_profile=True)
    fresh.load_state_dict(state)
    assert not bool(fresh.profile_bounded)
