"""``--write-preproc``: the preprocessed images of a subject as BIDS-Derivatives (``desc-preproc``).

Reads a :class:`~bssfp2dt.preprocessing.sessions.PreprocessedSubject` (files in the work directory) and
writes copies with sidecars into the output folder; output names and sidecars come from
:mod:`bssfp2dt.io.derivatives`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.preprocessing.sessions import PreprocessedSubject

logger = logging.getLogger(__name__)


def write_preprocessed(subject: PreprocessedSubject, config) -> list[Path]:
    """Copy the preprocessed images to ``output_dir`` as BIDS-Derivatives (``desc-preproc``) with sidecars.

    bSSFP magnitude and phase become separate 12-volume images (``part-mag``/``part-phase``); masks and
    tissue maps get the standard output names. Returns the written paths.
    """
    from bssfp2dt.io import derivatives
    from bssfp2dt.io.nifti import write_json
    from bssfp2dt.preprocessing.bssfp import deinterleave_channels

    written: list[Path] = []
    root = config.paths.output_dir
    for session in subject.sessions:
        record = json.loads(session.provenance.read_text())
        sources = _sources(record, config.paths.bids_dir)
        reference = sources[0] if sources else ""
        names = derivatives.preproc_paths(subject.subject, session.session, root)
        standard = derivatives.tensor_map_paths(subject.subject, session.session, modalities.DEFAULT.name, root)
        t1w, affine = _array(session.t1w)
        note = "not normalised; resampled to the common 2 mm T1w-space grid"
        written.append(derivatives.write_image(t1w, affine, names.t1w, derivatives.preproc_sidecar(
            sources, reference, f"T1w, brain-masked, {note}", "arbitrary")))
        if session.bssfp is not None:
            magnitude, phase = deinterleave_channels(_array(session.bssfp)[0])
            for data, path, units, what in ((magnitude, names.bssfp_magnitude, "arbitrary", "magnitude"),
                                            (phase, names.bssfp_phase, "rad", "phase")):
                written.append(derivatives.write_image(data, affine, path, derivatives.preproc_sidecar(
                    sources, reference, f"pc-bSSFP {what}, 12 phase cycles, {note}", units)))
        if session.tensor is not None:
            written.append(derivatives.write_image(_array(session.tensor)[0], affine, names.diffusivity,
                                                   derivatives.preproc_sidecar(
                sources, reference, f"DWI tensor (WLS fit), {note}", "mm^2/s",
                extra={"OrientationEncoding": {"Type": "tensor", "TensorRank": 2, "EncodingAxis": 3,
                                               "Reference": "xyz"}})))
        maps = {name: _array(getattr(session, name))[0] for name in ("gm", "wm", "csf", "brain_mask")}
        written.extend(derivatives.write_tensor_outputs(standard, maps, affine, sources, reference,
                                                        modalities.DEFAULT.name))
        log_dir = derivatives.subject_log_dir(root, subject.subject, config.run.run_uuid)
        written.append(write_json(record, log_dir / session.provenance.name))
    logger.info("sub-%s: wrote %d preprocessed images", subject.subject, len(written))
    return written


def _array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from bssfp2dt.io.nifti import load_nifti

    return load_nifti(path)


def _sources(record: dict, bids_dir: Path) -> list[str]:
    """BIDS URIs of the raw inputs named in the step records (for ``Sources``)."""
    from bssfp2dt.io.derivatives import bids_uri

    found = []
    for value in record.get("inputs", []):
        try:
            found.append(bids_uri(value, bids_dir))
        except ValueError:  # an input outside bids_dir (e.g. a --derivatives file) has no raw URI
            continue
    return found
