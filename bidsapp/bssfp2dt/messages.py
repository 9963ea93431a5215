"""Small helpers that keep user-facing messages one readable line, and the log line format."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterable

MAX_LISTED = 10  # items named in a message before "... and N more"
#: Every log line (console and ``sub-<label>/log/<run_uuid>/participant.log``): time, level, logger, message.
LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s | %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def capped(items: Iterable[object], limit: int = MAX_LISTED, separator: str = ", ") -> str:
    """``items`` joined, at most ``limit`` of them, then ``"... and N more"`` (a message stays one short line)."""
    items = [str(item) for item in items]
    if len(items) <= limit:
        return separator.join(items)
    return separator.join(items[:limit]) + f"{separator}... and {len(items) - limit} more"


def path_problem(path: Path | str, want: str = "file") -> str | None:
    """What is wrong with ``path`` as a ``want`` (``"file"`` or ``"directory"``), in words; None when fine.

    Tells a symlink loop, a broken link, a missing path, a permission problem and the wrong kind
    (a directory given for a file and the reverse) apart, so the message can say what the path *is*.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that loops back on itself; point it at the real file"
        if path.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(path)}); point it at an existing file"
        if error.errno == errno.ENOENT:
            return "does not exist"
        if error.errno == errno.EACCES:
            return "cannot be read (permission denied)"
        return f"cannot be accessed ({error.strerror})"
    if want == "file" and stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if want == "directory" and not stat.S_ISDIR(info.st_mode):
        return "is a file, not a directory"
    return None
