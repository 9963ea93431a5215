"""Training recipes as data: target coordinates, loss, network options, sampling, augmentation, validation.

Standard library only, so the command line can list them without importing torch.

``reference``: the reference method (min/max-normalised tensor, L1 + SSIM + perceptual + adversarial,
batch norm, uniform patches, bias-field and noise augmentation of the input, checkpoint chosen by L1 + SSIM on
fixed validation patches). It needs GPU-sized batches and budgets.

``log-euclidean`` (the default): what learns on a CPU budget. The network predicts log-Euclidean tensor
coordinates with the arithmetic MD on the trace (``dti.logeuclid``), trained with a Huber loss masked to the
brain, white matter weighted x3, plus a direction-free anisotropy term (an isotropic hedge no longer pays)
and an anisotropy-weighted direction term (``training.losses.TensorLoss``); no normalisation layers (CPU
batches of 1-4 make batch norm's train and eval outputs differ, and instance norm would tie the output to
the patch size); structure-tensor features of the input in every head, started as the anatomy predictor
(``training.initialisation``); 60 % of the patches centred in
white matter; no augmentation; no discriminator; AdamW with a short warm-up, gradient clipping; the
release checkpoint chosen on whole held-out volumes by the white-matter V1 angle, FA and MD errors.

``log-euclidean-azimuth-free``: the same, but nothing asks for the fibre's azimuth about B0 (the voxel z axis):
the loss and the validation turn the target about z to azimuth 0, and the pc-bSSFP cycles are
turned by a random whole number of cycles (a global off-resonance offset, which the physics maps exactly onto
that turn). For inputs that can tell a fibre's angle to B0 but not its azimuth (bSSFP where anatomy does not
give the direction, ``benchmarks/bench_modalities.py``): with the azimuth in the loss, the best a network can
do is the mean over azimuths, a tensor symmetric about B0 whose principal axis is B0 itself or lies across it,
so its angle to B0 is lost.

``log-euclidean-profile``: the default plus what the pc-bSSFP head learns tissue from: the phase-cycle profile
features and their per-voxel map (``cycle_profile``; relaxation shapes the profile, so WM and GM differ in it
where their intensities hardly do) and the random cycle turns. Other modalities train as with the default. In
the realistic simulated regime at 15 minutes per model it halved the pc-bSSFP model's white-matter MD error
(2.3 % against 4.3 % with the default, same data and steps). The packaged pc-bSSFP model's recipe
(``docs/model-card.md``).

``log-euclidean-input-shortcut``: the default, but each head's linear output shortcut also sees the head's own
input channels. For the DWI tensor (input and output both log-Euclidean) its least-squares start is the
identity, so a DT -> DT reference network starts at its input's accuracy and its UNet only learns what the
input lacks (``benchmarks/bench_modalities.py``). Not for the staged chain's autoencoder stage: a backbone
behind an identity has nothing to learn, and the head stage needs a backbone that decodes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One training recipe.

    ``tensor_transform``: target coordinates, ``"minmax"`` (components scaled to [0, 1]) or ``"log"``
    (log-Euclidean); ``loss``: ``"reference"`` (L1 + SSIM + perceptual + adversarial) or ``"tensor"``
    (``training.losses.TensorLoss``); ``norm``, ``structure_scales`` (voxels), ``dropout``: generator options;
    ``white_matter_patches``: fraction of training patches centred on a white-matter voxel (0: uniform);
    ``augmentation``: ``"input"`` (bias field on magnitude/T1w channels and noise), ``"phase-cycles"`` (the
    pc-bSSFP cycles turned by a random whole number of cycles: a global off-resonance, exact) or ``"none"``;
    ``validation``: ``"patches"`` (fixed patches, L1 + SSIM) or ``"volumes"`` (whole volumes, white-matter
    tensor errors); ``warmup_steps``: linear learning-rate warm-up (batches); ``gradient_clip``: max gradient
    norm (0: none); ``patch_size``: default training patch edge (voxels); ``learning_rate``: default rate of
    the ``direct`` stage; ``azimuth_free``: the loss and the validation compare with the target turned about
    the voxel z axis to azimuth 0 (``training.losses.canonical_azimuth``); ``cycle_profile``: the
    pc-bSSFP head also sees the per-voxel phase-cycle profile (``models.generator.PhaseCycleProfile``);
    ``input_shortcut``: each head's output shortcut also sees the head's input channels.
    """

    name: str
    tensor_transform: str
    loss: str
    norm: str
    structure_scales: tuple[float, ...]
    dropout: float | None
    white_matter_patches: float
    augmentation: str
    validation: str
    warmup_steps: int
    gradient_clip: float
    patch_size: int
    learning_rate: float | None
    azimuth_free: bool = False
    cycle_profile: bool = False
    input_shortcut: bool = False

    @property
    def adversarial(self) -> bool:
        """Whether the recipe trains a discriminator."""
        return self.loss == "reference"


RECIPES: dict[str, Recipe] = {
    "reference": Recipe("reference", tensor_transform="minmax", loss="reference", norm="batch", structure_scales=(),
                        dropout=None, white_matter_patches=0.0, augmentation="input", validation="patches",
                        warmup_steps=0, gradient_clip=0.0, patch_size=64, learning_rate=None),
    "log-euclidean": Recipe("log-euclidean", tensor_transform="log", loss="tensor", norm="none",
                            structure_scales=(1.0, 2.0), dropout=0.0, white_matter_patches=0.6, augmentation="none",
                            validation="volumes", warmup_steps=100, gradient_clip=1.0, patch_size=32,
                            learning_rate=1e-3),
}
RECIPES["log-euclidean-azimuth-free"] = dataclasses.replace(
    RECIPES["log-euclidean"], name="log-euclidean-azimuth-free", augmentation="phase-cycles", azimuth_free=True,
    cycle_profile=True)
RECIPES["log-euclidean-profile"] = dataclasses.replace(
    RECIPES["log-euclidean"], name="log-euclidean-profile", augmentation="phase-cycles", cycle_profile=True)
RECIPES["log-euclidean-input-shortcut"] = dataclasses.replace(
    RECIPES["log-euclidean"], name="log-euclidean-input-shortcut", input_shortcut=True)
DEFAULT_RECIPE = "log-euclidean"


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError listing the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown training recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
