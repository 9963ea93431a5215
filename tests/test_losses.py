"""Loss terms against closed forms and scikit-image's SSIM; perceptual weights only from a local file."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from bssfp2dt.errors import MissingInputError
from bssfp2dt.training.losses import (
    GeneratorLoss, LossWeights, PerceptualLoss, adversarial_loss, build_medicalnet_resnet10, discriminator_loss,
    medicalnet_features, ssim_3d,
)


@pytest.fixture(scope="module")
def medicalnet_file(tmp_path_factory):
    """A file laid out like MedicalNet's release: {"state_dict": {"module.<key>": ...}} with a conv_seg head."""
    torch.manual_seed(7)
    network = build_medicalnet_resnet10()
    state = {f"module.{key}": value for key, value in network.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(8, 512, 3, 3, 3)
    path = tmp_path_factory.mktemp("medicalnet") / "resnet_10.pth"
    torch.save({"state_dict": state}, path)
    return path, network.eval()


def _pair(seed=0, shape=(2, 6, 16, 16, 16)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


def test_loss_weights_are_frozen_with_perceptual_1000():
    weights = LossWeights()
    assert weights.perceptual == 1000.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.l1 = 2.0


def test_ssim_term_matches_scikit_image_per_channel():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    prediction, target = _pair(1, (1, 2, 16, 16, 16))
    target = (0.7 * prediction + 0.3 * target)  # correlated, so SSIM is far from 0
    loss = GeneratorLoss(perceptual_weights=None)
    expected = np.mean([skimage_metrics.structural_similarity(
        prediction[0, c].double().numpy(), target[0, c].double().numpy(), data_range=1.0, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False) for c in range(2)])
    terms = loss(prediction, target)
    assert terms["ssim"].item() == pytest.approx(1.0 - expected, abs=1e-5)
    assert expected < 0.95  # a real test: far from the trivial SSIM of 1
    assert loss(prediction, prediction)["ssim"].item() == pytest.approx(0.0, abs=1e-6)


def test_l1_adversarial_and_total_against_closed_forms():
    prediction, target = _pair(2)
    logits = torch.tensor([-2.0, 0.0, 1.5, 3.0]).reshape(1, 1, 1, 2, 2)
    weights = LossWeights(l1=2.0, ssim=0.5, perceptual=1000.0, adversarial=0.25)
    terms = GeneratorLoss(weights, perceptual_weights=None)(prediction, target, logits)
    assert terms["l1"].item() == pytest.approx(np.abs(prediction.numpy() - target.numpy()).mean(), rel=1e-6)
    softplus = [math.log1p(math.exp(-z)) for z in (-2.0, 0.0, 1.5, 3.0)]  # -log(sigmoid(z))
    assert terms["adversarial"].item() == pytest.approx(np.mean(softplus), rel=1e-6)
    assert terms["perceptual"].item() == 0.0
    expected_total = 2.0 * terms["l1"] + 0.5 * terms["ssim"] + 0.25 * terms["adversarial"]
    assert terms["total"].item() == pytest.approx(expected_total.item(), rel=1e-6)


def test_discriminator_loss_is_the_mean_of_real_and_fake_cross_entropies():
    real, fake = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)))  # fake label 0: -log(1-sigmoid(-1))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert adversarial_loss(fake, real=False).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_perceptual_disabled_without_weights_warns_exactly_once(caplog):
    prediction, target = _pair(3)
    with caplog.at_level(logging.WARNING, logger="bssfp2dt.training.losses"):
        loss = GeneratorLoss(perceptual_weights=None)
        values = [loss(prediction, target)["perceptual"].item() for _ in range(3)]
    assert values == [0.0, 0.0, 0.0]
    warnings = [r for r in caplog.records if "perceptual loss disabled" in r.getMessage()]
    assert len(warnings) == 1


def test_perceptual_weights_load_from_a_medicalnet_file(medicalnet_file):
    path, source = medicalnet_file
    perceptual = PerceptualLoss(path)
    volume = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(medicalnet_features(perceptual.network, volume), medicalnet_features(source, volume))
    assert not any(p.requires_grad for p in perceptual.network.parameters())


def test_perceptual_loss_is_zero_for_equal_inputs_and_intensity_affine_invariant(medicalnet_file):
    perceptual = PerceptualLoss(medicalnet_file[0])
    prediction, target = _pair(4)
    with torch.no_grad():
        assert perceptual(prediction, prediction).item() == 0.0
        # MedicalNet sees z-scored channels, so a positive gain and offset per channel change nothing.
        assert perceptual(3.0 * prediction + 0.2, prediction).item() == pytest.approx(0.0, abs=1e-6)
        assert perceptual(prediction, target).item() > 1e-3


def test_perceptual_loss_passes_gradients_to_the_prediction(medicalnet_file):
    perceptual = PerceptualLoss(medicalnet_file[0])
    prediction, target = _pair(5)
    prediction.requires_grad_(True)
    perceptual(prediction, target).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_perceptual_weights_missing_or_wrong_are_missing_input_errors(tmp_path):
    with pytest.raises(MissingInputError, match="perceptual_weights file .* does not exist"):
        PerceptualLoss(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, wrong)
    with pytest.raises(MissingInputError, match="not MedicalNet ResNet-10 weights") as raised:
        PerceptualLoss(wrong)
    assert raised.value.exit_code == 66


def test_separable_ssim_matches_monai_full_kernel_ssim_per_batch_item():
    from monai.losses import SSIMLoss

    prediction, target = _pair(6, (2, 3, 16, 20, 18))
    target = 0.5 * prediction + 0.5 * target
    monai_loss = SSIMLoss(spatial_dims=3, data_range=1.0, reduction="none")(prediction, target).flatten()
    assert torch.allclose(1.0 - ssim_3d(prediction, target), monai_loss, atol=1e-5)
