"""Training data: session cross-pairing, the subject split, normalisation and the TorchIO patch queues.

Pairing (DOVE: 3 bSSFP x 4 DWI sessions = 12 pairs per subject): every input session of a subject is
paired with every DWI session of the same subject. Input sessions are the bSSFP sessions (``pc-bssfp``,
``bssfp``), the distinct T1w images (``t1w``) or, in the autoencoder stage (``dwi-tensor``), the DWI
sessions themselves, each paired only with itself (the autoencoder reproduces its input).

All sessions of a subject live on the common T1w grid (see ``preprocessing.workflow``). Every volume is
cropped to the bounding box of the pair's brain mask (input and target masks intersected), padded at the
far end to at least the patch size, and normalised with the dataset-wide ranges fitted on the training
subjects only. A TorchIO subject holds ``input`` (C, X, Y, Z), ``target`` (6, X, Y, Z) and ``mask``
(1, X, Y, Z) with C = 24 (pc-bssfp, bssfp), 6 (t1w replicated, dwi-tensor).

Randomness: the training queue of epoch e draws subject order, patch positions, patch shuffling and
augmentation from a private stream seeded by (seed, e), so an epoch's batches do not depend on the
process's history (exact resumption); validation uses the same fixed patches every epoch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import nibabel as nib
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Sampler

from bssfp2dt import modalities
from bssfp2dt.config import TrainingSettings, field_default
from bssfp2dt.errors import UsageError
from bssfp2dt.models.generator import MODALITY_CHANNELS, PATCH_MULTIPLE, TENSOR_CHANNELS
from bssfp2dt.preprocessing import normalization as norm
from bssfp2dt.preprocessing.bssfp import deinterleave_channels
from bssfp2dt.preprocessing.network_input import network_channels
from bssfp2dt.training.recipes import RECIPES, Recipe

logger = logging.getLogger(__name__)

QUEUE_MAX_LENGTH = 16
SAMPLES_PER_VOLUME = 8
VALIDATION_SAMPLES_PER_VOLUME = 4
DEFAULT_CACHE_MB = 4096.0  # loaded training subjects kept in memory (half of --mem when given)
DEFAULT_FRACTIONS = field_default(TrainingSettings, "split_fractions")  # train, validation, test (by subject)
_EPOCH_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs give distinct stream seeds
_VALIDATION_STREAM = -1  # the "epoch" of the fixed validation patches


# --------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class TrainingPair:
    """One (input session, DWI session) pair of a subject; paths of float32 NIfTIs on the common grid.

    ``input_path``: bSSFP (X, Y, Z, 24), T1w (X, Y, Z) or tensor (X, Y, Z, 6); ``target_path``: tensor
    (X, Y, Z, 6) in mm^2/s; ``mask_paths``: the brain masks of both sessions (intersected);
    ``white_matter_path``: the WM probability (X, Y, Z) on the same grid (loss weights, patch sampling and
    white-matter validation metrics), or None.
    """

    subject: str
    input_session: str | None
    target_session: str | None
    input_path: Path
    target_path: Path
    mask_paths: tuple[Path, ...]
    white_matter_path: Path | None = None

    def describe(self) -> str:
        return f"sub-{self.subject} ses-{self.input_session} -> ses-{self.target_session}"


def input_sessions(subject, modality: str) -> list[tuple[Any, Path]]:
    """(preprocessed session, input image path) of every input session of ``modality`` in ``subject``.

    ``subject``: :class:`bssfp2dt.preprocessing.sessions.PreprocessedSubject`. T1w sessions sharing one
    T1w image count once.
    """
    spec = modalities.BY_NAME.get(modality)
    if spec is not None:
        seen: dict[Path, Any] = {}  # sessions sharing one image (the subject's T1w) count once
        for session in subject.sessions:
            image = getattr(session, spec.source)
            if image is not None:
                seen.setdefault(Path(image), session)
        return [(session, path) for path, session in seen.items()]
    raise UsageError(f"--input-modality {modality!r} cannot be trained; use one of {', '.join(MODALITY_CHANNELS)}")


def pair_sessions(subject, modality: str) -> list[TrainingPair]:
    """Every input session of ``modality`` x every DWI session of the same subject (autoencoder: itself)."""
    targets = [session for session in subject.sessions if session.tensor is not None]
    pairs = []
    for source, path in input_sessions(subject, modality):
        partners = [source] if modality == modalities.AUTOENCODER.name else targets
        for target in partners:
            if not _same_grid(source.brain_mask, target.brain_mask):
                logger.warning("sub-%s: ses-%s and ses-%s are on different grids (different T1w images): not "
                               "paired", subject.subject, source.session, target.session)
                continue
            pairs.append(TrainingPair(subject.subject, source.session, target.session, Path(path),
                                      Path(target.tensor), (Path(source.brain_mask), Path(target.brain_mask)),
                                      Path(source.wm)))
    return pairs


def _same_grid(first: Path, second: Path) -> bool:
    if Path(first) == Path(second):
        return True
    a, b = nib.load(str(first)), nib.load(str(second))
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)


def pair_subjects(subjects: Iterable, modality: str) -> list[TrainingPair]:
    """:func:`pair_sessions` of every subject, in order; warns about subjects that give no pair."""
    pairs = []
    for subject in subjects:
        found = pair_sessions(subject, modality)
        if not found:
            logger.warning("sub-%s: no %s session with a DWI session to pair: not used for training",
                           subject.subject, modality)
        pairs.extend(found)
    return pairs


# --------------------------------------------------------------------------- split
@dataclass(frozen=True)
class Split:
    """Subject labels per part; ``seed`` and ``fractions`` (train, validation, test) reproduce it."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    fractions: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "validation": list(self.validation), "test": list(self.test),
                "seed": self.seed, "fractions": list(self.fractions)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "Split":
        return cls(tuple(payload["train"]), tuple(payload["validation"]), tuple(payload["test"]),
                   int(payload["seed"]), tuple(float(f) for f in payload["fractions"]))

    def save(self, path: Path | str) -> Path:
        """Write ``split.json`` (atomically)."""
        from bssfp2dt.io.nifti import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path | str) -> "Split":
        return cls.from_dict(json.loads(Path(path).read_text()))


def split_subjects(labels: Sequence[str], seed: int,
                   fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Split:
    """Split subject labels into train/validation/test with a seeded permutation of the sorted labels.

    Sizes: validation = round(f_val n), test = round(f_test n), train = the rest, with these rules for
    small n: train keeps at least one subject; validation gets one subject whenever n >= 2 (early stopping
    and checkpoint selection need it), taken from test first, then from train; with a single subject
    validation reuses the training subject (warned: the validation loss is then not independent).
    The result depends only on the set of labels, the seed and the fractions.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise UsageError(f"split fractions {fractions} must be three non-negative numbers summing to 1, "
                         "with a positive training fraction")
    ordered = sorted(set(labels))
    n = len(ordered)
    if n == 0:
        raise UsageError("training needs at least one subject with paired input and DWI sessions")
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    while n_val + n_test > n - 1:  # keep one subject for training
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    if n >= 2 and n_val == 0:
        if n_test > 0:
            n_test -= 1
        n_val = 1
    n_train = n - n_val - n_test
    train = tuple(permuted[:n_train])
    validation = tuple(permuted[n_train:n_train + n_val])
    test = tuple(permuted[n_train + n_val:])
    if not validation:
        logger.warning("only one subject (sub-%s): validation reuses the training subject, so the validation "
                       "loss is not independent", train[0])
        validation = train
    return Split(train, validation, test, int(seed), fractions)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- normalisation
def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _merge(first: norm.Range | None, second: norm.Range | None) -> norm.Range | None:
    if first is None or second is None:
        return first or second
    return norm.Range(min(first.low, second.low), max(first.high, second.high))


def fit_training_normalization(subjects: Iterable, base: norm.Normalization | None = None,
                               tensor_transform: str = "minmax") -> norm.Normalization:
    """Dataset-wide min/max ranges (the reference method) over the training subjects' in-mask voxels.

    Fitted session by session and merged (min of lows, max of highs), so memory stays one session.
    Groups already in ``base`` (e.g. the tensor ranges of the checkpoint a stage starts from) are kept
    unchanged, since the network learned to produce that scale; only missing groups are fitted; so is
    ``base``'s tensor transform (otherwise ``tensor_transform``, see :class:`Normalization`).
    ``subjects``: PreprocessedSubject objects of the training split.
    """
    base = base or norm.Normalization()
    fitted: dict[str, norm.Range | None] = {group: None for group in norm.GROUPS}
    seen_t1w: set[Path] = set()
    for subject in subjects:
        for session in subject.sessions:
            mask = _load(session.brain_mask) > 0
            if not mask.any():
                continue
            parts: dict[str, Any] = {}
            if session.bssfp is not None:
                magnitude, phase = deinterleave_channels(_load(session.bssfp))
                parts.update(magnitudes=[magnitude], phases=[phase])
            if session.tensor is not None:
                parts["tensors"] = [_load(session.tensor)]
            if Path(session.t1w) not in seen_t1w:
                seen_t1w.add(Path(session.t1w))
                parts["t1ws"] = [_load(session.t1w)]
            ranges = norm.fit_normalization(masks=[mask], **parts)
            for group in norm.GROUPS:
                fitted[group] = _merge(fitted[group], getattr(ranges, group))
    groups = {group: getattr(base, group) if getattr(base, group) is not None else fitted[group]
              for group in norm.GROUPS}
    transform = base.tensor_transform if base.tensor_diagonal is not None else tensor_transform
    return norm.Normalization(percentiles=base.percentiles, tensor_transform=transform, **groups)


def mean_normalised_target(pairs: Sequence[TrainingPair], normalization: norm.Normalization) -> np.ndarray:
    """Mean of each normalised tensor component (6,) over the in-mask voxels of the pairs' target sessions
    (each DWI session counted once): the value a network should output before it has learned anything."""
    total, count = np.zeros(TENSOR_CHANNELS), 0
    for target in sorted({pair.target_path for pair in pairs}):
        mask_path = next(pair.mask_paths[-1] for pair in pairs if pair.target_path == target)
        mask = _load(mask_path) > 0
        tensor = norm.normalize_tensor(_load(target), normalization, mask)
        total += tensor[mask].sum(axis=0, dtype=np.float64)
        count += int(mask.sum())
    if count == 0:
        raise UsageError("the training pairs have no brain voxels: check the brain masks of the training subjects")
    return total / count


# --------------------------------------------------------------------------- volumes
def mask_bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[tuple[int, int], ...]:
    """((start, stop) per axis) of the non-zero voxels of ``mask`` (X, Y, Z), grown by ``margin`` voxels
    and clipped to the volume; the whole volume for an empty mask."""
    where = np.argwhere(mask)
    if where.size == 0:
        return tuple((0, side) for side in mask.shape)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + 1 + margin, mask.shape)
    return tuple((int(a), int(b)) for a, b in zip(low, high))


@dataclass(frozen=True)
class VolumeReader:
    """TorchIO reader (``path -> (C, X, Y, Z) float32 tensor, affine``) for one role of one pair.

    ``role``: "input", "target", "mask", "wm" (white-matter probability, 0 outside the mask) or "sampling" (patch-
    centre probabilities: ``white_matter_patches`` of the mass on WM voxels, p > 0.5, the rest spread over the
    brain); ``modality``: the input modality; ``normalization``: the
    :meth:`Normalization.to_dict` ranges; the volume is cropped to ``box`` and zero-padded at the far end
    to at least ``min_shape``. A picklable dataclass so queue workers can load lazily.
    """

    role: str
    modality: str
    normalization: dict = field(hash=False, compare=False)
    mask_paths: tuple[Path, ...]
    box: tuple[tuple[int, int], ...]
    min_shape: tuple[int, int, int]
    white_matter_patches: float = 0.0

    def __call__(self, path) -> tuple[torch.Tensor, np.ndarray]:
        image = nib.load(str(path))
        mask = self.mask()
        if self.role == "mask":
            channels = mask[None].astype(np.float32)
        elif self.role in ("wm", "sampling"):
            channels = self.white_matter(np.asarray(image.dataobj, dtype=np.float32), mask)[None]
        else:
            channels = self.normalised(np.asarray(image.dataobj, dtype=np.float32), mask)
        slices = tuple(slice(a, b) for a, b in self.box)
        cropped = channels[(slice(None),) + slices]
        padding = [(0, 0)] + [(0, max(0, want - have)) for want, have in zip(self.min_shape, cropped.shape[1:])]
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([a for a, _ in self.box]) + image.affine[:3, 3]
        return torch.from_numpy(np.ascontiguousarray(np.pad(cropped, padding))), affine

    def mask(self) -> np.ndarray:
        """The pair's brain mask (X, Y, Z) bool: the intersection of both sessions' masks."""
        masks = [_load(path) > 0 for path in self.mask_paths]
        return np.logical_and.reduce(masks)

    def white_matter(self, probability: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The WM probability (role "wm") or the patch-centre probabilities (role "sampling"), (X, Y, Z)."""
        probability = np.clip(np.nan_to_num(probability), 0.0, 1.0) * mask
        if self.role == "wm":
            return probability.astype(np.float32)
        brain, white = mask.astype(np.float64), (probability > 0.5).astype(np.float64)
        fraction = self.white_matter_patches if white.any() else 0.0
        sampling = (1.0 - fraction) * brain / max(brain.sum(), 1.0) + fraction * white / max(white.sum(), 1.0)
        return sampling.astype(np.float32)

    def normalised(self, volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The network channels (C, X, Y, Z) in [0, 1], zero outside ``mask``."""
        params = norm.Normalization.from_dict(self.normalization)
        if self.role == "target":
            channels = np.moveaxis(norm.normalize_tensor(volume, params, mask), -1, 0)
        else:
            channels = network_channels(volume, self.modality, params, mask)
        expected = TENSOR_CHANNELS if self.role == "target" else MODALITY_CHANNELS[self.modality]
        if channels.shape[0] != expected:
            raise UsageError(f"{self.role} volume has {channels.shape[0]} channels, {self.modality} needs "
                             f"{expected}; rerun the preprocessing")
        return channels.astype(np.float32)


def pair_subject(pair: TrainingPair, modality: str, normalization: norm.Normalization,
                 patch_size: int, white_matter_patches: float = 0.0) -> tio.Subject:
    """The lazy TorchIO subject of ``pair``: ``input``, ``target`` (ScalarImage) and ``mask`` (LabelMap), plus
    ``wm`` and ``sampling`` (ScalarImage) when the pair has a white-matter map. The crop box is padded at the
    far end to at least ``patch_size`` and to a multiple of ``PATCH_MULTIPLE`` (whole-volume validation)."""
    mask = np.logical_and.reduce([_load(path) > 0 for path in pair.mask_paths])
    box = mask_bounding_box(mask)
    min_shape = tuple(max(patch_size, -(-(b - a) // PATCH_MULTIPLE) * PATCH_MULTIPLE) for a, b in box)
    common = dict(modality=modality, normalization=normalization.to_dict(), mask_paths=pair.mask_paths,
                  box=box, min_shape=min_shape, white_matter_patches=white_matter_patches)
    images = dict(input=tio.ScalarImage(pair.input_path, reader=VolumeReader("input", **common)),
                  target=tio.ScalarImage(pair.target_path, reader=VolumeReader("target", **common)),
                  mask=tio.LabelMap(pair.mask_paths[-1], reader=VolumeReader("mask", **common)))
    if pair.white_matter_path is not None:
        images["wm"] = tio.ScalarImage(pair.white_matter_path, reader=VolumeReader("wm", **common))
        images["sampling"] = tio.ScalarImage(pair.white_matter_path, reader=VolumeReader("sampling", **common))
    return tio.Subject(**images, subject=pair.subject, input_session=str(pair.input_session),
                       target_session=str(pair.target_session))


def estimated_bytes(subject: tio.Subject) -> int:
    """Memory (bytes) of ``subject``'s float32 channels once loaded, from the readers' crop boxes."""
    total = 0
    for image in subject.get_images(intensity_only=False):
        reader = image.reader
        side = [max(b - a, want) for (a, b), want in zip(reader.box, reader.min_shape)]
        channels = {"mask": 1, "wm": 1, "sampling": 1, "target": TENSOR_CHANNELS}.get(
            reader.role, MODALITY_CHANNELS[reader.modality])
        total += 4 * channels * int(np.prod(side))
    return total


def volume_bytes(subject: tio.Subject) -> int:
    """Memory (bytes) of a loaded subject's tensors."""
    return sum(image.data.element_size() * image.data.numel() for image in subject.get_images(intensity_only=False))


BIAS_FIELD_COEFFICIENTS = 0.15  # a smooth field of about x0.8-x1.2, as a receive coil gives; never on phase


class MagnitudeBiasField(tio.transforms.Transform):
    """Multiply the intensity channels of ``input`` (bSSFP magnitudes, T1w) by one random smooth field
    (TorchIO's polynomial bias field, order 3, coefficients in +-``BIAS_FIELD_COEFFICIENTS``) with
    probability ``p``; bSSFP phase channels (odd indices of the interleaved 24) stay untouched, since a
    phase is not an intensity, and the tensor target is never touched."""

    def __init__(self, modality: str, p: float = 0.25, coefficients: float = BIAS_FIELD_COEFFICIENTS, **kwargs):
        super().__init__(p=p, **kwargs)
        self.modality = modality
        self.coefficients = coefficients

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["input"]
        data = image.data
        groups = modalities.get(self.modality).groups
        channels = (list(range(0, data.shape[0], 2)) if "magnitude" in groups  # interleaved magnitude/phase
                    else list(range(data.shape[0])) if "t1w" in groups else [])
        updated = data.clone()
        updated[channels] = data[channels] * polynomial_bias_field(data.shape[1:], self.coefficients)
        image.set_data(updated)
        return subject


def polynomial_bias_field(shape, coefficients: float, order: int = 3) -> torch.Tensor:
    """exp(sum_ijk c_ijk x^i y^j z^k), i + j + k <= ``order``, on coordinates in [-1, 1], with c_ijk uniform in
    +-``coefficients`` from torch's global generator (the queue seeds it): TorchIO's bias-field model,
    (X, Y, Z) float32."""
    axes = [torch.linspace(-1.0, 1.0, int(n)) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    log_field = torch.zeros(tuple(int(n) for n in shape))
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                coefficient = (2.0 * torch.rand(()) - 1.0) * coefficients
                log_field += coefficient * x ** i * y ** j * z ** k
    return torch.exp(log_field)


class PhaseCycleTurn(tio.transforms.Transform):
    """Turn the phase cycles of a pc-bSSFP ``input`` (interleaved magnitude/phase, C cycles) by a random whole
    number of cycles k (uniform in 0..C-1): channel pair j takes pair (j + k) mod C.

    Physics: a global off-resonance offset of k / (C TR) moves every voxel's phase-cycle profile by exactly k
    cycles; the phase it adds at TE is the same in every voxel and is removed with each cycle's global phase
    in preprocessing. So the turn shows the network other shims without changing the tissue it sees."""

    def __init__(self, modality: str, **kwargs):
        super().__init__(**kwargs)
        self.modality = modality

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if not modalities.get(self.modality).phase_cycled:
            return subject
        image = subject["input"]
        cycles = image.data.shape[0] // 2
        shift = int(torch.randint(cycles, ()))
        image.set_data(torch.roll(image.data, shifts=-2 * shift, dims=0))
        return subject


def augmentation(modality: str, kind: str = "input") -> tio.Compose | None:
    """Input-only augmentation: ``"input"`` (the reference method's bias field, here on intensity channels only
    with realistic coefficients, p 0.25, and Gaussian noise std 0-0.01, p 0.25), ``"phase-cycles"``
    (:class:`PhaseCycleTurn`, pc-bSSFP only) or ``"none"``."""
    if kind == "none":
        return None
    if kind == "phase-cycles":
        return tio.Compose([PhaseCycleTurn(modality)])
    return tio.Compose([MagnitudeBiasField(modality, p=0.25),
                        tio.RandomNoise(std=(0.0, 0.01), p=0.25, include=["input"])])


def check_patch_size(patch_size: int) -> int:
    """``patch_size`` (voxels) if it is a positive multiple of 16; UsageError naming ``--patch-size`` otherwise."""
    if patch_size <= 0 or patch_size % PATCH_MULTIPLE:
        raise UsageError(f"--patch-size {patch_size} must be a positive multiple of {PATCH_MULTIPLE} "
                         f"(the network halves the patch four times)")
    return patch_size


# --------------------------------------------------------------------------- queues
class _SeededOrder(Sampler[int]):
    """A fixed permutation of ``range(n)`` drawn from ``seed`` (identity when ``shuffle`` is False)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        self.order = order.tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class SeededQueue(tio.Queue):
    """A :class:`torchio.Queue` whose randomness (patch positions, patch shuffling, augmentation, worker
    seeds) comes from a private stream seeded by ``stream_seed``, not from the process's global state."""

    def __init__(self, subjects_dataset: tio.SubjectsDataset, stream_seed: int, shuffle: bool, **options):
        super().__init__(subjects_dataset, subject_sampler=_SeededOrder(len(subjects_dataset), stream_seed, shuffle),
                         shuffle_subjects=False, shuffle_patches=shuffle, start_background=False, **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed)
            self._rng_state = torch.get_rng_state()

    def __iter__(self):
        # tio.Queue refills forever, so the sequence protocol alone would never stop: one epoch, then stop.
        return (self[index] for index in range(len(self)))

    def _fill(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            super()._fill()
            self._rng_state = torch.get_rng_state()


def collate_patches(patches: list[dict]) -> dict[str, torch.Tensor]:
    """TorchIO patches -> {"input": (B, C, P, P, P), "target": (B, 6, P, P, P), "mask": (B, 1, P, P, P)},
    plus "wm" (B, 1, P, P, P) when the patches carry a white-matter map."""
    keys = ("input", "target", "mask") + (("wm",) if "wm" in patches[0] else ())
    return {key: torch.stack([patch[key][tio.DATA] for patch in patches]) for key in keys}


def collate_volumes(subjects: list[tio.Subject]) -> dict[str, torch.Tensor]:
    """Whole TorchIO subjects (loaded on access) -> the :func:`collate_patches` layout."""
    return collate_patches([{key: subject[key] for key in subject.get_images_names()} for subject in subjects])


class TrainingData(L.LightningDataModule):
    """Patch loaders of one run: a fresh epoch-seeded training queue each epoch, fixed validation patches.

    ``train_pairs``/``validation_pairs``: :class:`TrainingPair` lists; ``modality``: the input modality;
    ``patch_size``: cubic edge (voxels, multiple of 16); ``num_workers``: subject-loading processes of the
    queue (0: the main process). Use with ``reload_dataloaders_every_n_epochs=1`` (see ``trainer.py``).
    The normalisation and the split travel in Lightning checkpoints through :meth:`state_dict`.
    Resuming from an epoch-end checkpoint (what ``trainer.py`` writes) repeats the uninterrupted run exactly;
    a mid-epoch checkpoint would restart that epoch's patch stream from its beginning.
    """

    def __init__(self, train_pairs: Sequence[TrainingPair], validation_pairs: Sequence[TrainingPair], modality: str,
                 normalization: norm.Normalization, *, patch_size: int = 64, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, split: Split | None = None,
                 samples_per_volume: int = SAMPLES_PER_VOLUME, max_length: int = QUEUE_MAX_LENGTH,
                 validation_samples_per_volume: int = VALIDATION_SAMPLES_PER_VOLUME,
                 cache_mb: float = DEFAULT_CACHE_MB, recipe: Recipe | None = None):
        super().__init__()
        self.recipe = recipe or RECIPES["reference"]
        if not train_pairs:
            raise UsageError("no training pair: the training subjects have no input session with a DWI session")
        self.train_pairs = list(train_pairs)
        self.validation_pairs = list(validation_pairs)
        self.modality = modality
        self.normalization = normalization
        self.patch_size = check_patch_size(patch_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.split = split
        self.samples_per_volume = samples_per_volume
        self.max_length = max(max_length, samples_per_volume)
        self.validation_samples_per_volume = validation_samples_per_volume
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: dict[TrainingPair, tio.Subject] = {}

    def subjects(self, pairs: Sequence[TrainingPair]) -> list[tio.Subject]:
        """The TorchIO subjects of ``pairs``: loaded ones from the cache, the others lazy."""
        return [self._cache.get(pair) or self._load_into_cache(pair) for pair in pairs]

    def _load_into_cache(self, pair: TrainingPair) -> tio.Subject:
        """Load and normalise ``pair`` once and keep it while the cache has room (``cache_mb``): reading and
        normalising a 24-channel session takes seconds, as long as training on all of its patches on a CPU.
        Subjects that do not fit stay lazy (read again by the queue's workers each epoch)."""
        subject = pair_subject(pair, self.modality, self.normalization, self.patch_size,
                               self.recipe.white_matter_patches)
        used = sum(volume_bytes(cached) for cached in self._cache.values())
        if used + estimated_bytes(subject) > self.cache_bytes:
            return subject
        subject.load()
        self._cache[pair] = subject
        return subject

    def training_volumes(self, limit: int = 8) -> list[dict[str, torch.Tensor]]:
        """Whole loaded volumes of up to ``limit`` training pairs (one per subject first) as dicts of (C, X, Y, Z)
        tensors, for data-driven initialisation (``training.initialisation``)."""
        first_per_subject = list({pair.subject: pair for pair in self.train_pairs}.values())[:limit]
        return [{name: subject[name].data for name in subject.get_images_names()}
                for subject in self.subjects(first_per_subject)]

    def train_queue(self, epoch: int) -> SeededQueue:
        """The training queue of ``epoch``: shuffled subjects, patches (uniform, or weighted towards white
        matter by the recipe), the recipe's augmentation."""
        dataset = tio.SubjectsDataset(self.subjects(self.train_pairs),
                                      transform=augmentation(self.modality, self.recipe.augmentation))
        weighted = self.recipe.white_matter_patches > 0 and all(p.white_matter_path for p in self.train_pairs)
        sampler = (tio.WeightedSampler(self.patch_size, probability_map="sampling") if weighted
                   else tio.UniformSampler(self.patch_size))
        return SeededQueue(dataset, self.seed * _EPOCH_STRIDE + epoch, True, max_length=self.max_length,
                           samples_per_volume=self.samples_per_volume, sampler=sampler, num_workers=self.num_workers)

    def validation_queue(self) -> SeededQueue:
        """The fixed validation patches: same subjects order, positions and values every epoch."""
        dataset = tio.SubjectsDataset(self.subjects(self.validation_pairs))
        return SeededQueue(dataset, self.seed * _EPOCH_STRIDE + _VALIDATION_STREAM, False,
                           max_length=max(self.max_length, self.validation_samples_per_volume),
                           samples_per_volume=self.validation_samples_per_volume,
                           sampler=tio.UniformSampler(self.patch_size), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        # The queue is a map-style dataset that must be read in order by a single process.
        return DataLoader(self.train_queue(epoch), batch_size=self.batch_size, num_workers=0,
                          collate_fn=collate_patches)

    def val_dataloader(self) -> DataLoader | list:
        if not self.validation_pairs:
            return []
        if self.recipe.validation == "volumes":
            # Whole cropped volumes, one per batch: the white-matter errors need every WM voxel of a subject.
            return DataLoader(self.subjects(self.validation_pairs), batch_size=1, num_workers=0,
                              collate_fn=collate_volumes)
        return DataLoader(self.validation_queue(), batch_size=self.batch_size, num_workers=0,
                          collate_fn=collate_patches)

    def state_dict(self) -> dict[str, Any]:
        return {"normalization": self.normalization.to_dict(), "modality": self.modality,
                "split": None if self.split is None else self.split.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = norm.Normalization.from_dict(state_dict["normalization"])
        if saved != self.normalization:
            logger.warning("resumed checkpoint was trained with another normalisation; using the checkpoint's")
            self.normalization = saved
