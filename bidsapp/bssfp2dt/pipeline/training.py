"""Training mode (``--train-stage``): preprocess, pair, split, normalise, train one stage, export.

Everything of a run goes to ``output_dir/models/<run-id>/`` (``<run-id>`` = ``<stage>-<modality>_<run uuid>``):
``checkpoints/`` (Lightning: top-k by validation loss + ``last.ckpt``), ``metrics.csv``, ``split.json``,
``config.toml`` (the resolved run configuration) and ``model.pt``, the release checkpoint of the best
epoch (generator, normalisation, contract) that inference loads with nothing else.

Starting weights (``--init-checkpoint``): a release checkpoint (``model.pt``) or a Lightning checkpoint
(``*.ckpt``) of the stage the requested stage starts from. A Lightning checkpoint written by the requested
stage itself resumes that run (same split, normalisation, optimiser states and epoch count).
"""
from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bssfp2dt import modalities
from bssfp2dt.errors import MissingInputError, UsageError

logger = logging.getLogger(__name__)

MODELS_FOLDER = "models"


def run_training(plan) -> int:
    """Train ``plan.config.training.stage`` on ``plan.subjects``; return the exit code (0).

    Writes under ``output_dir/models/<run-id>/`` (see the module docstring).
    """
    import lightning as L

    from bssfp2dt.config import save_toml
    from bssfp2dt.inference.device import configure_cpu_threads
    from bssfp2dt.training import data
    from bssfp2dt.training.calibration import calibrate_anisotropy
    from bssfp2dt.training.initialisation import initialise_structure_head
    from bssfp2dt.training.module import Bssfp2dtGAN
    from bssfp2dt.training.recipes import get_recipe
    from bssfp2dt.training.stages import get_stage, stage_modality
    from bssfp2dt.training.trainer import best_checkpoint, build_trainer

    config = plan.config
    settings = config.training
    stage = get_stage(settings.stage)
    modality = config.selection.input_modality
    input_modality = stage_modality(stage, modality)
    recipe = get_recipe(settings.recipe)
    patch_size = data.check_patch_size(config.model.patch_size or recipe.patch_size)
    started = time.time()
    L.seed_everything(settings.seed, workers=True, verbose=False)

    configure_cpu_threads(config.resources.omp_nthreads)
    start = starting_point(stage, modality, settings.init_checkpoint, config.model.model_size, recipe)
    run_dir = Path(config.paths.output_dir) / MODELS_FOLDER / f"{stage.name}-{input_modality}_{config.run.run_uuid}"
    split, normalization, pairs = prepare_data(plan, input_modality, start, recipe.tensor_transform)

    run_dir.mkdir(parents=True, exist_ok=True)
    split.save(run_dir / "split.json")
    config_path = save_toml(config, run_dir / "config.toml")
    datamodule = data.TrainingData(pairs["train"], pairs["validation"], input_modality, normalization,
                                   patch_size=patch_size, batch_size=config.model.batch_size,
                                   num_workers=queue_workers(config.resources.nprocs), seed=settings.seed, split=split,
                                   cache_mb=cache_budget_mb(config.resources.mem_mb), recipe=recipe)
    if not start.resume:
        start.generator.set_input_ranges(normalization)
    if stage.init_from is None and not start.resume:
        offset = data.mean_normalised_target(pairs["train"], normalization)
        start.generator.set_output_offset(offset)
        logger.info("output bias set to the mean normalised training tensor %s", np.array2string(offset, precision=3))
        initialise_structure_head(start.generator, input_modality, datamodule.training_volumes(), seed=settings.seed,
                                  azimuth_free=recipe.azimuth_free)
    learning_rate = settings.learning_rate or (recipe.learning_rate if stage.init_from is None else None)
    module = Bssfp2dtGAN(start.generator, stage, modality, seed=settings.seed, learning_rate=learning_rate,
                         perceptual_weights=settings.perceptual_weights, lr_schedule=settings.lr_schedule,
                         recipe=recipe)
    trainer = build_trainer(run_dir, max_epochs=settings.max_epochs, device=config.resources.device,
                            patience=settings.patience, progress_bar=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(start.path) if start.resume else None)

    best = best_checkpoint(trainer)
    if best is not None and best.is_file():
        weights = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(weights)
        logger.info("release weights from %s", best.name)
    if recipe.tensor_transform == "log":
        calibrate_anisotropy(module.generator, input_modality, datamodule.training_volumes())
    release = module.export_release(run_dir / "model.pt", config=release_config(config_path, split, patch_size),
                                    normalization=normalization.to_dict())
    logger.info("training stage %s finished in %.0f s: %s", stage.name, time.time() - started, release)
    return 0


def prepare_data(plan, input_modality: str, start: "StartingPoint", tensor_transform: str = "minmax"):
    """Preprocess every selected subject, split them (or reuse the resumed run's split), fit the
    normalisation on the training subjects (tensors in ``tensor_transform`` coordinates unless the starting
    checkpoint fixes them) and pair the sessions.

    Returns ``(split, normalization, pairs)`` with ``pairs`` = {"train"|"validation"|"test": [TrainingPair]}.
    """
    from bssfp2dt.io.workdir_lock import work_dir_lock
    from bssfp2dt.preprocessing.workflow import run_preprocessing
    from bssfp2dt.training import data

    settings = plan.config.training
    with work_dir_lock(plan.config.paths.work_dir):  # nipype's cache takes one writer at a time
        preprocessed = {subject.subject: run_preprocessing(plan, subject) for subject in plan.subjects}
    usable = {label: subject for label, subject in preprocessed.items()
              if data.pair_sessions(subject, input_modality)}
    for label in sorted(set(preprocessed) - set(usable)):
        logger.warning("sub-%s: no %s session with a DWI session: left out of the split", label, input_modality)
    split = start.split or data.split_subjects(list(usable), settings.seed, settings.split_fractions)
    missing = [label for label in split.train + split.validation if label not in usable]
    if missing:
        raise MissingInputError(f"--init-checkpoint {settings.init_checkpoint}: its split needs "
                                f"sub-{', sub-'.join(missing)}, which are not selected or have no pairs; select them")
    normalization = start.normalization if start.resume else data.fit_training_normalization(
        [usable[label] for label in split.train], start.normalization, tensor_transform)
    pairs = {part: data.pair_subjects([usable[label] for label in getattr(split, part) if label in usable],
                                      input_modality) for part in ("train", "validation", "test")}
    logger.info("split (seed %d): %d/%d/%d subjects, %d/%d/%d %s -> DWI pairs", split.seed, len(split.train),
                len(split.validation), len(split.test), *(len(pairs[p]) for p in ("train", "validation", "test")),
                input_modality)
    return split, normalization, pairs


def cache_budget_mb(mem_mb: float | None) -> float:
    """Memory (MB) for loaded training subjects: half of ``--mem``, or ``DEFAULT_CACHE_MB`` without it."""
    from bssfp2dt.training.data import DEFAULT_CACHE_MB

    return DEFAULT_CACHE_MB if not mem_mb else mem_mb / 2


def queue_workers(nprocs: int) -> int:
    """Subject-loading processes of the patch queue: ``--nprocs`` - 1 (the main process trains), at most 8."""
    return max(0, min(8, int(nprocs) - 1))


def release_config(config_path: Path, split, patch_size: int) -> dict[str, Any]:
    """The plain-value configuration stored in ``model.pt``: the saved run config (TOML), the split, the patch."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    with open(config_path, "rb") as handle:
        return {**tomllib.load(handle), "split": split.to_dict(), "patch_size": patch_size}


class StartingPoint:
    """The generator a stage starts from, plus what its checkpoint carries.

    ``normalization``: ranges to keep (None: fit all); ``split``: the split to reuse (resume only);
    ``resume``: ``path`` is a Lightning checkpoint of the same stage to continue.
    """

    def __init__(self, generator, normalization=None, split=None, path: Path | None = None, resume: bool = False):
        self.generator = generator
        self.normalization = normalization
        self.split = split
        self.path = path
        self.resume = resume


def starting_point(stage, modality: str, init_checkpoint: Path | None, model_size: str | None,
                   recipe=None) -> StartingPoint:
    """Build the stage's starting generator from nothing (with the ``recipe``'s network options), a release
    checkpoint or a Lightning checkpoint."""
    from bssfp2dt.preprocessing.normalization import Normalization
    from bssfp2dt.training.stages import initial_generator

    if recipe is not None and recipe.input_shortcut and stage.name == "autoencoder":
        raise UsageError(f"--recipe {recipe.name} starts a DT -> DT network as the identity, so the autoencoder "
                         "stage's backbone would learn nothing for the head stage to decode; use --recipe "
                         "log-euclidean for the staged chain")
    if init_checkpoint is None or not is_lightning_checkpoint(init_checkpoint):
        if init_checkpoint is not None and stage.init_from is None:
            raise UsageError(f"--train-stage {stage.name} starts from random weights; drop --init-checkpoint "
                             f"or give a {stage.name}-stage Lightning checkpoint (*.ckpt) to resume")
        generator = initial_generator(stage, modality, model_size or modalities.DEFAULT_MODEL_SIZE, init_checkpoint,
                                      **generator_options(recipe))
        normalization = None
        if init_checkpoint is not None:
            from bssfp2dt.models.checkpoint import load_release_checkpoint

            normalization = Normalization.from_dict(load_release_checkpoint(init_checkpoint)[1].normalization)
        return StartingPoint(generator, normalization)
    return _from_lightning(stage, modality, Path(init_checkpoint))


def generator_options(recipe) -> dict[str, Any]:
    """The generator fields a recipe sets (none for the reference method's defaults)."""
    if recipe is None or recipe.norm == "batch" and not recipe.structure_scales and recipe.dropout is None:
        return {}
    options: dict[str, Any] = {"norm": recipe.norm, "structure_scales": tuple(recipe.structure_scales)}
    if recipe.cycle_profile:
        options["cycle_profile"] = True
    if recipe.input_shortcut:
        options["input_shortcut"] = True
    if recipe.dropout is not None:
        options["dropout"] = recipe.dropout
    return options


def is_lightning_checkpoint(path: Path | str) -> bool:
    """Whether ``path`` is a Lightning checkpoint (``*.ckpt``) rather than a release checkpoint."""
    return Path(path).suffix == ".ckpt"


def _from_lightning(stage, modality: str, path: Path) -> StartingPoint:
    from bssfp2dt.models.generator import Generator
    from bssfp2dt.preprocessing.normalization import Normalization
    from bssfp2dt.training import data
    from bssfp2dt.training.stages import stage_modality

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
        hyper = payload["hyper_parameters"]
        weights = {key[len("generator."):]: value for key, value in payload["state_dict"].items()
                   if key.startswith("generator.")}
        state = next(value for key, value in payload.items() if key.endswith("TrainingData"))
    except (OSError, RuntimeError, KeyError, StopIteration, EOFError, pickle.UnpicklingError) as error:
        raise MissingInputError(f"--init-checkpoint {path} is not a bssfp2dt Lightning checkpoint ({error}); "
                                "give a checkpoints/*.ckpt of a training run or its model.pt") from None
    written_by = hyper["stage"]
    resume = written_by == stage.name
    if not resume and written_by not in stage.starts_from:
        needed = stage.describe_start() if stage.starts_from else f"{stage.name}-stage"
        raise UsageError(f"--init-checkpoint {path} was written by the {written_by} stage; --train-stage "
                         f"{stage.name} needs a {needed} checkpoint")
    if (resume or written_by != "autoencoder") and hyper["modality"] != modality:
        raise UsageError(f"--init-checkpoint {path} was trained on {hyper['modality']}, not {modality}; "
                         "give the checkpoint of the same modality")
    # Insertion order of the heads fixes the parameter order, which the optimiser states are indexed by.
    heads = list(dict.fromkeys(key.split(".")[1] for key in weights if key.startswith("heads.")))
    if stage_modality(stage, modality) not in heads and resume:
        raise UsageError(f"--init-checkpoint {path} has no {stage_modality(stage, modality)} head")
    from dataclasses import replace

    from bssfp2dt.models.generator import resolve_size

    options = dict(hyper.get("generator_options") or {})
    if "structure_scales" in options:
        options["structure_scales"] = tuple(options["structure_scales"])
    generator = Generator(replace(resolve_size(hyper["generator_size"]), **options), heads)
    generator.load_state_dict(weights, strict=True)
    split = data.Split.from_dict(state["split"]) if resume and state.get("split") else None
    logger.info("starting from %s (%s stage%s)", path, written_by, ", resuming" if resume else "")
    return StartingPoint(generator.train(), Normalization.from_dict(state["normalization"]), split, path, resume)
