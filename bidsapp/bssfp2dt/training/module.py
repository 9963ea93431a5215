"""LightningModule of the conditional GAN: manual optimisation, generator step then discriminator step.

Batches are dicts ``{"input": (B, C_in, X, Y, Z), "target": (B, 6, X, Y, Z)}`` of normalised float32
volumes, X, Y, Z multiples of 16 (C_in = 24 for bSSFP, 6 for T1w and, in the autoencoder stage, the tensor).
Validation logs ``val_l1``, ``val_ssim``, ``val_psnr`` (dB) and ``val_loss`` (= L1 + 1 - SSIM, the value to
monitor for early stopping and top-k checkpoints) once per epoch.

Resuming is exact: each training step runs under a forked global RNG reseeded from (``seed``, number of
batches trained so far), so its randomness (dropout) does not depend on what Lightning or the data loader drew
before; that count is a buffer saved with the weights, and Lightning saves both optimiser states. A run resumed
from a Lightning checkpoint therefore repeats an uninterrupted run bit for bit (with deterministic algorithms
and a deterministic batch order).

Lightning counts optimiser steps: ``trainer.global_step`` and ``max_steps`` advance by 2 per batch. In the
head stage Lightning warns that modules are in eval mode at the start of training: those are the frozen
batch-norm layers, on purpose.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F

from bssfp2dt import modalities
from bssfp2dt.models.checkpoint import save_release_checkpoint
from bssfp2dt.models.discriminator import build_discriminator
from bssfp2dt.models.generator import Generator
from bssfp2dt.training.losses import (
    GeneratorLoss, LossWeights, TensorLoss, TensorLossWeights, canonical_azimuth, discriminator_loss,
    log_tensor_errors,
)
from bssfp2dt.training.recipes import RECIPES, Recipe
from bssfp2dt.training.stages import Stage, apply_stage, get_stage, stage_modality

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # a prime, so (seed, step) pairs give distinct per-step seeds
LR_SCHEDULES = modalities.LR_SCHEDULES
COSINE_FINAL_FRACTION = 0.01  # the cosine schedule ends at 1 % of the starting rate
VALIDATION_WM_PROBABILITY = 0.8  # white matter for the validation errors: pipeline WM probability above this
#: Weights of the white-matter errors in ``val_loss`` of volume validation: 30 degrees of V1 angle count as
#: much as an FA error of 1 or an MD error of 10 %.
SCORE_WEIGHTS = {"v1_angle": 1.0 / 30.0, "fa_error": 1.0, "md_error": 10.0}


class Bssfp2dtGAN(L.LightningModule):
    """Generator + PatchGAN discriminator trained for one ``stage`` on the run's target ``modality``.

    ``generator``: the stage's starting generator (see ``stages.initial_generator``); the stage is applied
    here (new head added, frozen parts pinned). ``learning_rate`` overrides the stage's (1/step);
    ``data_range``: the range of the normalised volumes (SSIM, PSNR). ``lr_schedule``: "constant" (the
    reference method) or "cosine" (both rates decay per epoch along a half cosine to ``COSINE_FINAL_FRACTION``
    of the start at the trainer's ``max_epochs``; the schedulers' states travel in Lightning checkpoints).
    """

    def __init__(self, generator: Generator, stage: Stage | str, modality: str, *,
                 discriminator_size: str | None = None, loss_weights: LossWeights = LossWeights(),
                 perceptual_weights: Path | str | None = None, learning_rate: float | None = None,
                 weight_decay: float = 1e-2, data_range: float = 1.0, seed: int = 0,
                 lr_schedule: str = "constant", recipe: Recipe | str = "reference",
                 tensor_loss_weights: TensorLossWeights = TensorLossWeights()):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        self.automatic_optimization = False
        self.recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
        self.stage = get_stage(stage) if isinstance(stage, str) else stage
        self.input_modality = stage_modality(self.stage, modality)
        self.generator = generator
        self.trainable_generator_parameters = apply_stage(generator, self.stage, modality)
        self.discriminator = (build_discriminator(discriminator_size or generator.size.name, [self.input_modality])
                              if self.recipe.adversarial else None)
        self.loss = GeneratorLoss(loss_weights, perceptual_weights, data_range)
        self.tensor_loss = TensorLoss(tensor_loss_weights, azimuth_free=self.recipe.azimuth_free)
        self.learning_rate = learning_rate if learning_rate is not None else self.stage.learning_rate
        self.weight_decay = weight_decay
        self.data_range = data_range
        self.seed = seed
        self.lr_schedule = lr_schedule
        self.register_buffer("batches_trained", torch.zeros((), dtype=torch.int64))
        self.save_hyperparameters({
            "generator_size": generator.size.name, "stage": self.stage.name, "modality": modality,
            "discriminator_size": discriminator_size, "loss_weights": dataclasses.asdict(loss_weights),
            "perceptual_weights": None if perceptual_weights is None else str(perceptual_weights),
            "learning_rate": self.learning_rate, "weight_decay": weight_decay, "data_range": data_range,
            "seed": seed, "lr_schedule": lr_schedule, "recipe": self.recipe.name,
            "generator_options": {"norm": generator.size.norm,
                                  "structure_scales": list(generator.size.structure_scales),
                                  "cycle_profile": generator.size.cycle_profile,
                                  "input_shortcut": generator.size.input_shortcut,
                                  "dropout": generator.size.dropout},
        })

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> normalised tensor (B, 6, X, Y, Z)."""
        return self.generator(source, self.input_modality)

    def configure_optimizers(self):
        generator_optimiser = torch.optim.AdamW(self.trainable_generator_parameters, lr=self.learning_rate,
                                                weight_decay=self.weight_decay)
        if self.discriminator is None:
            return [generator_optimiser], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(
                generator_optimiser, self._step_factor), "interval": "step"}]
        discriminator_optimiser = torch.optim.AdamW(self.discriminator.parameters(), lr=self.learning_rate,
                                                    weight_decay=self.weight_decay)
        optimisers = [generator_optimiser, discriminator_optimiser]
        if self.lr_schedule == "constant":
            return optimisers
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, self.trainer.max_epochs), eta_min=self.learning_rate * COSINE_FINAL_FRACTION)
            for optimiser in optimisers]
        return optimisers, schedulers

    def _step_factor(self, step: int) -> float:
        """Learning-rate factor of batch ``step`` (no discriminator): linear warm-up over the recipe's
        ``warmup_steps``, then constant or a half cosine to ``COSINE_FINAL_FRACTION`` at the last batch."""
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        return learning_rate_factor(step, self.recipe.warmup_steps, min(1.0, step / total), self.lr_schedule)

    def on_train_epoch_end(self) -> None:
        # Manual optimisation: Lightning leaves the schedulers (one per optimiser) to the module.
        if self.lr_schedule != "constant" and self.discriminator is not None:
            for scheduler in self.lr_schedulers():
                scheduler.step()
        optimisers = self.optimizers()
        first = optimisers[0] if isinstance(optimisers, (list, tuple)) else optimisers
        self.log("learning_rate", first.optimizer.param_groups[0]["lr"], on_epoch=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.discriminator is None:
            terms = self.regression_step(batch, self.optimizers(), self.manual_backward)
            self.lr_schedulers().step()
            self.log_dict({f"train_{name}": value for name, value in terms.items()}, on_step=True, on_epoch=True,
                          batch_size=batch["input"].shape[0])
            return
        generator_optimiser, discriminator_optimiser = self.optimizers()
        terms = self.gan_step(batch, generator_optimiser, discriminator_optimiser, self.manual_backward)
        self.log_dict({f"train_{name}": value for name, value in terms.items()}, on_step=True, on_epoch=True,
                      batch_size=batch["input"].shape[0])

    def gan_step(self, batch: dict[str, torch.Tensor], generator_optimiser: Any, discriminator_optimiser: Any,
                 backward: Callable[[torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One generator step then one discriminator step on ``batch``; return the detached loss terms
        (generator terms and ``discriminator``). Usable without a Trainer (``backward=Tensor.backward``)."""
        source, target = batch["input"], batch["target"]
        with self._step_randomness():
            prediction = self(source)
            # Generator step: the discriminator judges but does not accumulate gradients.
            self.discriminator.requires_grad_(False)
            terms = self.loss(prediction, target, self.discriminator(source, prediction, self.input_modality))
            generator_optimiser.zero_grad()
            backward(terms["total"])
            generator_optimiser.step()
            self.discriminator.requires_grad_(True)

            real_logits = self.discriminator(source, target, self.input_modality)
            fake_logits = self.discriminator(source, prediction.detach(), self.input_modality)
            terms["discriminator"] = discriminator_loss(real_logits, fake_logits)
            discriminator_optimiser.zero_grad()
            backward(terms["discriminator"])
            discriminator_optimiser.step()
        self.batches_trained += 1
        return {name: value.detach() for name, value in terms.items()}

    def regression_step(self, batch: dict[str, torch.Tensor], optimiser: Any,
                        backward: Callable[[torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One generator step on the recipe's tensor loss (no discriminator), with gradient clipping; return the
        detached terms. Usable without a Trainer (``backward=Tensor.backward``)."""
        with self._step_randomness():
            prediction = self(batch["input"])
            terms = self.tensor_loss(prediction, batch["target"], batch["mask"], batch.get("wm"))
            optimiser.zero_grad()
            backward(terms["total"])
            if self.recipe.gradient_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable_generator_parameters, self.recipe.gradient_clip)
            optimiser.step()
        self.batches_trained += 1
        return {name: value.detach() for name, value in terms.items()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        if self.recipe.validation == "volumes":
            return self.volume_validation(batch)
        prediction = self(batch["input"])
        metrics = reconstruction_metrics(prediction, batch["target"], self.loss, self.data_range)
        self.log_dict({f"val_{name}": value for name, value in metrics.items()}, on_epoch=True,
                      batch_size=prediction.shape[0])
        return metrics

    def volume_validation(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """White-matter errors of one whole volume (log-Euclidean recipes): V1 angle (degrees), FA and MD
        relative errors, predicted/true FA, and ``val_loss``, their weighted sum (``SCORE_WEIGHTS``)."""
        prediction = self(batch["input"])
        white_matter = batch["wm"] if "wm" in batch else torch.ones_like(batch["mask"])
        region = (batch["mask"] > 0) & (white_matter > VALIDATION_WM_PROBABILITY)
        target = canonical_azimuth(batch["target"]) if self.recipe.azimuth_free else batch["target"]
        errors = log_tensor_errors(prediction, target, region.to(prediction.dtype))
        errors = {name: value.to(prediction.dtype) for name, value in errors.items()}
        errors["loss"] = sum(weight * errors[name] for name, weight in SCORE_WEIGHTS.items())
        errors["tensor_loss"] = self.tensor_loss(prediction, batch["target"], batch["mask"], batch.get("wm"))["total"]
        self.log_dict({f"val_{name}": value for name, value in errors.items()}, on_epoch=True, batch_size=1)
        return errors

    def export_release(self, path: Path | str, *, config: dict[str, Any], normalization: dict[str, Any]) -> Path:
        """Write the generator as a release checkpoint (see ``models.checkpoint``)."""
        return save_release_checkpoint(path, self.generator, config=config, stage=self.stage.name,
                                       modality=self.input_modality, normalization=normalization)

    @contextmanager
    def _step_randomness(self) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * _SEED_STRIDE + int(self.batches_trained))
            yield


def learning_rate_factor(step: int, warmup_steps: int, progress: float, schedule: str) -> float:
    """Factor on the base rate at batch ``step``: linear warm-up over ``warmup_steps``, then constant or a half
    cosine down to ``COSINE_FINAL_FRACTION`` at ``progress`` = 1 (the fraction of the run done, 0-1)."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "constant":
        return warmup
    return warmup * (COSINE_FINAL_FRACTION + (1 - COSINE_FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def reconstruction_metrics(prediction: torch.Tensor, target: torch.Tensor, loss: GeneratorLoss,
                           data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Mean L1, SSIM (3D, Gaussian window 11), PSNR (dB, 10 log10(range^2 / MSE)) and L1 + 1 - SSIM over a
    batch of (B, 6, X, Y, Z) volumes."""
    l1 = F.l1_loss(prediction, target)
    ssim = 1.0 - loss.ssim_loss(prediction, target)
    mse = F.mse_loss(prediction, target)
    psnr = 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(torch.finfo(mse.dtype).tiny))
    return {"l1": l1, "ssim": ssim, "psnr": psnr, "loss": l1 + (1.0 - ssim)}
