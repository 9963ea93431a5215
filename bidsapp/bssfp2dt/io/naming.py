"""The one place that formats BIDS file names (raw and derivative).

Entities are ordered as in the BIDS entity table, followed by the BEP016 (diffusion derivatives)
entities ``model`` and ``param``.
"""
from __future__ import annotations

import re
from pathlib import Path

# (entity key, label prefix) in BIDS entity-table order; BEP016's model/param come last.
ENTITY_ORDER: tuple[tuple[str, str], ...] = (
    ("subject", "sub"), ("session", "ses"), ("sample", "sample"), ("task", "task"),
    ("tracksys", "tracksys"), ("acquisition", "acq"), ("nucleus", "nuc"), ("volume", "voi"),
    ("ceagent", "ce"), ("tracer", "trc"), ("stain", "stain"), ("reconstruction", "rec"),
    ("direction", "dir"), ("run", "run"), ("modality", "mod"), ("echo", "echo"), ("flip", "flip"),
    ("inversion", "inv"), ("mtransfer", "mt"), ("part", "part"), ("processing", "proc"),
    ("hemisphere", "hemi"), ("space", "space"), ("split", "split"), ("recording", "recording"),
    ("chunk", "chunk"), ("segmentation", "seg"), ("resolution", "res"), ("density", "den"),
    ("label", "label"), ("description", "desc"), ("model", "model"), ("param", "param"),
)
_KNOWN = {key for key, _ in ENTITY_ORDER}
_LABEL = re.compile(r"[A-Za-z0-9]+")  # used with fullmatch: "$" would accept a trailing newline
# BIDS "index" entities take non-negative integers; three entities take a fixed set of labels.
_INDEX_ENTITIES = frozenset({"run", "echo", "flip", "inversion", "split", "chunk"})
_INDEX = re.compile(r"[0-9]+")
_ALLOWED_VALUES = {"mtransfer": ("on", "off"), "part": ("mag", "phase", "real", "imag"), "hemisphere": ("L", "R")}


def bids_filename(suffix: str, extension: str = ".nii.gz", **entities: str | int | None) -> str:
    """Build a BIDS file name, e.g. ``bids_filename("T1w", subject="01", session="1")``.

    Entities with value None are left out. Raises ValueError for unknown entities, labels that
    are not alphanumeric (BIDS labels may not contain ``_`` or ``-``), index entities (``run``,
    ``echo``, ...) that are not digits, values outside the fixed sets of ``mtransfer``, ``part`` and
    ``hemisphere``, and suffixes that are not alphanumeric.
    """
    unknown = set(entities) - _KNOWN
    if unknown:
        raise ValueError(f"unknown BIDS entities: {sorted(unknown)}")
    if not _LABEL.fullmatch(suffix):
        raise ValueError(f"BIDS suffix must be alphanumeric, got {suffix!r}")
    parts = []
    for key, prefix in ENTITY_ORDER:
        value = entities.get(key)
        if value is None:
            continue
        value = str(value)
        if not _LABEL.fullmatch(value):
            raise ValueError(f"BIDS label for {key!r} must be alphanumeric, got {value!r}")
        if key in _INDEX_ENTITIES and not _INDEX.fullmatch(value):
            raise ValueError(f"BIDS index {key!r} must be a non-negative integer, got {value!r}")
        if key in _ALLOWED_VALUES and value not in _ALLOWED_VALUES[key]:
            raise ValueError(f"BIDS {key!r} must be one of {', '.join(_ALLOWED_VALUES[key])}, got {value!r}")
        parts.append(f"{prefix}-{value}")
    if not parts or not parts[0].startswith("sub-"):
        raise ValueError("a BIDS file name needs a subject")
    return "_".join(parts + [suffix]) + extension


def bids_path(root: Path, datatype: str | None, suffix: str, extension: str = ".nii.gz",
              **entities: str | int | None) -> Path:
    """Full path ``root/sub-X/[ses-Y/][datatype/]<name>`` for :func:`bids_filename`."""
    folder = Path(root) / f"sub-{entities['subject']}"
    if entities.get("session") is not None:
        folder = folder / f"ses-{entities['session']}"
    if datatype:
        folder = folder / datatype
    return folder / bids_filename(suffix, extension, **entities)
