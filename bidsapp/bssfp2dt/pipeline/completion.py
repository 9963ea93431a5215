"""Which subjects the participant level finished: ``sub-<label>/log/<run_uuid>/status.json``.

The status is written ``"complete": false`` when a subject starts and ``true`` only after every one of
its outputs (maps, sidecars, evaluation, report) is written, so a participant run that is killed or fails
half way leaves the subject marked incomplete. The group level reads it to name incomplete subjects and
say how to finish them, instead of describing their half-written outputs as complete; the newest
status (by modification time) of a subject is the one that counts. The file sits in the run's own log
folder, which is the only part of the outputs allowed to differ between identical runs. Outputs of
releases without a status file count as complete.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

from bssfp2dt.messages import capped

logger = logging.getLogger(__name__)

STATUS_NAME = "status.json"


def status_path(output_dir: Path, label: str, run_uuid: str) -> Path:
    from bssfp2dt.io.derivatives import subject_log_dir

    return subject_log_dir(output_dir, label, run_uuid) / STATUS_NAME


def _write(output_dir: Path, label: str, record: dict) -> None:
    from bssfp2dt.io.nifti import write_json

    path = status_path(output_dir, label, record["run_uuid"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, path)


def mark_started(output_dir: Path, label: str, run_uuid: str) -> None:
    """Mark the subject incomplete (its outputs are about to be rewritten)."""
    _write(output_dir, label, {"complete": False, "run_uuid": run_uuid, "started": _now()})


def mark_failed(output_dir: Path, label: str, run_uuid: str, message: str) -> None:
    """Keep the subject incomplete and record why."""
    _write(output_dir, label, {"complete": False, "run_uuid": run_uuid, "failed": _now(), "error": message})


def mark_complete(output_dir: Path, label: str, run_uuid: str, outputs: Iterable[Path]) -> None:
    """Mark the subject complete, listing its outputs relative to ``output_dir``."""
    output_dir = Path(output_dir)
    relative = sorted(Path(path).relative_to(output_dir).as_posix() if Path(path).is_absolute() else str(path)
                      for path in outputs)
    _write(output_dir, label, {"complete": True, "run_uuid": run_uuid, "finished": _now(), "outputs": relative})


def read_status(output_dir: Path, label: str) -> dict | None:
    """The subject's newest status record; None when there is none (or it cannot be read)."""
    candidates = []
    for path in (Path(output_dir) / f"sub-{label}" / "log").glob(f"*/{STATUS_NAME}"):
        try:
            candidates.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue
    if not candidates:
        return None
    try:
        record = json.loads(max(candidates)[1].read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def incomplete_subjects(output_dir: Path, labels: Sequence[str] = ()) -> dict[str, str]:
    """Subject -> why it is incomplete, for every ``sub-*`` folder (or ``labels``) whose status says so."""
    output_dir = Path(output_dir)
    candidates = labels or [folder.name[4:] for folder in sorted(output_dir.glob("sub-*")) if folder.is_dir()]
    found = {}
    for label in candidates:
        record = read_status(output_dir, label)
        if record is not None and record.get("complete") is not True:
            reason = record.get("error") or "it was interrupted (killed or out of time) before all outputs were written"
            found[label] = f"its participant run {record.get('run_uuid', '?')} did not finish: {reason}"
    return found


def finish_hint(bids_dir: Path | None, output_dir: Path, labels: Sequence[str]) -> str:
    """The command that finishes ``labels`` (same work dir to reuse the cache)."""
    bids = str(bids_dir) if bids_dir else "<bids_dir>"
    return (f"finish with `bssfp2dt {bids} {output_dir} participant --participant-label {capped(labels, 20, ' ')}` "
            "(the same -w reuses the finished steps)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
