"""Training stages: the table, what each trains and freezes, and the head stage's bit-exact freezing."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bssfp2dt.errors import UsageError
from bssfp2dt.models.checkpoint import save_release_checkpoint
from bssfp2dt.models.generator import build_generator
from bssfp2dt.training.module import Bssfp2dtGAN
from bssfp2dt.training.stages import STAGES, apply_stage, get_stage, initial_generator


def test_stage_table():
    assert {name: (s.input_modality, s.trains, s.starts_from, s.learning_rate) for name, s in STAGES.items()} == {
        "direct": (None, "all", (), 1e-4),
        "autoencoder": ("dwi-tensor", "all", (), 1e-4),
        "head": (None, "head", ("autoencoder",), 1e-4),
        "finetune": (None, "all", ("head", "direct", "finetune"), 1e-5),
    }
    assert STAGES["head"].freezes != "nothing" and STAGES["finetune"].freezes == "nothing"
    with pytest.raises(UsageError, match="--train-stage"):
        get_stage("pretrain")


@pytest.fixture()
def autoencoder_checkpoint(tmp_path):
    """A tiny DT autoencoder whose batch-norm statistics have moved off their defaults."""
    torch.manual_seed(0)
    generator = build_generator("tiny", ["dwi-tensor"]).train()
    with torch.no_grad():
        for _ in range(2):
            generator(torch.rand(2, 6, 16, 16, 16), "dwi-tensor")
    return save_release_checkpoint(tmp_path / "autoencoder.pt", generator.eval(), config={}, stage="autoencoder",
                                   modality="dwi-tensor", normalization={})


def _batches(channels: int, n: int = 4):
    generator = torch.Generator().manual_seed(1)
    return [{"input": torch.rand(channels, 16, 16, 16, generator=generator),
             "target": torch.rand(6, 16, 16, 16, generator=generator)} for _ in range(n)]


def test_head_stage_trains_only_the_new_head_and_keeps_everything_else_bit_identical(autoencoder_checkpoint):
    stage = get_stage("head")
    generator = initial_generator(stage, "pc-bssfp", "tiny", autoencoder_checkpoint)
    before = {key: value.clone() for key, value in generator.state_dict().items()}
    module = Bssfp2dtGAN(generator, stage, "pc-bssfp", learning_rate=1e-2)
    assert module.input_modality == "pc-bssfp"
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(_batches(24), batch_size=2))
    assert int(module.batches_trained) == 3  # max_steps counts both optimisers' steps

    after = generator.state_dict()
    new_head = {key for key in after if key.startswith("heads.pc-bssfp.")}
    assert new_head and not new_head & before.keys()
    for key, value in before.items():  # weights, biases, PReLU slopes, BN running mean/var/counters
        assert torch.equal(after[key], value), key
    assert {key for key in after if key not in before} == new_head
    # The new head did learn: its weights moved away from their initial values.
    fresh = build_generator("tiny", ["pc-bssfp"]).heads["pc-bssfp"]
    assert not all(torch.equal(a, b) for a, b in zip(generator.heads["pc-bssfp"].parameters(), fresh.parameters()))


def test_head_stage_parameter_bookkeeping(autoencoder_checkpoint):
    generator = initial_generator(get_stage("head"), "t1w", "tiny", autoencoder_checkpoint)
    trainable = apply_stage(generator, get_stage("head"), "t1w")
    head_parameters = list(generator.heads["t1w"].parameters())
    assert len(trainable) == len(head_parameters) and all(a is b for a, b in zip(trainable, head_parameters))
    assert not any(p.requires_grad for p in generator.backbone.parameters())
    assert not any(p.requires_grad for p in generator.heads["dwi-tensor"].parameters())
    generator.train()
    batch_norms = [m for m in generator.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert batch_norms and not any(m.training for m in batch_norms)


def test_finetune_unfreezes_everything_at_a_tenth_of_the_learning_rate(tmp_path, autoencoder_checkpoint):
    head_stage = get_stage("head")
    generator = initial_generator(head_stage, "t1w", "tiny", autoencoder_checkpoint)
    apply_stage(generator, head_stage, "t1w")
    head_checkpoint = save_release_checkpoint(tmp_path / "head.pt", generator, config={}, stage="head",
                                              modality="t1w", normalization={})
    finetune = get_stage("finetune")
    generator = initial_generator(finetune, "t1w", "tiny", head_checkpoint)
    trainable = apply_stage(generator, finetune, "t1w")
    assert len(trainable) == len(list(generator.parameters()))
    assert all(p.requires_grad for p in generator.parameters())
    assert all(m.training for m in generator.train().modules())
    assert Bssfp2dtGAN(generator, finetune, "t1w").learning_rate == 1e-5
    with pytest.raises(UsageError, match="trained on t1w"):
        initial_generator(finetune, "pc-bssfp", "tiny", head_checkpoint)


def test_autoencoder_stage_feeds_the_tensor_and_direct_starts_fresh():
    assert Bssfp2dtGAN(initial_generator(get_stage("autoencoder"), "pc-bssfp", "tiny"), "autoencoder",
                       "pc-bssfp").input_modality == "dwi-tensor"
    assert initial_generator(get_stage("direct"), "bssfp", "tiny").modalities == ("bssfp",)


def test_stage_needing_a_checkpoint_refuses_a_missing_or_wrong_one(autoencoder_checkpoint):
    with pytest.raises(UsageError, match="--init-checkpoint"):
        initial_generator(get_stage("head"), "t1w", "tiny")
    with pytest.raises(UsageError, match="written by the autoencoder stage.*head-, direct- or finetune-stage"):
        initial_generator(get_stage("finetune"), "t1w", "tiny", autoencoder_checkpoint)
    direct = save_release_checkpoint(autoencoder_checkpoint.with_name("direct.pt"), build_generator("tiny", ["t1w"]),
                                     config={}, stage="direct", modality="t1w", normalization={})
    with pytest.raises(UsageError, match="written by the direct stage.*needs a autoencoder-stage checkpoint"):
        initial_generator(get_stage("head"), "t1w", "tiny", direct)


def test_finetune_starts_from_a_direct_stage_model_such_as_the_packaged_ones(tmp_path):
    torch.manual_seed(2)
    direct = build_generator("tiny", ["pc-bssfp"])
    path = save_release_checkpoint(tmp_path / "direct.pt", direct, config={}, stage="direct", modality="pc-bssfp",
                                   normalization={})
    generator = initial_generator(get_stage("finetune"), "pc-bssfp", "tiny", path)
    for (key, value), reference in zip(generator.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(value, reference), key
    assert len(apply_stage(generator, get_stage("finetune"), "pc-bssfp")) == len(list(generator.parameters()))
    with pytest.raises(UsageError, match="trained on pc-bssfp"):
        initial_generator(get_stage("finetune"), "t1w", "tiny", path)
