"""Training mode: Trainer settings, exact resumption through ``trainer.py`` with the data module, and the
tiny autoencoder -> head -> finetune chain through the CLI ending in a self-contained ``model.pt``."""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synthetic_subject, tiny_config

from bssfp2dt.errors import MissingInputError, UsageError
from bssfp2dt.models.generator import build_generator
from bssfp2dt.pipeline.training import starting_point
from bssfp2dt.training import data
from bssfp2dt.training.losses import LossWeights
from bssfp2dt.training.module import Bssfp2dtGAN
from bssfp2dt.training.stages import get_stage
from bssfp2dt.training.trainer import build_trainer, hardware, slurm_counts


@pytest.fixture(autouse=True)
def _restore_determinism():
    previous = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------- hardware
def test_cpu_runs_fp32_deterministic_and_gpus_bf16_with_ddp_beyond_one():
    cpu = hardware(torch.device("cpu"))
    assert (cpu.accelerator, cpu.precision, cpu.strategy, cpu.deterministic) == ("cpu", "32-true", "auto", True)
    one = hardware(torch.device("cuda:1"))
    assert (one.accelerator, one.devices, one.precision, one.strategy) == ("gpu", [1], "bf16-mixed", "auto")
    many = hardware(torch.device("cuda:0"), devices=4, num_nodes=2)
    assert (many.devices, many.num_nodes, type(many.strategy).__name__) == (4, 2, "DDPStrategy")
    with pytest.raises(UsageError):
        hardware(torch.device("cpu"), devices=2)


def test_slurm_allocation_sets_devices_and_nodes():
    assert slurm_counts({}) == (1, 1)
    assert slurm_counts({"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}) == (4, 2)
    assert slurm_counts({"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "2(x3)", "SLURM_NNODES": "3"}) == (2, 3)


# --------------------------------------------------------------------------- resumption
@pytest.fixture(scope="module")
def datamodule_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("preproc")
    subjects = [synthetic_subject(root, "01", 2, 2, seed=1), synthetic_subject(root, "02", 1, 1, seed=2)]
    normalization = data.fit_training_normalization(subjects[:1])

    def build() -> data.TrainingData:
        train, validation = (data.pair_subjects(part, "pc-bssfp") for part in (subjects[:1], subjects[1:]))
        return data.TrainingData(train, validation, "pc-bssfp", normalization, patch_size=16, batch_size=2, seed=4,
                                 samples_per_volume=2, validation_samples_per_volume=2)
    return build


def _module(seed: int, lr_schedule: str = "constant") -> Bssfp2dtGAN:
    torch.manual_seed(seed)
    return Bssfp2dtGAN(build_generator("tiny", ["pc-bssfp"]), "direct", "pc-bssfp", seed=0, learning_rate=1e-3,
                       loss_weights=LossWeights(perceptual=0.0), lr_schedule=lr_schedule)


def _learning_rates(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as handle:
        return [float(row["learning_rate"]) for row in csv.DictReader(handle) if row.get("learning_rate")]


def test_cosine_schedule_decays_to_a_hundredth_and_resumes_exactly(tmp_path, datamodule_factory):
    uninterrupted = _module(0, "cosine")
    build_trainer(tmp_path / "full", max_epochs=3, device="cpu", progress_bar=False).fit(
        uninterrupted, datamodule=datamodule_factory())
    # Closed form of the half cosine from 1e-3 to 1e-5 over 3 epochs, read after each epoch.
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * epoch / 3)) / 2 for epoch in (1, 2, 3)]
    # logged as float32
    np.testing.assert_allclose(_learning_rates(tmp_path / "full" / "metrics.csv"), expected, rtol=1e-6)

    first = _module(0, "cosine")
    build_trainer(tmp_path / "part", max_epochs=3, device="cpu", progress_bar=False, max_steps=8).fit(
        first, datamodule=datamodule_factory())  # 4 batches x 2 optimiser steps: stops after epoch 1
    resumed = _module(123, "cosine")
    build_trainer(tmp_path / "resumed", max_epochs=3, device="cpu", progress_bar=False).fit(
        resumed, datamodule=datamodule_factory(), ckpt_path=tmp_path / "part" / "checkpoints" / "last.ckpt")
    reference = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_resuming_from_the_last_checkpoint_repeats_the_uninterrupted_run(tmp_path, datamodule_factory):
    uninterrupted = _module(0)
    trainer = build_trainer(tmp_path / "full", max_epochs=3, device="cpu", progress_bar=False)
    trainer.fit(uninterrupted, datamodule=datamodule_factory())

    first = _module(0)
    build_trainer(tmp_path / "part", max_epochs=1, device="cpu", progress_bar=False).fit(
        first, datamodule=datamodule_factory())
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert int(first.batches_trained) == 4  # 4 pairs x 2 patches / batch 2: stopped after k = 4 steps
    resumed = _module(123)  # a new process: other initial weights, other global random state
    build_trainer(tmp_path / "resumed", max_epochs=3, device="cpu", progress_bar=False).fit(
        resumed, datamodule=datamodule_factory(), ckpt_path=last)

    assert int(resumed.batches_trained) == int(uninterrupted.batches_trained) == 12
    reference = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), key
    # Outputs of a run: metrics.csv with one validation row per epoch, top-k + last checkpoints.
    with open(tmp_path / "full" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val_loss")]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    saved = sorted(path.name for path in (tmp_path / "full" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in saved and len(saved) == 4
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["TrainingData"]["normalization"] == datamodule_factory().normalization.to_dict()

    # --init-checkpoint with a Lightning checkpoint: the same stage resumes, another must be the next stage.
    start = starting_point(get_stage("direct"), "pc-bssfp", last, None)
    assert start.resume and start.path == last
    assert start.normalization == datamodule_factory().normalization
    for key, value in start.generator.state_dict().items():
        assert torch.equal(value, first.generator.state_dict()[key]), key
    finetune = starting_point(get_stage("finetune"), "pc-bssfp", last, None)  # a trained direct model goes on
    assert not finetune.resume and finetune.normalization == start.normalization
    with pytest.raises(UsageError, match="written by the direct stage"):
        starting_point(get_stage("head"), "pc-bssfp", last, None)
    with pytest.raises(UsageError, match="trained on pc-bssfp"):
        starting_point(get_stage("direct"), "t1w", last, None)


# --------------------------------------------------------------------------- the CLI chain
@pytest.fixture(scope="module")
def cheap_preprocessing():
    """Preprocessing without Gibbs removal and motion correction, single-level registration: the chain
    tests the training plumbing, and the full preprocessing takes minutes per subject on a shared CPU."""
    from bssfp2dt.preprocessing import workflow
    from bssfp2dt.preprocessing.registration import RegistrationSettings

    original = workflow.settings_from_config
    cheap = RegistrationSettings(level_iters=(30,), sigmas=(0.0,), factors=(1,))

    def settings(config):
        return dataclasses.replace(original(config), gibbs=False, motion_correction=False, registration=cheap)
    workflow.settings_from_config = settings
    yield
    workflow.settings_from_config = original


@pytest.mark.slow
def test_autoencoder_head_finetune_chain_through_the_cli(tmp_path, cheap_preprocessing, capsys):
    from bssfp2dt.cli.run import main
    from bssfp2dt.models.checkpoint import load_release_checkpoint
    from bssfp2dt.simulation.dataset import simulate_dataset

    bids_dir = simulate_dataset(tmp_path / "bids", tiny_config(n_subjects=3, seed=5), progress=False)
    out, work = tmp_path / "out", tmp_path / "work"
    common = [str(bids_dir), str(out), "participant", "--model-size", "tiny", "--patch-size", "16",
              "--batch-size", "4", "--max-epochs", "2", "--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu",
              "-w", str(work), "--skip-bids-validation", "--seed", "3"]
    started = time.time()
    timings = {}

    def stage(name: str, *extra: str) -> Path:
        before = time.time()
        existing = set((out / "models").glob("*")) if (out / "models").exists() else set()
        assert main(common + ["--train-stage", name, *extra]) == 0
        timings[name] = timings.get(name, 0.0) + time.time() - before
        (run_dir,) = set((out / "models").glob(f"{name}-*")) - existing
        return run_dir

    autoencoder = stage("autoencoder")
    head = stage("head", "--init-checkpoint", str(autoencoder / "model.pt"))
    finetune = stage("finetune", "--init-checkpoint", str(head / "checkpoints" / "last.ckpt"))
    # The same stage's Lightning checkpoint resumes that run (argparse keeps the last --max-epochs).
    resumed = stage("finetune", "--init-checkpoint", str(finetune / "checkpoints" / "last.ckpt"), "--max-epochs", "3")
    with capsys.disabled():
        print(f"\ntiny chain wall time {time.time() - started:.1f} s (per stage: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")")

    steps = [int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["batches_trained"])
             for run in (finetune, resumed)]
    assert steps == [2 * 4, 3 * 4]  # 2 train pairs x 8 patches / batch 4 = 4 steps per epoch
    assert json.loads((resumed / "split.json").read_text()) == json.loads((finetune / "split.json").read_text())
    for run_dir in (autoencoder, head, finetune):
        for name in ("model.pt", "metrics.csv", "split.json", "config.toml", "checkpoints/last.ckpt"):
            assert (run_dir / name).is_file(), (run_dir, name)
    splits = [json.loads((run_dir / "split.json").read_text()) for run_dir in (autoencoder, head, finetune)]
    assert splits[0] == splits[1] == splits[2]  # same seed, same subjects: same split
    assert (len(splits[0]["train"]), len(splits[0]["validation"]), len(splits[0]["test"])) == (2, 1, 0)

    generator, metadata = load_release_checkpoint(finetune / "model.pt")
    assert (metadata["stage"], metadata["modality"]) == ("finetune", "pc-bssfp")
    assert metadata["contract"]["input_channels"] == 24
    assert metadata["normalization"]["magnitude"] is not None
    # The tensor ranges come from the autoencoder stage and are carried unchanged through the chain.
    first = load_release_checkpoint(autoencoder / "model.pt")[1]["normalization"]
    assert metadata["normalization"]["tensor_diagonal"] == first["tensor_diagonal"]
    with torch.no_grad():
        prediction = generator(torch.rand(1, 24, 16, 16, 16), "pc-bssfp")
    assert prediction.shape == (1, 6, 16, 16, 16) and torch.isfinite(prediction).all()
    # The head stage trained only the new head: the backbone left it as the autoencoder wrote it.
    auto_generator = load_release_checkpoint(autoencoder / "model.pt")[0]
    head_generator = load_release_checkpoint(head / "model.pt")[0]
    for (key, value), reference in zip(head_generator.backbone.state_dict().items(),
                                       auto_generator.backbone.state_dict().values()):
        assert torch.equal(value, reference), key


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("fault", ["code", "truncated", "junk"])
def test_a_bad_lightning_checkpoint_is_a_clear_input_error_and_runs_no_code(tmp_path, datamodule_factory, fault):
    checkpoint = tmp_path / "bad.ckpt"
    marker = tmp_path / "code-ran"
    if fault == "code":  # a checkpoint whose unpickling would create a file
        payload = _RunsCodeWhenUnpickled()
        payload.marker = str(marker)
        torch.save({"state_dict": {}, "hyper_parameters": payload}, checkpoint)
    elif fault == "truncated":
        module = _module(0)
        trainer = build_trainer(tmp_path / "run", max_epochs=1, device="cpu", progress_bar=False)
        trainer.fit(module, datamodule=datamodule_factory())
        whole = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
        checkpoint.write_bytes(whole[: len(whole) // 2])
    else:
        checkpoint.write_bytes(b"not a checkpoint at all\n" * 10)
    with pytest.raises(MissingInputError, match=r"bad\.ckpt is not a bssfp2dt Lightning checkpoint"):
        starting_point(get_stage("direct"), "pc-bssfp", checkpoint, None)
    assert not marker.exists()
