"""The log-euclidean training recipe: target coordinates, loss, network options, augmentation, sampling,
structure-tensor features, the anatomy baseline, and the one network-input function of training and inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.linalg import expm, logm

from bssfp2dt.dti.logeuclid import LOG_SCALE, exp_tensor, log_tensor
from bssfp2dt.dti.maps import tensor_maps
from bssfp2dt.evaluation import baselines
from bssfp2dt.models.generator import StructureTensorFeatures, build_generator, gaussian_smooth
from bssfp2dt.preprocessing import normalization as norm
from bssfp2dt.training import data
from bssfp2dt.training.losses import TensorLoss, deviatoric_norm, log_tensor_errors
from bssfp2dt.training.module import Bssfp2dtGAN
from bssfp2dt.training.recipes import RECIPES

from helpers import synthetic_subject

ROWS, COLS = (0, 0, 0, 1, 1, 2), (0, 1, 2, 1, 2, 2)


def random_tensors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 3, 3))
    return ((a @ a.transpose(0, 2, 1) + 0.2 * np.eye(3)) * 5e-4)[:, ROWS, COLS]


def cylinder(axis, axial=1.7e-3, radial=0.4e-3) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    matrix = radial * np.eye(3) + (axial - radial) * np.outer(axis, axis)
    return matrix[ROWS, COLS]


# --------------------------------------------------------------------------- target coordinates
def test_log_tensor_is_the_deviatoric_matrix_logarithm_plus_log_md_and_inverts():
    tensors = random_tensors(50)
    logs = log_tensor(tensors)
    for six, log6 in zip(tensors[:5], logs[:5]):
        matrix = np.array(six)[[0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(3, 3)
        reference = np.real(logm(matrix / LOG_SCALE))
        reference += (np.log(np.trace(matrix) / 3 / LOG_SCALE) - np.trace(reference) / 3) * np.eye(3)
        np.testing.assert_allclose(log6, reference[ROWS, COLS], atol=1e-10)
        # The inverse: the shape expm(deviatoric) scaled so that the mean eigenvalue is exp(tr / 3).
        shape = expm(reference - np.trace(reference) / 3 * np.eye(3))
        expected = LOG_SCALE * np.exp(np.trace(reference) / 3) * shape / (np.trace(shape) / 3)
        np.testing.assert_allclose(expected[ROWS, COLS], exp_tensor(log6), rtol=1e-10)
    np.testing.assert_allclose(exp_tensor(logs), tensors, rtol=1e-9, atol=1e-15)


def test_log_coordinates_hold_md_on_the_trace_whatever_the_anisotropy():
    """An isotropic guess with the right trace has the right MD: hedging the shape does not bias MD."""
    logs = log_tensor(cylinder((0, 0, 1))[None])[0]
    trace = logs[[0, 3, 5]].sum()
    isotropic = exp_tensor(np.array([trace / 3, 0, 0, trace / 3, 0, trace / 3]))
    np.testing.assert_allclose(isotropic[[0, 3, 5]].mean(), cylinder((0, 0, 1))[[0, 3, 5]].mean(), rtol=1e-12)


def test_log_coordinates_keep_zero_outside_the_brain_and_map_the_scale_tensor_to_zero():
    tensors = np.stack([cylinder((1, 0, 0)), LOG_SCALE * np.array([1, 0, 0, 1, 0, 1.0]), np.zeros(6)])[None, None]
    mask = np.array([[[True, True, False]]])
    params = norm.Normalization(tensor_transform="log")
    values = norm.normalize_tensor(tensors, params, mask)
    np.testing.assert_array_equal(values[0, 0, 1], 0.0)  # the scale tensor itself
    np.testing.assert_array_equal(values[0, 0, 2], 0.0)  # outside the mask
    back = norm.denormalize_tensor(values, params, mask)
    np.testing.assert_allclose(back[0, 0, :2], tensors[0, 0, :2], rtol=1e-6)
    np.testing.assert_array_equal(back[0, 0, 2], 0.0)
    assert norm.Normalization.from_dict(params.to_dict()).tensor_transform == "log"
    assert norm.Normalization.from_dict({**params.to_dict(), "tensor_transform": None} | {"tensor_transform": "minmax"})


def test_minmax_checkpoints_without_a_transform_field_still_read_as_minmax():
    payload = norm.Normalization(tensor_diagonal=norm.Range(0, 1e-3)).to_dict()
    del payload["tensor_transform"]
    assert norm.Normalization.from_dict(payload).tensor_transform == "minmax"


# --------------------------------------------------------------------------- loss and metrics
def _log_volume(six: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.broadcast_to(log_tensor(six), (2, 2, 2, 6)).copy()).permute(3, 0, 1, 2)[None].float()


def test_the_loss_prefers_the_right_anisotropic_tensor_to_an_isotropic_one_with_the_same_md():
    target = cylinder((0, 0, 1))
    md = target[[0, 3, 5]].mean()
    isotropic = md * np.array([1, 0, 0, 1, 0, 1.0])
    wrong_axis = cylinder((1, 0, 0))
    ones = torch.ones(1, 1, 2, 2, 2)
    loss = TensorLoss()
    right = loss(_log_volume(target), _log_volume(target), ones, ones)["total"]
    hedge = loss(_log_volume(isotropic), _log_volume(target), ones, ones)
    crossed = loss(_log_volume(wrong_axis), _log_volume(target), ones, ones)
    assert float(right) == pytest.approx(0.0, abs=1e-6)
    assert float(hedge["total"]) > 0.0
    assert float(hedge["anisotropy"]) > 0.0 and float(crossed["anisotropy"]) == pytest.approx(0.0, abs=1e-6)
    # Outside the mask nothing counts.
    assert float(loss(_log_volume(isotropic), _log_volume(target), 0 * ones, ones)["total"]) == 0.0


def test_deviatoric_norm_is_zero_for_isotropic_tensors_and_rotation_invariant():
    iso = _log_volume(1e-3 * np.array([2, 0, 0, 2, 0, 2.0]))
    assert float(deviatoric_norm(iso).max()) < 1e-5
    a, b = deviatoric_norm(_log_volume(cylinder((1, 0, 0)))), deviatoric_norm(_log_volume(cylinder((1, 1, 1))))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_log_tensor_errors_agree_with_the_numpy_tensor_maps():
    rng = np.random.default_rng(3)
    prediction, target = random_tensors(64, 1), random_tensors(64, 2)
    def as_volume(six):
        return torch.from_numpy(log_tensor(six).reshape(4, 4, 4, 6)).permute(3, 0, 1, 2)[None]
    errors = log_tensor_errors(as_volume(prediction), as_volume(target), torch.ones(1, 1, 4, 4, 4))
    maps_p, maps_t = tensor_maps(prediction), tensor_maps(target)
    cosine = np.abs((maps_p["v1"] * maps_t["v1"]).sum(-1)).clip(max=1)
    assert float(errors["v1_angle"]) == pytest.approx(np.median(np.degrees(np.arccos(cosine))), rel=1e-6)
    assert float(errors["fa_error"]) == pytest.approx(np.median(np.abs(maps_p["fa"] - maps_t["fa"]) / maps_t["fa"]),
                                                      rel=1e-6)
    assert float(errors["md_error"]) == pytest.approx(np.median(np.abs(maps_p["md"] - maps_t["md"]) / maps_t["md"]),
                                                      rel=1e-6)
    del rng


# --------------------------------------------------------------------------- network options
def test_without_normalisation_layers_train_and_eval_outputs_agree_at_batch_one():
    generator = build_generator("tiny", ["t1w"], norm="none", structure_scales=(1.0,), dropout=0.0)
    x = torch.rand(1, 6, 16, 16, 16)
    with torch.no_grad():
        trained = generator.train()(x, "t1w")
        evaluated = generator.eval()(x, "t1w")
    torch.testing.assert_close(trained, evaluated)


def test_batch_norm_generators_differ_between_train_and_eval_at_batch_one():
    generator = build_generator("tiny", ["t1w"])
    x = torch.rand(1, 6, 32, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(generator.train()(x, "t1w"), generator.eval()(x, "t1w"))


def test_gaussian_smoothing_matches_scipy_with_nearest_borders():
    volume = torch.rand(1, 2, 12, 10, 9, dtype=torch.float64)
    for sigma in (1.0, 2.0):
        expected = ndimage.gaussian_filter(volume.numpy(), (0, 0, sigma, sigma, sigma), mode="nearest", truncate=3.0)
        np.testing.assert_allclose(gaussian_smooth(volume, sigma).numpy(), expected, atol=1e-12)


def test_structure_features_find_the_axis_of_a_tube():
    grid = np.stack(np.meshgrid(*[np.arange(24) - 11.5] * 3, indexing="ij"), axis=-1)
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    distance = np.linalg.norm(grid - (grid @ axis)[..., None] * axis, axis=-1)
    tube = torch.from_numpy((distance < 5).astype(np.float32))[None, None]
    features = StructureTensorFeatures(1, (2.0,), maps=1)
    first, last = features.contrast[0], features.contrast[2]
    with torch.no_grad():  # contrast = tanh(2 tanh(2 tube - 1)): the tube's indicator, no spatial blur
        first.weight.zero_()
        first.weight[:, :, 1, 1, 1] = 2.0
        first.bias.fill_(-1.0)
        last.weight.fill_(2.0 / first.out_channels)
        last.bias.zero_()
        out = features(tube)[0].numpy()  # channels: 6 components of the one map, then log(trace)
    edge = (distance > 3.5) & (distance < 6.5) & (np.abs(grid).max(-1) < 7)
    six = np.moveaxis(out[:6], 0, -1)[edge]
    vectors = np.linalg.eigh(six[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(-1, 3, 3))[1][:, :, 0]
    angles = np.degrees(np.arccos(np.abs(vectors @ axis).clip(max=1)))
    assert np.median(angles) < 5.0
    # The dyadic a a^T that follows (channels 6-11) holds the same axis, with unit trace.
    dyadic = np.moveaxis(out[6:12], 0, -1)[edge]
    np.testing.assert_allclose(dyadic[:, [0, 3, 5]].sum(-1), 1.0, atol=1e-5)
    squared_cosine = np.einsum("i,nij,j->n", axis, dyadic[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(-1, 3, 3), axis)
    assert np.median(np.degrees(np.arccos(np.sqrt(squared_cosine.clip(0, 1))))) < 5.0


def test_structure_features_are_differentiable_and_learned():
    generator = build_generator("tiny", ["pc-bssfp"], norm="none", structure_scales=(1.0, 2.0), dropout=0.0)
    x = torch.rand(1, 24, 16, 16, 16)
    generator(x, "pc-bssfp").square().mean().backward()
    assert generator.heads["pc-bssfp"].structure.contrast[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- augmentation and sampling
@pytest.mark.parametrize("modality", ["pc-bssfp", "t1w"])
def test_bias_field_leaves_phase_and_target_untouched(modality):
    import torchio as tio

    channels = 24 if modality == "pc-bssfp" else 6
    data_in = torch.full((channels, 12, 12, 12), 0.5)
    subject = tio.Subject(input=tio.ScalarImage(tensor=data_in.clone()),
                          target=tio.ScalarImage(tensor=torch.full((6, 12, 12, 12), 0.3)))
    torch.manual_seed(0)
    out = data.MagnitudeBiasField(modality, p=1.0)(subject)
    changed = out["input"].data
    intensity = slice(0, None, 2) if modality == "pc-bssfp" else slice(None)
    assert not torch.equal(changed[intensity], data_in[intensity])
    ratio = changed[intensity] / data_in[intensity]
    assert 0.4 < float(ratio.min()) and float(ratio.max()) < 2.5  # a realistic receive field, not x0.2-x5
    if modality == "pc-bssfp":
        torch.testing.assert_close(changed[1::2], data_in[1::2])  # phases are not intensities
    torch.testing.assert_close(out["target"].data, torch.full((6, 12, 12, 12), 0.3))


def test_white_matter_sampling_map_puts_the_requested_share_on_white_matter(tmp_path):
    subject = synthetic_subject(tmp_path, "01", 1, 1, seed=0)
    normalization = data.fit_training_normalization([subject], tensor_transform="log")
    pair = data.pair_sessions(subject, "t1w")[0]
    loaded = data.pair_subject(pair, "t1w", normalization, patch_size=16, white_matter_patches=0.6)
    loaded.load()
    sampling, wm = loaded["sampling"].data[0].numpy(), loaded["wm"].data[0].numpy()
    assert sampling.sum() == pytest.approx(1.0, rel=1e-5)
    # The synthetic WM probability is 1/3 everywhere: nothing above 0.5, so the map falls back to uniform.
    assert np.ptp(sampling[sampling > 0]) < 1e-9
    assert wm.max() == pytest.approx(1 / 3, rel=1e-5)


# --------------------------------------------------------------------------- training and inference agree
def test_training_and_inference_build_the_same_network_input(tmp_path):
    from bssfp2dt.pipeline.participant import network_input

    subject = synthetic_subject(tmp_path, "01", 1, 1, seed=0)
    normalization = data.fit_training_normalization([subject], tensor_transform="log")
    for modality in ("pc-bssfp", "bssfp", "t1w", "dwi-tensor"):
        pair = data.pair_sessions(subject, modality)[0]
        loaded = data.pair_subject(pair, modality, normalization, patch_size=16)
        loaded.load()
        reader = loaded["input"].reader
        mask = reader.mask()
        inference = network_input(subject.sessions[0], modality, normalization, mask)
        box = tuple(slice(a, b) for a, b in reader.box)
        training = loaded["input"].data.numpy()[(slice(None),) + tuple(slice(0, s.stop - s.start) for s in box)]
        np.testing.assert_array_equal(training, inference[(slice(None),) + box])


# --------------------------------------------------------------------------- module step and validation
def test_regression_step_lowers_the_loss_and_volume_validation_reports_wm_errors():
    torch.manual_seed(0)
    generator = build_generator("tiny", ["t1w"], norm="none", structure_scales=(1.0,), dropout=0.0)
    module = Bssfp2dtGAN(generator, "direct", "t1w", recipe=RECIPES["log-euclidean"], learning_rate=3e-3)
    assert module.discriminator is None
    x = torch.rand(2, 6, 16, 16, 16)
    target = torch.from_numpy(np.broadcast_to(log_tensor(cylinder((0, 1, 0))), (2, 16, 16, 16, 6)).copy())
    batch = {"input": x, "target": target.permute(0, 4, 1, 2, 3).float(), "mask": torch.ones(2, 1, 16, 16, 16),
             "wm": torch.ones(2, 1, 16, 16, 16)}
    optimiser = torch.optim.AdamW(module.trainable_generator_parameters, lr=3e-3)
    first = module.regression_step(batch, optimiser, torch.Tensor.backward)["total"]
    for _ in range(30):
        last = module.regression_step(batch, optimiser, torch.Tensor.backward)["total"]
    assert float(last) < 0.5 * float(first)
    module.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    errors = module.volume_validation({key: value[:1] for key, value in batch.items()})
    assert set(errors) >= {"v1_angle", "fa_error", "md_error", "fa_ratio", "loss"}
    assert float(errors["loss"]) == pytest.approx(float(errors["v1_angle"]) / 30 + float(errors["fa_error"])
                                                  + 10 * float(errors["md_error"]), rel=1e-5)


# --------------------------------------------------------------------------- anatomy baseline
def test_cylinder_eigenvalues_give_the_requested_fa_and_md():
    axial, radial = baselines.cylinder_eigenvalues(0.45, 0.75e-3)
    maps = tensor_maps(np.array([axial, 0, 0, radial, 0, radial]))
    assert float(maps["fa"]) == pytest.approx(0.45, rel=1e-9)
    assert float(maps["md"]) == pytest.approx(0.75e-3, rel=1e-9)


def test_anatomy_baseline_runs_along_a_white_matter_tube():
    grid = np.stack(np.meshgrid(*[np.arange(30) - 14.5] * 3, indexing="ij"), axis=-1)
    axis = np.array([0.0, 1.0, 1.0]) / np.sqrt(2)
    distance = np.linalg.norm(grid - (grid @ axis)[..., None] * axis, axis=-1)
    wm = np.clip(1.2 - distance / 4, 0, 1)
    gm = np.clip(1 - wm, 0, 1) * (distance < 9)
    csf = np.clip(1 - wm - gm, 0, 1)
    mask = np.ones(wm.shape, dtype=bool)
    means = np.array([[3e-3, 0, 0, 3e-3, 0, 3e-3], [0.8e-3, 0, 0, 0.8e-3, 0, 0.8e-3],
                      [0.7e-3, 0, 0, 0.7e-3, 0, 0.7e-3]])
    prediction = baselines.anatomy_prediction(np.stack([csf, gm, wm], -1), mask, 2.0, means, 0.6, 0.7e-3)
    maps = tensor_maps(prediction)
    inside = (wm > 0.5) & (np.abs(grid).max(-1) < 9)
    angles = np.degrees(np.arccos(np.abs(maps["v1"][inside] @ axis).clip(max=1)))
    assert np.median(angles) < 10
    np.testing.assert_allclose(maps["fa"][inside], 0.6, rtol=1e-6)
    assert np.all(prediction[csf > 0.9] == means[0])


def test_deviatoric_cosine_of_two_cylinders_is_the_second_legendre_polynomial_of_their_angle():
    from bssfp2dt.training.losses import deviatoric_cosine

    reference = _log_volume(cylinder((1, 0, 0)))
    for degrees in (0.0, 30.0, 54.7356, 90.0):
        angle = np.radians(degrees)
        turned = _log_volume(cylinder((np.cos(angle), np.sin(angle), 0)))
        expected = (3 * np.cos(angle) ** 2 - 1) / 2
        assert float(deviatoric_cosine(turned, reference).mean()) == pytest.approx(expected, abs=1e-5)


def test_the_direction_term_ranks_orientations_and_ignores_the_amount_of_anisotropy():
    target = _log_volume(cylinder((0, 0, 1)))
    ones = torch.ones(1, 1, 2, 2, 2)
    loss = TensorLoss()
    weak_but_right = loss(_log_volume(cylinder((0, 0, 1), axial=0.9e-3, radial=0.6e-3)), target, ones, ones)
    tilted = loss(_log_volume(cylinder((0, 1, 2))), target, ones, ones)
    crossed = loss(_log_volume(cylinder((1, 0, 0))), target, ones, ones)
    assert float(weak_but_right["direction"]) == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < float(tilted["direction"]) < float(crossed["direction"])


def test_input_shortcut_starts_a_dt_to_dt_network_at_its_input():
    """With ``input_shortcut`` the least-squares start of a DWI-tensor head is the identity (input and target
    are the same log-Euclidean tensor), so the fresh network reproduces its input; without it, it cannot."""
    from bssfp2dt.training.initialisation import initialise_structure_head

    rng = np.random.default_rng(4)
    values = torch.from_numpy(rng.normal(0.0, 0.3, (6, 16, 16, 16)).astype(np.float32))
    volume = {"input": values, "target": values.clone(), "mask": torch.ones(1, 16, 16, 16),
              "wm": torch.from_numpy(rng.uniform(0, 1, (1, 16, 16, 16)).astype(np.float32))}
    errors = {}
    for option in (True, False):
        torch.manual_seed(0)
        generator = build_generator("tiny", ["dwi-tensor"], norm="none", structure_scales=(1.0,), dropout=0.0,
                                    input_shortcut=option)
        generator.set_output_offset(values.mean(dim=(1, 2, 3)).numpy())
        assert initialise_structure_head(generator, "dwi-tensor", [volume], seed=0)
        with torch.no_grad():
            output = generator.eval()(values[None], "dwi-tensor")[0]
        errors[option] = float((output - values).abs().median() / values.abs().median())
    assert errors[True] < 0.02
    assert errors[False] > 0.5


def test_the_autoencoder_stage_refuses_the_input_shortcut_recipe():
    from bssfp2dt.errors import UsageError
    from bssfp2dt.pipeline.training import starting_point
    from bssfp2dt.training.recipes import get_recipe
    from bssfp2dt.training.stages import get_stage

    with pytest.raises(UsageError, match="log-euclidean for the staged chain"):
        starting_point(get_stage("autoencoder"), "pc-bssfp", None, "tiny", get_recipe("log-euclidean-input-shortcut"))
    assert starting_point(get_stage("direct"), "t1w", None, "tiny",
                          get_recipe("log-euclidean-input-shortcut")).generator.size.input_shortcut
