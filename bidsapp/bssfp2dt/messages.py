"""Small helpers that keep user-facing messages one readable line."""
from __future__ import annotations

from typing import Iterable

MAX_LISTED = 10  # items named in a message before "... and N more"


def capped(items: Iterable[object], limit: int = MAX_LISTED, separator: str = ", ") -> str:
    """``items`` joined, at most ``limit`` of them, then ``"... and N more"`` (a message stays one short line)."""
    items = [str(item) for item in items]
    if len(items) <= limit:
        return separator.join(items)
    return separator.join(items[:limit]) + f"{separator}... and {len(items) - limit} more"
