"""What the participant, group and training pipelines receive from the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from bssfp2dt.config import Config
    from bssfp2dt.io.bids import SubjectInputs


@dataclass(frozen=True)
class RunPlan:
    """What the participant / group / training pipelines receive: the config and the checked inputs.

    ``subjects``: discovered inputs per selected subject (participant level and training).
    ``participant_results``: subject label -> tensor-map files found in output_dir (group level).
    """

    config: Config
    subjects: tuple["SubjectInputs", ...] = ()
    participant_results: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
