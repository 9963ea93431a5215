"""Participant-level reports and methods text: what the participant pipeline calls after each subject.

- :func:`report_subject`: QC figures of every session, mosaics of every written prediction (read back from
  the output files), the run record and ``sub-<label>.html``, for every subject with or without DWI;
- :func:`report_failed_subject`: the report of a subject whose processing failed (its errors section lists
  the crash files), built from whatever the subject's folder holds;
- :func:`rebuild_reports`: ``--reports-only``, from the output folder alone;
- :func:`write_citation`: ``logs/CITATION.md`` and ``logs/CITATION.bib`` from the run records.

A report that cannot be drawn is a warning, never a failed subject: the maps are the product.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def report_subject(plan, subject_inputs, preprocessed, model, extra_steps=None) -> Path | None:
    """Figures, run record and HTML report of one processed subject; returns the report path.

    ``extra_steps``: session label -> provenance records of steps after the preprocessing (template
    normalisation), added to the session's steps in the run record.
    """
    from bssfp2dt.evaluation import subject_report

    config = plan.config
    output_dir = config.paths.output_dir
    raw_sessions = {session.session: session for session in subject_inputs.sessions}
    sessions = []
    for session in preprocessed.sessions:
        raw = raw_sessions[session.session]
        _guarded(f"QC figures of sub-{session.subject} ses-{session.session}",
                 subject_report.write_session_qc, output_dir, session, raw)
        _guarded(f"map figures of sub-{session.subject} ses-{session.session}", _write_mosaics, output_dir,
                 session.subject, session.session, model.modality)
        record = subject_report.session_context(session, raw, config.paths.bids_dir)
        record["steps"] += list((extra_steps or {}).get(session.session, []))
        sessions.append(record)
    context = {"subject": preprocessed.subject, "run_uuid": config.run.run_uuid, "version": config.run.version,
               "settings": run_settings(config), "model": subject_report.model_context(model),
               "sessions": sessions}
    subject_report.write_report_context(output_dir, preprocessed.subject, config.run.run_uuid, context)
    return _guarded(f"report of sub-{preprocessed.subject}", _write_report, output_dir, preprocessed.subject)


def report_failed_subject(config, label: str) -> Path | None:
    """The report of a failed subject (errors section with its crash files, whatever else exists)."""
    return _guarded(f"report of sub-{label}", _write_report, config.paths.output_dir, label)


def rebuild_reports(config, labels) -> int:
    """``--reports-only``: rebuild every selected subject's report and the citation; 0, or 1 if one failed."""
    failed = 0
    for label in labels:
        written = _guarded(f"report of sub-{label}", _write_report, config.paths.output_dir, label)
        failed += written is None
        if written is not None:
            logger.info("sub-%s: report rebuilt: %s", label, written)
    if _guarded("logs/CITATION.md", write_citation, config) is None:
        failed += 1
    return 1 if failed else 0


def write_citation(config, labels=None) -> Path:
    """``logs/CITATION.md`` (+ ``.bib``) from the newest run record of every subject (or of ``labels``)."""
    from bssfp2dt.evaluation.citation import write_citation_files
    from bssfp2dt.evaluation.subject_report import latest_context

    output_dir = Path(config.paths.output_dir)
    if labels is None:
        labels = sorted(path.name[4:] for path in output_dir.glob("sub-*") if path.is_dir())
    contexts = [context for context in (latest_context(output_dir, label) for label in labels) if context]
    return write_citation_files(output_dir, contexts)


def run_settings(config) -> dict[str, str]:
    """The settings a reader of the report needs (JSON-ready strings; no run id or time, so that the same
    inputs give a byte-identical report)."""
    return {"bssfp2dt version": config.run.version,
            "input modality": config.selection.input_modality,
            "Gibbs-ringing removal (--unringing-method)": config.preprocessing.unringing_method,
            "DWI denoising (--denoise-method)": config.preprocessing.denoise_method,
            "DWI head-motion correction (--hmc-model)": config.preprocessing.hmc_model,
            "output spaces": " ".join(getattr(config.model, "output_spaces", ("T1w",))),
            "patch size (voxels)": str(config.model.patch_size), "device": config.resources.device}


def _write_mosaics(output_dir: Path, subject: str, session: str | None, modality: str) -> list[Path]:
    """FA, colour-FA, MD mosaics from the written outputs of a session (nothing when it had no prediction)."""
    from bssfp2dt.evaluation.subject_report import write_map_mosaics
    from bssfp2dt.io.derivatives import tensor_map_paths
    from bssfp2dt.io.nifti import load_nifti

    paths = tensor_map_paths(subject, session, modality, output_dir)
    if not paths.diffusivity.is_file():
        return []
    maps = {"fa": load_nifti(paths.fa)[0], "md": load_nifti(paths.md)[0], "rgb": load_nifti(paths.colour_fa)[0]}
    mask = np.asarray(load_nifti(paths.brain_mask)[0]) > 0
    return write_map_mosaics(output_dir, subject, session, modality, maps, mask)


def _write_report(output_dir: Path, subject: str) -> Path:
    from bssfp2dt.evaluation.report import write_participant_report

    return write_participant_report(output_dir, subject)


def _guarded(what: str, function, *args):
    """Run a reporting step; a failure is one warning (with the traceback at -vv) and returns None."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - the report never fails the subject
        logger.warning("%s not written: %s: %s", what, type(error).__name__, error)
        logger.debug("traceback of the failed report step", exc_info=True)
        return None
