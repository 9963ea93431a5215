"""Dataset-wide intensity normalisation to [0, 1], fitted on the training subjects.

The reference method scales, across the whole training set: bSSFP magnitude and phase each to
[0, 1]; the tensor's diagonal (D11, D22, D33) and off-diagonal (D12, D13, D23) elements separately
to [0, 1]; T1w to [0, 1]. The fitted ranges are a small frozen dataclass that serialises to a
JSON-able dict (it travels inside checkpoints, so inference needs nothing else) and to a JSON file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from bssfp2dt.errors import InputOutputError, MissingInputError, UsageError

logger = logging.getLogger(__name__)

#: BEP016 component positions of the tensor's diagonal and off-diagonal elements.
DIAGONAL = (0, 3, 5)
OFF_DIAGONAL = (1, 2, 4)
#: Groups a :class:`Normalization` can hold, in their serialised order.
GROUPS = ("magnitude", "phase", "tensor_diagonal", "tensor_offdiagonal", "t1w")
TENSOR_TRANSFORMS = ("minmax", "log")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Range:
    """A fitted value range: ``low`` maps to 0 and ``high`` to 1 (input units)."""

    low: float
    high: float

    def __post_init__(self):
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise UsageError(f"normalisation range needs finite low < high, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Normalization:
    """Dataset-wide normalisation ranges (None for a group not fitted).

    Attributes:
        magnitude: bSSFP magnitude (scanner units).
        phase: bSSFP phase (radians).
        tensor_diagonal: D11, D22, D33 (mm^2/s).
        tensor_offdiagonal: D12, D13, D23 (mm^2/s).
        t1w: T1w intensity (scanner units).
        percentiles: the (low, high) percentiles the ranges were fitted with ((0, 100) = min/max).
        tensor_transform: how tensors become network values: ``"minmax"`` (the reference method: diagonal
            and off-diagonal ranges to [0, 1]) or ``"log"`` (log-Euclidean coordinates logm(D / 1e-3 mm^2/s),
            see :mod:`bssfp2dt.dti.logeuclid`; the ranges are then not used for tensors).
    """

    magnitude: Range | None = None
    phase: Range | None = None
    tensor_diagonal: Range | None = None
    tensor_offdiagonal: Range | None = None
    t1w: Range | None = None
    percentiles: tuple[float, float] = field(default=(0.0, 100.0))
    tensor_transform: str = "minmax"

    def __post_init__(self):
        if self.tensor_transform not in TENSOR_TRANSFORMS:
            raise UsageError(f"unknown tensor transform {self.tensor_transform!r}; use one of {TENSOR_TRANSFORMS}")

    def to_dict(self) -> dict:
        """JSON-able dict: ``{"version", "percentiles", "<group>": {"low", "high"} | None}``."""
        payload = {"version": FORMAT_VERSION, "percentiles": [float(p) for p in self.percentiles],
                   "tensor_transform": self.tensor_transform}
        for group in GROUPS:
            value = getattr(self, group)
            payload[group] = None if value is None else {"low": float(value.low), "high": float(value.high)}
        return payload

    @classmethod
    def from_dict(cls, payload: dict) -> "Normalization":
        """Inverse of :meth:`to_dict`; raises UsageError on an unknown version or malformed entry."""
        if payload.get("version") != FORMAT_VERSION:
            raise UsageError(f"normalisation parameters have version {payload.get('version')!r}, "
                             f"this bssfp2dt reads version {FORMAT_VERSION}: refit or use a matching release")
        try:
            groups = {group: None if payload.get(group) is None
                      else Range(float(payload[group]["low"]), float(payload[group]["high"]))
                      for group in GROUPS}
            low, high = payload.get("percentiles", (0.0, 100.0))
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"malformed normalisation parameters ({error}): refit them") from error
        return cls(percentiles=(float(low), float(high)), tensor_transform=payload.get("tensor_transform", "minmax"),
                   **groups)

    def save(self, path: Path | str) -> Path:
        """Write the parameters to a JSON file (atomically)."""
        from bssfp2dt.io.nifti import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path | str) -> "Normalization":
        """Read parameters written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"normalisation file {path} not found: fit it on the training set first")
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputOutputError(f"cannot read normalisation file {path} ({error})") from error
        return cls.from_dict(payload)

    def require(self, group: str) -> Range:
        """The range of ``group``, or a UsageError saying it was not fitted."""
        value = getattr(self, group)
        if value is None:
            raise UsageError(f"the normalisation has no '{group}' range: fit it with that modality's data")
        return value


def _masked_values(volume: np.ndarray, mask: np.ndarray | None,
                   channels: tuple[int, ...] | None = None) -> np.ndarray:
    volume = np.asarray(volume)
    if channels is not None:
        volume = volume[..., list(channels)]
    if mask is None:
        return volume.reshape(-1)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape[:mask.ndim]:
        raise UsageError(f"mask shape {mask.shape} does not match the volume {volume.shape}")
    return volume[mask].reshape(-1)


def fit_range(volumes: Iterable[np.ndarray], masks: Iterable[np.ndarray | None] | None = None,
              percentiles: tuple[float, float] = (0.0, 100.0),
              channels: tuple[int, ...] | None = None) -> Range:
    """Dataset-wide range of the in-mask values of several subjects.

    With the default (0, 100) the range is the global min/max (the reference method), computed
    subject by subject; other percentiles pool the in-mask values of all subjects (float32) for an
    exact dataset-wide percentile, which is robust to a few outlier voxels.

    Args:
        volumes: per-subject arrays ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        masks: per-subject boolean ``(X, Y, Z)`` (or None entries / None = every voxel).
        percentiles: (low, high) in [0, 100].
        channels: last-axis channels to use (e.g. the tensor diagonal), or None for all.
    Returns:
        the fitted :class:`Range` (input units).
    """
    low_p, high_p = percentiles
    if not 0.0 <= low_p < high_p <= 100.0:
        raise UsageError(f"normalisation percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    volumes = list(volumes)
    masks = [None] * len(volumes) if masks is None else list(masks)
    if not volumes or len(masks) != len(volumes):
        raise UsageError("normalisation needs at least one training subject and one mask per subject")
    values = [_masked_values(v, m, channels) for v, m in zip(volumes, masks)]
    if not any(v.size for v in values):
        raise UsageError("the masks select no voxels: cannot fit a normalisation range")
    if (low_p, high_p) == (0.0, 100.0):
        return Range(float(min(v.min() for v in values if v.size)), float(max(v.max() for v in values if v.size)))
    pooled = np.concatenate([v.astype(np.float32) for v in values])
    low, high = np.percentile(pooled, [low_p, high_p])
    return Range(float(low), float(high))


def fit_normalization(magnitudes=None, phases=None, tensors=None, t1ws=None, masks=None,
                      percentiles: tuple[float, float] = (0.0, 100.0)) -> Normalization:
    """Fit every group that has training data.

    Args:
        magnitudes: per-subject bSSFP magnitude ``(X, Y, Z, C)`` or None.
        phases: per-subject bSSFP phase ``(X, Y, Z, C)`` (radians) or None.
        tensors: per-subject tensors ``(X, Y, Z, 6)`` BEP016 order (mm^2/s) or None.
        t1ws: per-subject T1w ``(X, Y, Z)`` or None.
        masks: per-subject brain masks ``(X, Y, Z)`` shared by all modalities (same grid), or None.
        percentiles: see :func:`fit_range`.
    Returns:
        :class:`Normalization`.
    """
    def fit(volumes, channels=None):
        if volumes is None:
            return None
        volumes = list(volumes)
        subject_masks = None if masks is None else list(masks)
        return fit_range(volumes, subject_masks, percentiles, channels)

    tensors = None if tensors is None else list(tensors)
    return Normalization(magnitude=fit(magnitudes), phase=fit(phases),
                         tensor_diagonal=fit(tensors, DIAGONAL),
                         tensor_offdiagonal=fit(tensors, OFF_DIAGONAL),
                         t1w=fit(t1ws), percentiles=tuple(float(p) for p in percentiles))


def apply_range(volume: np.ndarray, value_range: Range, mask: np.ndarray | None = None,
                clip: bool = True, warn_fraction: float = 0.01, name: str = "volume",
                dtype=np.float32) -> np.ndarray:
    """``(x - low) / (high - low)``, clipped to [0, 1], zero outside the mask.

    Logs a warning when more than ``warn_fraction`` of the in-mask values lie outside the fitted
    range (a subject unlike the training set, or different units).

    Args:
        volume: any shape whose leading axes match ``mask``.
        value_range: the fitted range.
        mask: boolean ``(X, Y, Z)`` or None (all voxels).
        clip: clip to [0, 1] (the network never saw values outside).
        warn_fraction: fraction in [0, 1] above which to warn.
        name: what to call the volume in the warning.
        dtype: output dtype (float32 is what the network eats; float64 for exact round trips).
    Returns:
        ``dtype`` array of ``volume``'s shape, unitless.
    """
    volume = np.asarray(volume, dtype=np.float64)
    scaled = (volume - value_range.low) / (value_range.high - value_range.low)
    inside = _masked_values(scaled, mask)
    if inside.size:
        outside = np.count_nonzero((inside < 0.0) | (inside > 1.0)) / inside.size
        if outside > warn_fraction:
            logger.warning("%s: %.1f%% of the in-mask values fall outside the fitted range [%.6g, %.6g]%s",
                           name, 100 * outside, value_range.low, value_range.high,
                           " and are clipped" if clip else "")
    if clip:
        scaled = np.clip(scaled, 0.0, 1.0)
    if mask is not None:
        scaled = scaled * _broadcast_mask(mask, scaled.ndim)
    return scaled.astype(dtype)


def invert_range(normalised: np.ndarray, value_range: Range, mask: np.ndarray | None = None) -> np.ndarray:
    """Exact inverse of :func:`apply_range` for in-range values: ``low + y (high - low)``.

    Returns float64 in input units, zero outside the mask.
    """
    values = value_range.low + np.asarray(normalised, dtype=np.float64) * (value_range.high - value_range.low)
    if mask is not None:
        values = values * _broadcast_mask(mask, values.ndim)
    return values


def _broadcast_mask(mask: np.ndarray, ndim: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def normalize_bssfp(magnitude: np.ndarray, phase: np.ndarray, params: Normalization,
                    mask: np.ndarray | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and phase ``(X, Y, Z, C)`` each to [0, 1]; ``options`` go to :func:`apply_range`."""
    return (apply_range(magnitude, params.require("magnitude"), mask, name="bSSFP magnitude", **options),
            apply_range(phase, params.require("phase"), mask, name="bSSFP phase", **options))


def normalize_t1w(t1w: np.ndarray, params: Normalization, mask: np.ndarray | None = None,
                  **options) -> np.ndarray:
    """T1w ``(X, Y, Z)`` to [0, 1]."""
    return apply_range(t1w, params.require("t1w"), mask, name="T1w", **options)


def normalize_tensor(tensor: np.ndarray, params: Normalization, mask: np.ndarray | None = None,
                     **options) -> np.ndarray:
    """Tensor ``(X, Y, Z, 6)`` (mm^2/s, BEP016 order) -> network values: diagonal and off-diagonal separately to
    [0, 1] (``minmax``) or log-Euclidean coordinates (``log``); zero outside ``mask`` either way."""
    tensor = np.asarray(tensor)
    if tensor.shape[-1] != 6:
        raise UsageError(f"a tensor volume needs 6 components on its last axis, got {tensor.shape}")
    if params.tensor_transform == "log":
        from bssfp2dt.dti.logeuclid import log_tensor

        values = log_tensor(tensor)
        if mask is not None:
            values = values * _broadcast_mask(mask, values.ndim)
        return values.astype(options.get("dtype", np.float32))
    out = np.empty(tensor.shape, dtype=options.get("dtype", np.float32))
    out[..., DIAGONAL] = apply_range(tensor[..., DIAGONAL], params.require("tensor_diagonal"), mask,
                                     name="tensor diagonal", **options)
    out[..., OFF_DIAGONAL] = apply_range(tensor[..., OFF_DIAGONAL], params.require("tensor_offdiagonal"),
                                         mask, name="tensor off-diagonal", **options)
    return out


def denormalize_tensor(normalised: np.ndarray, params: Normalization,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """Exact inverse of :func:`normalize_tensor`: ``(X, Y, Z, 6)`` network values -> mm^2/s (float64)."""
    normalised = np.asarray(normalised)
    if normalised.shape[-1] != 6:
        raise UsageError(f"a tensor volume needs 6 components on its last axis, got {normalised.shape}")
    if params.tensor_transform == "log":
        from bssfp2dt.dti.logeuclid import exp_tensor

        values = exp_tensor(normalised)
        return values if mask is None else values * _broadcast_mask(mask, values.ndim)
    out = np.empty(normalised.shape, dtype=np.float64)
    out[..., DIAGONAL] = invert_range(normalised[..., DIAGONAL], params.require("tensor_diagonal"), mask)
    out[..., OFF_DIAGONAL] = invert_range(normalised[..., OFF_DIAGONAL], params.require("tensor_offdiagonal"), mask)
    return out
