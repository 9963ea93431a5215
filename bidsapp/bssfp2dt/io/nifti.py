"""NIfTI and sidecar I/O with atomic writes: a file exists under its final name only when complete.

A write goes to a hidden temporary file next to the target (``.<stem>.<random>.part<suffixes>``),
locked (``flock``) by its writer until it is renamed into place. A killed process leaves its temporary
file behind, unlocked: :func:`remove_stale_temporaries` deletes those, and never a live writer's.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np

try:
    import fcntl
except ImportError:  # not on Windows: no lock, and no stale-file clean-up there
    fcntl = None

logger = logging.getLogger(__name__)

#: A temporary file of :func:`atomic_path`: ``.<stem>.<mkstemp random>.part[<suffixes>]``.
TEMPORARY_NAME = re.compile(r"^\.(?P<stem>[^.]*)\.[A-Za-z0-9_]+\.part(\.[^.]+)*$")
#: Temporary files younger than this are left alone (the lock is taken just after creation).
STALE_AFTER_S = 2.0


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(final_path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it into place only on success."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final_path.suffixes)  # keep .nii.gz so writers pick the right format
    handle, temp_name = tempfile.mkstemp(prefix=f".{final_path.name.split('.')[0]}.", suffix=f".part{suffix}",
                                         dir=final_path.parent)
    temp_path = Path(temp_name)
    try:
        _try_lock(handle)  # held until the rename: marks the file as a live writer's
        os.chmod(temp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        yield temp_path
        os.replace(temp_path, final_path)
    finally:
        os.close(handle)
        if temp_path.exists():
            temp_path.unlink()


def _try_lock(handle: int) -> bool:
    """``flock`` an open file exclusively without waiting; False when another process holds it.

    Filesystems without locks (some network mounts) answer False too, so nothing there is ever removed.
    """
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temporaries(folder: Path | str, owned: Callable[[str], bool] = lambda stem: True, *,
                             recursive: bool = True, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when its process was killed.

    A file is removed only when its name matches :data:`TEMPORARY_NAME`, ``owned(stem)`` is true (the
    final name's part before the first dot), it is at least ``min_age_s`` seconds old and no process holds
    its lock, so concurrent writers (other subjects' jobs sharing an output folder) are never disturbed.
    Returns the removed paths.
    """
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for path in sorted(folder.rglob(".*") if recursive else folder.glob(".*")):
        match = TEMPORARY_NAME.match(path.name)
        if not match or not owned(match["stem"]):
            continue
        try:
            if not path.is_file() or now - path.stat().st_mtime < min_age_s:
                continue
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(handle):
                path.unlink()
                removed.append(path)
        except OSError as error:
            logger.warning("cannot remove the unfinished file %s (%s)", path, error.strerror)
        finally:
            os.close(handle)
    return removed


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


def write_text(text: str, path: Path | str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as temp_path:
        temp_path.write_text(text)
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
