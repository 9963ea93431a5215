"""Training stages as data: what each trains, freezes and starts from, and at which learning rate.

``direct``: random initialisation, source -> tensor, everything trains.
``autoencoder``: DT -> DT (input modality ``dwi-tensor``), the whole UNet trains.
``head``: starts from the autoencoder release checkpoint, adds the target modality's head and trains only
that head; the backbone, the other heads and every frozen batch-norm layer's running statistics stay as loaded
(frozen batch norm normalises with the loaded statistics; the backbone's dropout stays active while training).
``finetune``: starts from the head-stage checkpoint, everything trains at a 10x lower learning rate.
The discriminator is not part of a release checkpoint, so each stage trains a fresh one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bssfp2dt import modalities
from bssfp2dt.errors import UsageError
from bssfp2dt.models.checkpoint import load_release_checkpoint
from bssfp2dt.models.generator import Generator, GeneratorSize, build_generator

logger = logging.getLogger(__name__)

TRAINS_ALL = "all"
TRAINS_HEAD = "head"


@dataclass(frozen=True)
class Stage:
    """One training stage.

    ``input_modality``: the modality this stage always feeds (None: the run's target modality);
    ``trains``: ``"all"`` or ``"head"`` (only the input modality's head; all else frozen);
    ``init_from``: the stage whose release checkpoint it starts from (None: random initialisation);
    ``also_from``: other stages whose checkpoints it may start from (finetune: a direct-stage model, such
    as the packaged ones, or an already finetuned one);
    ``learning_rate``: AdamW learning rate (1/step).
    """

    name: str
    input_modality: str | None
    trains: str
    init_from: str | None
    learning_rate: float
    also_from: tuple[str, ...] = ()

    @property
    def starts_from(self) -> tuple[str, ...]:
        """Every stage whose checkpoint this stage may start from (empty: random initialisation only)."""
        return () if self.init_from is None else (self.init_from, *self.also_from)

    def describe_start(self) -> str:
        """``"head-, direct- or finetune-stage"``: the checkpoints it accepts, for messages."""
        names = [f"{name}-" for name in self.starts_from]
        return (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]) + "stage"

    @property
    def freezes(self) -> str:
        """What stays fixed: ``"nothing"`` or ``"backbone, other heads, batch-norm statistics"``."""
        return "nothing" if self.trains == TRAINS_ALL else "backbone, other heads, batch-norm statistics"


STAGES: dict[str, Stage] = {
    "direct": Stage("direct", None, TRAINS_ALL, None, 1e-4),
    "autoencoder": Stage("autoencoder", modalities.AUTOENCODER.name, TRAINS_ALL, None, 1e-4),
    "head": Stage("head", None, TRAINS_HEAD, "autoencoder", 1e-4),
    "finetune": Stage("finetune", None, TRAINS_ALL, "head", 1e-5, also_from=("direct", "finetune")),
}


def get_stage(name: str) -> Stage:
    """The stage called ``name``; UsageError naming ``--train-stage`` for an unknown one."""
    try:
        return STAGES[name]
    except KeyError:
        raise UsageError(f"--train-stage {name!r} is not a stage; choose one of {', '.join(STAGES)}") from None


def stage_modality(stage: Stage, modality: str) -> str:
    """The input modality the stage feeds when the run's target modality is ``modality``."""
    return stage.input_modality or modality


def apply_stage(generator: Generator, stage: Stage, modality: str) -> list[nn.Parameter]:
    """Prepare ``generator`` for ``stage`` (adding the input head if missing); return the parameters to train.

    Frozen parameters get ``requires_grad=False`` and frozen batch-norm layers are pinned to eval mode,
    so their running statistics do not move during training.
    """
    input_modality = stage_modality(stage, modality)
    head = generator.add_head(input_modality)
    if stage.trains == TRAINS_ALL:
        trainable = list(generator.parameters())
        generator.freeze_batch_norm(())
    elif stage.trains == TRAINS_HEAD:
        trainable = list(head.parameters())
        head_modules = set(head.modules())
        generator.freeze_batch_norm(name for name, module in generator.named_modules()
                                    if isinstance(module, _BatchNorm) and module not in head_modules)
    else:
        raise ValueError(f"stage {stage.name}: unknown trains value {stage.trains!r}")
    trainable_ids = {id(parameter) for parameter in trainable}
    for parameter in generator.parameters():
        parameter.requires_grad_(id(parameter) in trainable_ids)
    logger.info("stage %s (%s input): %d of %d parameters train", stage.name, input_modality,
                sum(p.numel() for p in trainable), sum(p.numel() for p in generator.parameters()))
    return trainable


def initial_generator(stage: Stage, modality: str, size: str | GeneratorSize,
                      init_checkpoint: Path | str | None = None, **options) -> Generator:
    """The generator a stage starts from: a new one of ``size`` (``options``: see ``build_generator``), or the
    ``init_from`` stage's release checkpoint (which keeps its own options).

    UsageError (naming ``--init-checkpoint``) when a checkpoint is needed but missing, or was written by
    another stage or for another modality.
    """
    input_modality = stage_modality(stage, modality)
    if stage.init_from is None:
        return build_generator(size, [input_modality], **options)
    if init_checkpoint is None:
        raise UsageError(f"--train-stage {stage.name} starts from a {stage.describe_start()} checkpoint; "
                         f"give it with --init-checkpoint")
    generator, metadata = load_release_checkpoint(init_checkpoint)
    if metadata.stage not in stage.starts_from:
        raise UsageError(f"--init-checkpoint {init_checkpoint} was written by the {metadata.stage} stage; "
                         f"--train-stage {stage.name} needs a {stage.describe_start()} checkpoint")
    if metadata.stage != "autoencoder" and metadata.modality != input_modality:
        raise UsageError(f"--init-checkpoint {init_checkpoint} was trained on {metadata.modality}, not "
                         f"{input_modality}; give the checkpoint of the same modality")
    return generator.train()
