"""Run the BIDS validator 3.x (``bids-validator-deno``) on the input dataset.

The validator has no option to restrict validation to some subjects, so the whole dataset is
validated (warnings ignored) and the errors located in unselected subjects' folders are dropped.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bssfp2dt.errors import Bssfp2dtError, InvalidBIDSError

logger = logging.getLogger(__name__)

VALIDATOR = "bids-validator-deno"
_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ValidationIssue:
    """One validator error: its code (e.g. ``DWI_MISSING_BVEC``), dataset-relative location and message."""

    code: str
    location: str
    message: str


def find_validator() -> Path:
    """The validator next to the running Python (the venv's bin) first, then on PATH."""
    beside = Path(sys.executable).parent / VALIDATOR
    if beside.is_file():
        return beside
    on_path = shutil.which(VALIDATOR)
    if on_path:
        return Path(on_path)
    raise Bssfp2dtError(f"{VALIDATOR} is not installed (looked next to {sys.executable} and on PATH); "
                        "install it or pass --skip-bids-validation")


def validation_errors(bids_dir: Path, subjects: Sequence[str] = ()) -> list[ValidationIssue]:
    """Errors (not warnings) the validator reports for ``bids_dir``, limited to ``subjects`` if given.

    Dataset-level errors (outside any ``sub-*`` folder) are always kept.
    """
    command = [str(find_validator()), "--format", "json", "--ignoreWarnings", "--no-color", str(bids_dir)]
    logger.debug("validating %s with %s", bids_dir, VALIDATOR)
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Bssfp2dtError(f"{VALIDATOR} could not run ({error}); pass --skip-bids-validation to skip it") from None
    try:
        report = json.loads(completed.stdout)
    except json.JSONDecodeError:
        detail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise Bssfp2dtError(f"{VALIDATOR} failed on {bids_dir} ({detail}); pass --skip-bids-validation "
                            "to skip it") from None
    return select_errors(report, subjects)


def select_errors(report: dict, subjects: Sequence[str] = ()) -> list[ValidationIssue]:
    """Parse the validator's JSON report: errors only, dropping those inside unselected ``sub-*`` folders."""
    issues = report.get("issues", {})
    messages = issues.get("codeMessages", {})
    selected = {f"sub-{label}" for label in subjects}
    errors = []
    for issue in issues.get("issues", []):
        if issue.get("severity") != "error":
            continue
        location = issue.get("location", "")
        top = location.strip("/").split("/")[0]
        if selected and top.startswith("sub-") and top not in selected:
            continue
        code = issue.get("code", "UNKNOWN")
        message = issue.get("issueMessage") or messages.get(code, "")
        errors.append(ValidationIssue(code=code, location=location, message=" ".join(message.split())))
    return errors


def validate(bids_dir: Path, subjects: Sequence[str] = ()) -> None:
    """Raise :class:`InvalidBIDSError` (exit 16) naming the first offending file and the validator's code."""
    errors = validation_errors(bids_dir, subjects)
    if not errors:
        return
    for issue in errors:
        logger.debug("validator: %s %s %s", issue.code, issue.location, issue.message)
    first = errors[0]
    where = Path(bids_dir) / first.location.lstrip("/") if first.location else Path(bids_dir)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise InvalidBIDSError(f"{where} fails BIDS validation: {first.code}{more}; fix the dataset "
                           f"(run {VALIDATOR} {bids_dir}) or pass --skip-bids-validation")
