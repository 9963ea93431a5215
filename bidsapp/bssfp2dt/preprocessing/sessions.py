"""What preprocessing hands on: the preprocessed images of a session and of a subject.

The workflow (:mod:`bssfp2dt.preprocessing.workflow`) writes one summary JSON per session
(:func:`bssfp2dt.preprocessing.steps.collect_session`); :func:`read_summary` turns it back into a
:class:`PreprocessedSession`. Training, inference, the ``--write-preproc`` writer and the reports read these
types; none of them needs nipype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PreprocessedSession:
    """Preprocessed images of one session, all float32 on the common grid (uint8 mask), not normalised.

    Attributes:
        t1w: T1w (scanner units), masked; also the common grid's reference (affine, shape).
        brain_mask: uint8 brain mask.
        gm, wm, csf: tissue probabilities (0..1).
        bssfp: ``(X, Y, Z, 24)`` interleaved magnitude (scanner units) / phase (rad), or None.
        tensor: ``(X, Y, Z, 6)`` DWI tensor (mm^2/s, BEP016, xyz frame), or None.
        provenance: JSON of every step (registration parameters, skipped steps, timings).
    """

    subject: str
    session: str | None
    t1w_session: str | None
    t1w: Path
    brain_mask: Path
    gm: Path
    wm: Path
    csf: Path
    bssfp: Path | None
    tensor: Path | None
    provenance: Path


@dataclass(frozen=True)
class PreprocessedSubject:
    """All preprocessed sessions of one subject."""

    subject: str
    sessions: tuple[PreprocessedSession, ...]

    def session(self, label: str | None) -> PreprocessedSession:
        """The session with this label (None for datasets without sessions)."""
        for item in self.sessions:
            if item.session == label:
                return item
        raise KeyError(f"sub-{self.subject} has no preprocessed session {label!r}")


def read_summary(summary: Path) -> PreprocessedSession:
    """The :class:`PreprocessedSession` a session summary JSON (``*_preproc.json``) describes; absent
    modalities (empty or missing outputs) are None."""
    record = json.loads(Path(summary).read_text())
    outputs = record["outputs"]

    def path(key: str) -> Path | None:
        return Path(outputs[key]) if outputs.get(key) else None

    return PreprocessedSession(subject=record["subject"], session=record["session"],
                               t1w_session=outputs.get("t1w_session"), t1w=path("t1w"),
                               brain_mask=path("brain_mask"), gm=path("gm"), wm=path("wm"), csf=path("csf"),
                               bssfp=path("bssfp"), tensor=path("tensor"), provenance=Path(summary))
