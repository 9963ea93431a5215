"""The LightningModule on a tiny synthetic task: it learns, exports, and resumes bit for bit."""
from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bssfp2dt.models.checkpoint import load_release_checkpoint
from bssfp2dt.models.generator import GENERATOR_SIZES, build_generator
from bssfp2dt.training.losses import LossWeights
from bssfp2dt.training.module import Bssfp2dtGAN

SIDE = 16
# The tensor is a fixed smooth function of the 6-channel input: a sigmoid of neighbouring-channel differences.
MIXING = torch.tensor([[1.0, -1, 0, 0, 0, 0], [0, 1, -1, 0, 0, 0], [0, 0, 1, -1, 0, 0],
                       [0, 0, 0, 1, -1, 0], [0, 0, 0, 0, 1, -1], [-1, 0, 0, 0, 0, 1]])


def synthetic_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` samples {"input": (6, 16, 16, 16) smooth fields in [0, 1], "target": (6, 16, 16, 16) in (0, 1)}."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 6, SIDE, SIDE, SIDE, generator=generator)
    box = torch.ones(6, 1, 5, 5, 5) / 125.0
    fields = F.conv3d(F.pad(noise, (2,) * 6, mode="circular"), box, groups=6)
    low = fields.amin(dim=(2, 3, 4), keepdim=True)
    high = fields.amax(dim=(2, 3, 4), keepdim=True)
    source = (fields - low) / (high - low)
    target = torch.sigmoid(4.0 * torch.einsum("cj,bjxyz->bcxyz", MIXING, source - 0.5))
    return [{"input": x, "target": y} for x, y in zip(source, target)]


def _trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, **options)


def _module(seed: int = 0, dropout: float = 0.0, **options) -> Bssfp2dtGAN:
    L.seed_everything(seed, verbose=False)
    size = dataclasses.replace(GENERATOR_SIZES["tiny"], dropout=dropout)
    return Bssfp2dtGAN(build_generator(size, ["t1w"]), "direct", "t1w", seed=seed, **options)


@pytest.fixture(autouse=True)
def _deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_one_step_updates_generator_and_discriminator_and_logs_every_term():
    module = _module()
    generator_before = [p.clone() for p in module.generator.parameters()]
    discriminator_before = [p.clone() for p in module.discriminator.parameters()]
    trainer = _trainer(max_steps=2)  # one batch: one generator step + one discriminator step
    trainer.fit(module, DataLoader(synthetic_task(2, 0), batch_size=2))
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, module.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(discriminator_before, module.discriminator.parameters()))
    logged = set(trainer.callback_metrics)
    assert {"train_l1_step", "train_ssim_step", "train_adversarial_step", "train_discriminator_step",
            "train_total_step"} <= logged


def test_validation_metrics_match_independent_formulas():
    module = _module().eval()
    batch = synthetic_task(2, 5)
    loader = DataLoader(batch, batch_size=2)
    metrics = _trainer().validate(module, loader, verbose=False)[0]
    source = torch.stack([b["input"] for b in batch])
    target = torch.stack([b["target"] for b in batch])
    with torch.no_grad():
        prediction = module(source)
    mse = ((prediction - target) ** 2).mean().item()
    assert metrics["val_l1"] == pytest.approx((prediction - target).abs().mean().item(), rel=1e-5)
    assert metrics["val_psnr"] == pytest.approx(10 * torch.log10(torch.tensor(1.0 / mse)).item(), rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(metrics["val_l1"] + 1 - metrics["val_ssim"], rel=1e-5)


def test_short_run_lowers_validation_l1_by_a_third_and_exports_a_release_checkpoint(tmp_path):
    # The adversarial weight is 0 here: with 16^3 patches the tiny backbone's deepest level is one voxel, and
    # the adversarial game then drives the batch statistics far from the running ones used in validation.
    module = _module(learning_rate=1e-2, loss_weights=LossWeights(l1=1.0, ssim=0.1, perceptual=0.0,
                                                                  adversarial=0.0))
    train = DataLoader(synthetic_task(8, 1), batch_size=4)
    validation = DataLoader(synthetic_task(4, 2), batch_size=4)
    trainer = _trainer(max_epochs=15)
    before = trainer.validate(module, validation, verbose=False)[0]["val_l1"]
    trainer.fit(module, train, validation)
    after = trainer.validate(module, validation, verbose=False)[0]["val_l1"]
    print(f"validation L1 {before:.4f} -> {after:.4f}")
    assert after <= 0.7 * before, (before, after)

    path = module.export_release(tmp_path / "model.pt", config={"size": "tiny"}, normalization={})
    loaded, metadata = load_release_checkpoint(path)
    source = torch.stack([b["input"] for b in synthetic_task(2, 3)])
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(source, "t1w"), module(source))
    assert metadata["stage"] == "direct" and metadata["modality"] == "t1w"


def test_resuming_from_a_lightning_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    # Dropout on, so the test also covers the per-step random state, not only weights and optimiser moments.
    options = dict(learning_rate=1e-3, loss_weights=LossWeights(perceptual=0.0), dropout=0.2)
    data = synthetic_task(4, 4)

    def loader():
        return DataLoader(data, batch_size=2)  # fixed order; the data module owns shuffling

    uninterrupted = _module(**options)
    _trainer(max_epochs=3).fit(uninterrupted, loader())

    first = _module(**options)
    first_trainer = _trainer(max_epochs=1)
    first_trainer.fit(first, loader())
    checkpoint = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(checkpoint)

    torch.manual_seed(12345)  # a resumed process starts from unrelated random state
    resumed = _module(**options)
    _trainer(max_epochs=3).fit(resumed, loader(), ckpt_path=checkpoint)

    assert int(resumed.batches_trained) == int(uninterrupted.batches_trained) == 6
    reference = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), key
    saved = torch.load(checkpoint, weights_only=False)
    assert len(saved["optimizer_states"]) == 2  # generator and discriminator AdamW moments
