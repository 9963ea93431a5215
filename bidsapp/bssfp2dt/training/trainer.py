"""The Lightning Trainer of a training run: device, precision, strategy, callbacks and loggers.

- Device: :func:`bssfp2dt.inference.device.resolve_device` decides (nothing here asks torch about CUDA).
  GPU: ``bf16-mixed``; CPU: ``32-true`` with deterministic algorithms (bit-exact resumption).
- DDP (``find_unused_parameters``: the head stage leaves the other heads without gradients) when more than
  one GPU or node is requested; under SLURM Lightning detects the cluster environment itself, and the
  device and node counts default to ``SLURM_NTASKS_PER_NODE`` and ``SLURM_NNODES``.
- Callbacks: early stopping on ``val_loss`` (patience 5), top-k + last checkpoints by ``val_loss``, one log
  line per epoch with the validation metrics, Lightning's progress bar.
- Loggers: CSV (``<run_dir>/metrics.csv``) always; TensorBoard and Weights & Biases when asked for and
  installed (a warning otherwise).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger

from bssfp2dt.errors import UsageError
from bssfp2dt.inference.device import resolve_device

logger = logging.getLogger(__name__)

MONITOR = "val_loss"
EARLY_STOPPING_PATIENCE = 5
TOP_K = 3
CHECKPOINT_FOLDER = "checkpoints"
VALIDATION_METRICS = ("val_loss", "val_l1", "val_ssim", "val_psnr", "val_v1_angle", "val_fa_error", "val_md_error",
                      "val_fa_ratio")


@dataclass(frozen=True)
class Hardware:
    """Where and how the run computes: Lightning's accelerator, device list/count, nodes, precision,
    strategy and whether algorithms must be deterministic."""

    accelerator: str
    devices: Any
    num_nodes: int
    precision: str
    strategy: Any
    deterministic: bool


def slurm_counts(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(devices per node, nodes) a SLURM allocation asks for (1, 1 outside SLURM): Lightning's SLURM
    environment expects ``devices`` = tasks per node and ``num_nodes`` = nodes."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        return 1, 1
    tasks = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    return max(1, int(tasks or 1)), max(1, int(environ.get("SLURM_NNODES", "1") or 1))


def hardware(device: torch.device, devices: int = 1, num_nodes: int = 1) -> Hardware:
    """Trainer settings for a resolved ``device``: ``devices`` GPUs per node x ``num_nodes`` nodes.

    A single GPU keeps its index (``cuda:N``); more than one GPU or node selects DDP. Several devices on a
    CPU are a usage error (CPU training is for tests and tiny models).
    """
    if devices < 1 or num_nodes < 1:
        raise UsageError(f"need at least one device and node, got {devices} device(s) x {num_nodes} node(s)")
    if device.type == "cuda":
        distributed = devices > 1 or num_nodes > 1
        from lightning.pytorch.strategies import DDPStrategy

        return Hardware("gpu", devices if distributed else [device.index or 0], num_nodes, "bf16-mixed",
                        DDPStrategy(find_unused_parameters=True) if distributed else "auto", False)
    if devices > 1 or num_nodes > 1:
        raise UsageError(f"{devices} device(s) x {num_nodes} node(s) requested on the CPU; distributed training "
                         "needs GPUs (--device cuda)")
    return Hardware("cpu", 1, 1, "32-true", "auto", True)


class EpochSummary(Callback):
    """One INFO line per epoch with the validation metrics (and the training loss when logged)."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        parts = [f"{name}={float(metrics[name]):.5g}" for name in VALIDATION_METRICS if name in metrics]
        if "train_total_epoch" in metrics:
            parts.append(f"train_total={float(metrics['train_total_epoch']):.5g}")
        logger.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, ", ".join(parts))


def build_loggers(run_dir: Path, extra: Sequence[str] = (), run_name: str | None = None) -> list[Logger]:
    """CSVLogger writing ``run_dir/metrics.csv``, plus ``"tensorboard"``/``"wandb"`` when asked and installed."""
    # The run folder already holds split.json and config.toml; the CSV logger replaces only metrics.csv.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    for name in extra:
        if name == "tensorboard":
            try:
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
            except ModuleNotFoundError:
                logger.warning("TensorBoard logging asked for but tensorboard is not installed: skipped")
        elif name == "wandb":
            try:
                import wandb  # noqa: F401  (only to test that it is installed)
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(WandbLogger(save_dir=str(run_dir), name=run_name, project="bssfp2dt"))
            except ModuleNotFoundError:
                logger.warning("Weights & Biases logging asked for but wandb is not installed: skipped")
        else:
            raise UsageError(f"unknown logger {name!r}; use tensorboard or wandb")
    return loggers


def build_trainer(run_dir: Path | str, *, max_epochs: int, device: str | torch.device = "auto",
                  devices: int | None = None, num_nodes: int | None = None, extra_loggers: Sequence[str] = (),
                  patience: int = EARLY_STOPPING_PATIENCE, top_k: int = TOP_K, progress_bar: bool = True,
                  max_steps: int = -1, log_every_n_steps: int = 10, num_sanity_val_steps: int = 1) -> L.Trainer:
    """The Trainer of one run writing under ``run_dir`` (``checkpoints/``, ``metrics.csv``).

    ``device``: a ``--device`` spec or a resolved device; ``devices``/``num_nodes``: GPUs per node and nodes
    (default: the SLURM allocation, else 1). Training data modules must be reloaded every epoch
    (``TrainingData`` draws each epoch's patches from a stream seeded by the epoch).
    """
    run_dir = Path(run_dir)
    resolved = device if isinstance(device, torch.device) else resolve_device(device)
    slurm_devices, slurm_nodes = slurm_counts()
    settings = hardware(resolved, devices or slurm_devices, num_nodes or slurm_nodes)
    checkpoints = ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_FOLDER), monitor=MONITOR, mode="min",
                                  save_top_k=top_k, save_last=True, auto_insert_metric_name=False,
                                  filename="epoch{epoch:03d}-val_loss{val_loss:.5f}")
    callbacks: list[Callback] = [checkpoints, EarlyStopping(monitor=MONITOR, mode="min", patience=patience),
                                 EpochSummary()]
    if progress_bar:
        callbacks.append(TQDMProgressBar())
    logger.info("trainer: %s x %s device(s) x %d node(s), precision %s, strategy %s", settings.accelerator,
                settings.devices, settings.num_nodes, settings.precision,
                settings.strategy if isinstance(settings.strategy, str) else type(settings.strategy).__name__)
    return L.Trainer(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
                     precision=settings.precision, strategy=settings.strategy, deterministic=settings.deterministic,
                     max_epochs=max_epochs, max_steps=max_steps, callbacks=callbacks,
                     logger=build_loggers(run_dir, extra_loggers, run_dir.name), default_root_dir=str(run_dir),
                     enable_progress_bar=progress_bar, enable_model_summary=False,
                     reload_dataloaders_every_n_epochs=1, log_every_n_steps=log_every_n_steps,
                     num_sanity_val_steps=num_sanity_val_steps)


def best_checkpoint(trainer: L.Trainer) -> Path | None:
    """The top checkpoint by ``val_loss`` of a finished fit, or None when none was saved."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return Path(path) if path else None
