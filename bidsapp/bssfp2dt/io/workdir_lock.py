"""One run per work directory: an exclusive ``flock`` on ``<work_dir>/.bssfp2dt.lock``.

nipype's cache is not safe for two runs at once (both crash inside nipype when they meet in a node
folder). The second run therefore stops at once, before writing anything, with "work dir ... is in
use by process N" (exit 73), and the first one carries on. The lock is the kernel's: it goes away
with the process that holds it, so a killed run never leaves a stale lock behind (the file with
its last holder's process id stays, harmlessly).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bssfp2dt.errors import OutputError

LOCK_NAME = ".bssfp2dt.lock"


@contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[Path]:
    """Hold the work dir's lock for the ``with`` block; OutputError (73) when another process holds it."""
    work_dir = Path(work_dir)
    path = work_dir / LOCK_NAME
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputError(f"cannot create the lock file {path} ({error.strerror}); give a writable -w") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"work dir {work_dir} is in use by process {_holder(descriptor)} (another bssfp2dt "
                              "run); wait for it to finish or give this run another -w") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(descriptor)  # closing releases the lock


def _holder(descriptor: int) -> str:
    """The process id the holder wrote into the lock file ("unknown" when it has not yet)."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"
