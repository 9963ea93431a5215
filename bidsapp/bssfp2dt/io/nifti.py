"""NIfTI and JSON sidecar I/O, written atomically (:mod:`bssfp2dt.io.atomic`): a file exists under its final
name only when complete. The atomic-write names are re-exported here for existing callers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bssfp2dt.io.atomic import (  # noqa: F401 - re-exported
    STALE_AFTER_S, TEMPORARY_NAME, atomic_path, remove_stale_temporaries, write_text)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path | str, *, dtype: Any = None,
               header_updates: dict[str, Any] | None = None, xyzt_units: tuple[str, str] = ("mm", "sec")) -> Path:
    """Write ``data`` (X, Y, Z[, T]) with a 4x4 ``affine`` (mm) atomically; sform and qform both set.

    ``dtype`` selects the on-disk type (e.g. ``np.uint16``); values are rounded for integer types.
    ``header_updates`` sets header fields such as ``pixdim`` entries via ``header[key] = value``.
    """
    array = np.asarray(data)
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    if dtype is not None:
        array = array.astype(dtype)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units(*xyzt_units)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    for key, value in (header_updates or {}).items():
        image.header[key] = value
    with atomic_path(path) as temp_path:
        nib.save(image, temp_path)
    return Path(path)


def effective_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The data shape with singleton dimensions after the third dropped.

    ``(X, Y, Z, 1)`` -> ``(X, Y, Z)``; ``(X, Y, Z, 1, 12)`` -> ``(X, Y, Z, 12)`` (5D files written by
    ITK-based tools keep the volumes in the 5th dimension). The three spatial dimensions are kept even
    when they are 1, so a single slice stays 3D.
    """
    shape = tuple(int(n) for n in shape)
    return shape[:3] + tuple(n for n in shape[3:] if n != 1)


def load_nifti(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI as ``(data, affine)`` the way input discovery describes it.

    ``data`` has the :func:`effective_shape` (singleton dimensions after the third dropped) and holds
    the scaled values (``raw * scl_slope + scl_inter`` when the header sets a slope; the raw dtype
    otherwise). ``affine`` is the 4x4 voxel -> world (mm, RAS) matrix nibabel chooses (sform, else qform).
    The voxel order on disk is kept: resampling uses the affine, so no reorientation is needed.
    """
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    return data.reshape(effective_shape(data.shape)), image.affine


def write_json(payload: dict[str, Any], path: Path | str) -> Path:
    """Write a JSON sidecar atomically (sorted keys, 2-space indent, trailing newline)."""
    with atomic_path(path) as temp_path:
        temp_path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
