"""Atomic writes: a file exists under its final name only when complete. Standard library only.

A write goes to a hidden temporary file next to the target (``.<stem>.<random>.part<suffixes>``),
locked (``flock``) by its writer until it is renamed into place. A killed process leaves its temporary
file behind, unlocked: :func:`remove_stale_temporaries` deletes those, and never a live writer's.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def write_text(text: str, path: Path | str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as temp_path:
        temp_path.write_text(text)
    return Path(path)
