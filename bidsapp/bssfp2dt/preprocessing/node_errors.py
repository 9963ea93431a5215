"""Turn a failed nipype preprocessing run into the one-line error a user can act on.

nipype reports a failing node with its traceback (logged, and in a crash file) and then raises a
``RuntimeError`` holding every traceback. The crash files (``crashfile_format = txt``, in
``sub-<label>/log/<run_uuid>/``) name the node and end with the exception that stopped it; this
module reads them back, names the raw input the node was working on and chooses the exit code:

* a bssfp2dt error or a numerical / data error (ValueError, ArithmeticError, LinAlgError, IndexError,
  nibabel's ImageFileError) inside a node is a data error: exit 66, like discovery's checks;
* an OSError is an input/output failure: exit 74;
* anything else keeps exit 1 but is still one line pointing at the crash file.

The traceback stays in the crash file (and on the terminal with ``-vv``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bssfp2dt.errors import Bssfp2dtError, InputOutputError, MissingInputError

#: Exception names (last dotted part) that mean "the data cannot be processed" (exit 66).
DATA_ERRORS = ("ValueError", "ArithmeticError", "ZeroDivisionError", "FloatingPointError", "OverflowError",
               "LinAlgError", "IndexError", "ImageFileError", "HeaderDataError", "EOFError", "BadGzipFile")
_BSSFP2DT_ERRORS = ("Bssfp2dtError", "UsageError", "InvalidBIDSError", "AnalysisLevelError",
                    "NoFilesSelectedError", "MissingInputError")
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")
_NODE_LINE = re.compile(r"^Node: (?:[\w]+\.)?(\w+)$")


def node_label(label: str | None) -> str:
    """The part of a workflow node's name that names a session (or a subject): its label's letters and digits,
    ``nosession`` for datasets without sessions."""
    return re.sub(r"[^A-Za-z0-9]", "", label) if label else "nosession"


@dataclass(frozen=True)
class NodeFailure:
    """One failed node: its name, the exception type (dotted) and message, and the crash file."""

    node: str
    error_type: str
    message: str
    crash_file: Path

    @property
    def short_type(self) -> str:
        return self.error_type.rsplit(".", 1)[-1]


def read_crash_file(path: Path) -> NodeFailure | None:
    """The node and its final exception from a nipype text crash file (None when it cannot be parsed)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    node = next((m.group(1) for m in map(_NODE_LINE.match, lines) if m), None)
    found = [m for m in map(_EXCEPTION_LINE.match, lines) if m and not m.group(1).endswith("NodeExecutionError")]
    if node is None or not found:
        return None
    return NodeFailure(node=node, error_type=found[-1].group(1), message=found[-1].group(2).strip(),
                       crash_file=Path(path))


def node_failures(crash_dir: Path, since: float) -> list[NodeFailure]:
    """Failures of the nodes whose crash files were written at or after ``since`` (epoch seconds)."""
    paths = sorted(path for path in Path(crash_dir).glob("crash-*.txt")
                   if path.stat().st_mtime >= since - 1 and not path.name.endswith("-participant.txt"))
    return [failure for failure in map(read_crash_file, paths) if failure is not None]


def node_input(node: str, subject_inputs) -> tuple[str, Path] | None:
    """``(role, raw file)`` a preprocessing node works on, from its name (see the workflow's node names)."""
    match = re.match(r"^(t1w_mask|t1w_grid|tissue)_(\d+)$", node)
    if match:
        images = list(dict.fromkeys(Path(s.t1w.image) for s in subject_inputs.sessions if s.t1w is not None))
        index = int(match.group(2))
        return ("T1w", images[index]) if index < len(images) else None
    match = re.match(r"^(bssfp|dwi)_\w+_ses(\w+)$", node)
    if match:
        for session in subject_inputs.sessions:
            if node_label(session.session) == match.group(2):
                if match.group(1) == "bssfp" and session.bssfp is not None:
                    return "bSSFP magnitude", Path(session.bssfp.magnitude)
                if match.group(1) == "dwi" and session.dwi is not None:
                    return "DWI", Path(session.dwi.image)
    return None


def is_dwi_node(node: str) -> bool:
    """Whether a node belongs to a DWI branch (the optional evaluation reference)."""
    return node.startswith("dwi_")


def preprocessing_error(subject_inputs, failures: list[NodeFailure], crash_dir: Path) -> Bssfp2dtError:
    """The user's error for the first failed node (exit 66 / 74 / 1, see the module docstring)."""
    label = subject_inputs.subject
    if not failures:
        return Bssfp2dtError(f"sub-{label}: preprocessing failed; see the crash files in {crash_dir}")
    failure = failures[0]
    found = node_input(failure.node, subject_inputs)
    subject = f"{found[0]} {found[1]}" if found else f"sub-{label}"
    more = f" ({len(failures) - 1} more failed step(s))" if len(failures) > 1 else ""
    where = f"preprocessing step {failure.node}{more}; traceback in {failure.crash_file}"
    if failure.short_type in _BSSFP2DT_ERRORS or failure.short_type in DATA_ERRORS:
        return MissingInputError(f"{subject}: {failure.message} ({where}); check or replace this image")
    if failure.short_type in ("OSError", "FileNotFoundError", "PermissionError") or \
            failure.short_type.endswith("IOError"):
        return InputOutputError(f"{subject}: {failure.short_type}: {failure.message} ({where}); check free space "
                                "and permissions of the work dir")
    return Bssfp2dtError(f"{subject}: {failure.short_type}: {failure.message} ({where})")
