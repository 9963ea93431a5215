"""The participant report of every subject, with or without DWI: inputs, QC, predicted maps, model, errors.

During the participant run :func:`write_session_qc` draws the reportlets of one session into
``sub-<label>/figures/`` and :func:`write_report_context` records what the report needs to be rebuilt
without the work directory (inputs, the preprocessing steps that ran, the model and its caveats) as
``sub-<label>/log/<run_uuid>/report_context.json``. :func:`report_sections` turns the newest context, the
figures, the evaluation tables and the crash files into the sections of ``sub-<label>.html``, so
``--reports-only`` rebuilds the report from the output folder alone.
"""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FIGURES_FOLDER = "figures"
CONTEXT_NAME = "report_context.json"
MODEL_CARD_URL = "https://github.com/bssfp2dt/bssfp2dt/blob/main/docs/model-card.md"
#: QC figures of a session, in report order: desc label -> (suffix, caption).
QC_FIGURES = {
    "tissues": ("dseg", "T1w with the brain mask (red) and the WM (blue), GM (green) and CSF (orange) outlines, "
                        "probability 0.5, on the common grid"),
    "coregbssfp": ("T2w", "bSSFP mean magnitude (all phase cycles) on the T1w grid before and after the rigid "
                          "registration; the T1w brain (red) and WM (blue) outlines should follow its edges"),
    "coregdwi": ("dwi", "DWI mean b0 on the T1w grid before and after the rigid registration; the T1w brain (red) "
                        "and WM (blue) outlines should follow its edges"),
    "normqc": ("T1w", "the subject's brain-masked T1w normalised to the template (--output-spaces), with the "
                      "outline of the template's brain (GM + WM probability 0.5, red)"),
}
#: Predicted-map mosaics: param -> (suffix label, caption).
MAP_FIGURES = {"fa": ("FA", "predicted FA (0..1), axial slices"),
               "colourfa": ("colour-FA", "predicted colour-FA (red x, green y, blue z, scaled by FA)"),
               "md": ("MD", "predicted MD (10^-3 mm^2/s, window 0-3), axial slices")}


# --------------------------------------------------------------------------- paths
def figures_dir(output_dir: Path | str, subject: str) -> Path:
    """``output_dir/sub-<label>/figures`` (fMRIPrep's place: one subject's folder is self-contained)."""
    return Path(output_dir) / f"sub-{subject}" / FIGURES_FOLDER


def qc_figure_path(output_dir: Path | str, subject: str, session: str | None, desc: str, suffix: str,
                   space: str | None = None) -> Path:
    """``sub-<s>/figures/sub-<s>[_ses-<t>][_space-<template>]_desc-<desc>_<suffix>.png``."""
    from bssfp2dt.io.naming import bids_filename

    return figures_dir(output_dir, subject) / bids_filename(suffix, ".png", subject=subject, session=session,
                                                             space=space, description=desc)


def map_figure_path(output_dir: Path | str, subject: str, session: str | None, modality: str, param: str) -> Path:
    """``sub-<s>/figures/sub-<s>[_ses-<t>]_desc-<modality>_param-<param>_dwimap.png``."""
    from bssfp2dt.io.derivatives import modality_desc
    from bssfp2dt.io.naming import bids_filename

    return figures_dir(output_dir, subject) / bids_filename(
        "dwimap", ".png", subject=subject, session=session, description=modality_desc(modality), param=param)


# --------------------------------------------------------------------------- figures of one session
def write_session_qc(output_dir: Path | str, preprocessed_session, raw_session) -> list[Path]:
    """Registration QC (bSSFP, b0) and tissue outlines of one preprocessed session; returns the PNGs.

    ``preprocessed_session``: :class:`bssfp2dt.preprocessing.sessions.PreprocessedSession` (T1w grid,
    mask, tissues, provenance with the registration transforms); ``raw_session``: its
    :class:`bssfp2dt.io.bids.SessionInputs` (the raw moving images).
    """
    from bssfp2dt.evaluation import reportlets
    from bssfp2dt.io.nifti import load_nifti

    session = preprocessed_session
    t1w, affine = load_nifti(session.t1w)
    mask = np.asarray(load_nifti(session.brain_mask)[0]) > 0
    tissues = {name.upper(): np.asarray(load_nifti(getattr(session, name))[0], dtype=np.float64)
               for name in ("wm", "gm", "csf")}
    outlines = {"brain": mask.astype(np.float64), **tissues}
    where = f"sub-{session.subject}" + (f", ses-{session.session}" if session.session else "")
    written = []
    tissue_session = session.t1w_session if session.t1w_session is not None else session.session
    path = qc_figure_path(output_dir, session.subject, tissue_session, "tissues", "dseg")
    if not path.exists() or tissue_session == session.session:
        written.append(reportlets.tissue_outline_figure(np.asarray(t1w, dtype=np.float64), outlines, path,
                                                        f"brain mask and tissue outlines on the T1w, {where}"))
    steps = json.loads(Path(session.provenance).read_text()).get("steps", [])
    for what, desc in (("bssfp", "coregbssfp"), ("dwi", "coregdwi")):
        moving = _moving_image(raw_session, what)
        if moving is None:
            continue
        before, after = _before_after(*moving, _transform(steps, what), t1w.shape[:3], affine)
        written.append(reportlets.registration_figure(
            before, after, {"brain": outlines["brain"], "WM": tissues["WM"]}, mask,
            qc_figure_path(output_dir, session.subject, session.session, desc, QC_FIGURES[desc][0]),
            f"{'bSSFP mean magnitude' if what == 'bssfp' else 'DWI mean b0'} on the T1w, {where}"))
    return written


def write_map_mosaics(output_dir: Path | str, subject: str, session: str | None, modality: str,
                      maps: Mapping[str, np.ndarray], mask: np.ndarray) -> list[Path]:
    """FA, colour-FA and MD mosaics of one prediction (``maps`` from :func:`bssfp2dt.dti.maps.tensor_maps`)."""
    from bssfp2dt.evaluation import reportlets

    where = f"sub-{subject}" + (f", ses-{session}" if session else "") + f", {modality} input"
    # MD in 10^-3 mm^2/s on a fixed window (0..3: white matter ~0.7, CSF ~3), comparable between subjects
    volumes = {"fa": (maps["fa"], (0.0, 1.0), "", "gray"), "colourfa": (maps["rgb"], None, "", "gray"),
               "md": (np.asarray(maps["md"]) * 1e3, (0.0, 3.0), "MD (10^-3 mm^2/s)", "viridis")}
    return [reportlets.map_mosaic(volume, mask, map_figure_path(output_dir, subject, session, modality, param),
                                  f"{MAP_FIGURES[param][1]}, {where}", unit, window, cmap)
            for param, (volume, window, unit, cmap) in volumes.items()]


def _moving_image(raw_session, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The raw moving image of a registration: bSSFP mean magnitude or DWI mean b0, with its affine."""
    from bssfp2dt.evaluation.reportlets import mean_b0
    from bssfp2dt.io.nifti import load_nifti

    if what == "bssfp" and raw_session.bssfp is not None:
        data, affine = load_nifti(raw_session.bssfp.magnitude)
        data = np.asarray(data, dtype=np.float64)
        return (data.mean(axis=-1) if data.ndim == 4 else data), affine
    if what == "dwi" and raw_session.dwi is not None:
        data, affine = load_nifti(raw_session.dwi.image)
        bvals = np.loadtxt(raw_session.dwi.bval, ndmin=1)
        return mean_b0(np.asarray(data, dtype=np.float64).reshape(*data.shape[:3], -1), bvals), affine
    return None


def _transform(steps: Sequence[Mapping[str, Any]], what: str) -> np.ndarray | None:
    """The 4x4 T1w world -> moving world transform of the registration step of ``what`` (None if absent)."""
    for step in steps:
        name = str(step.get("step", ""))
        if "register" in name and what in name and "transform" in step:
            return np.asarray(step["transform"], dtype=np.float64)
    return None


def _before_after(data: np.ndarray, affine: np.ndarray, transform: np.ndarray | None, shape, grid_affine):
    """The moving image on the T1w grid by scanner coordinates alone, and through the registration."""
    from bssfp2dt.preprocessing.resampling import resample

    before = resample(data, affine, tuple(shape), grid_affine)
    after = before if transform is None else resample(data, affine, tuple(shape), grid_affine, transform)
    return before, after


# --------------------------------------------------------------------------- context of the report
def write_report_context(output_dir: Path | str, subject: str, run_uuid: str, context: Mapping[str, Any]) -> Path:
    """Record the report's inputs (JSON) in ``sub-<label>/log/<run_uuid>/report_context.json``."""
    from bssfp2dt.io.derivatives import subject_log_dir
    from bssfp2dt.io.nifti import write_json

    return write_json(dict(context), subject_log_dir(Path(output_dir), subject, run_uuid) / CONTEXT_NAME)


def session_context(preprocessed_session, raw_session, bids_dir: Path) -> dict[str, Any]:
    """Inputs found and preprocessing steps that ran for one session (JSON-ready)."""
    record = json.loads(Path(preprocessed_session.provenance).read_text())
    inputs = {}
    for name, path in _raw_files(raw_session).items():
        try:
            inputs[name] = Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()
        except ValueError:
            inputs[name] = str(path)
    return {"session": preprocessed_session.session, "t1w_session": preprocessed_session.t1w_session,
            "inputs": inputs, "steps": record.get("steps", [])}


def _raw_files(raw_session) -> dict[str, Path]:
    files = {"T1w": raw_session.t1w.image}
    if raw_session.bssfp is not None:
        files.update({"bSSFP magnitude": raw_session.bssfp.magnitude, "bSSFP phase": raw_session.bssfp.phase})
    if raw_session.dwi is not None:
        files["DWI"] = raw_session.dwi.image
        if getattr(raw_session.dwi, "reverse_pe_b0", None):
            files["reverse-PE b0"] = raw_session.dwi.reverse_pe_b0
    return files


def model_context(model) -> dict[str, Any]:
    """Id, version, sha256, modality and caveats of a :class:`~bssfp2dt.pipeline.participant.LoadedModel`."""
    return {"id": model.id, "version": model.version, "sha256": model.sha256, "modality": model.modality,
            "size": model.metadata.size_name, "stage": model.metadata.stage,
            "caveats": model_caveats(model.id)}


def model_caveats(model_id: str) -> list[str]:
    """The model card's caveats for a packaged model; a note that there is no card for any other."""
    from bssfp2dt.models.registry import load_registry

    entry = next((item for item in load_registry().values() if item.id == model_id), None)
    if entry is None:
        return ["Not a packaged model: it has no model card here; its validity is whatever its training showed."]
    caveats = []
    data = str(entry.training.get("data", ""))
    if "simulat" in data.lower():
        caveats.append(f"Trained on simulated data only ({data}): it shows that the pipeline runs end to end and "
                       "is a starting point for training, not a model of real brains. On real data, train your "
                       "own model (README, 'Training your own model').")
    if entry.evaluation:
        caveats.append(f"Held-out evaluation: {entry.evaluation.get('data', 'see the model card')}; the model card "
                       f"compares it with the tissue-mean baseline ({MODEL_CARD_URL}).")
    return caveats or [f"See the model card ({MODEL_CARD_URL})."]


def latest_context(output_dir: Path | str, subject: str) -> dict[str, Any] | None:
    """The newest ``report_context.json`` of the subject (run folders sort by time), or None."""
    from bssfp2dt.io.derivatives import subject_log_dir

    folder = subject_log_dir(Path(output_dir), subject, "x").parent
    for path in sorted(folder.glob(f"*/{CONTEXT_NAME}"), reverse=True):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            logger.warning("%s is skipped in the report: %s", path, error)
    return None


# --------------------------------------------------------------------------- HTML sections
def report_sections(output_dir: Path | str, subject: str, report_dir: Path) -> dict[str, str]:
    """HTML of the summary, model, QC, predicted-map and errors sections (keys in that order)."""
    output_dir = Path(output_dir)
    context = latest_context(output_dir, subject) or {}
    return {"summary": _summary_section(context), "model": _model_section(context.get("model")),
            "qc": _figures_section(output_dir, subject, report_dir, "QC"),
            "maps": _figures_section(output_dir, subject, report_dir, "maps"),
            "errors": _errors_section(output_dir, subject, report_dir)}


def _summary_section(context: Mapping[str, Any]) -> str:
    from bssfp2dt.evaluation.pages import html_table

    if not context:
        return ('<h2 id="summary">Summary</h2><p class="note">No run record (report_context.json) in the log '
                "folder: this subject has not finished a participant run with this version.</p>")
    parts = ['<h2 id="summary">Summary</h2><div class="text">',
             html_table(["setting", "value"],
                        [[key, str(value)] for key, value in context.get("settings", {}).items()])]
    for session in context.get("sessions", []):
        label = f"ses-{session['session']}" if session.get("session") else "no session"
        parts.append(f"<h3>{html.escape(label)}: inputs and preprocessing</h3>")
        parts.append(html_table(["input", "file"], list(session.get("inputs", {}).items())))
        parts.append(html_table(["step", "what ran"], [[step.get("step", "?"), describe_step(step)]
                                                        for step in session.get("steps", [])]))
    return "\n".join(parts) + "</div>"


def describe_step(step: Mapping[str, Any]) -> str:
    """A one-line summary of a provenance step (its settings and results; matrices and timings left out)."""
    shown = []
    for key, value in step.items():
        # timings are left out: the same inputs give a byte-identical report (they are in the logs)
        if key in ("step", "transform", "grid_affine", "global_phases_rad", "seconds"):
            continue
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(f"{item:.3g}" if isinstance(item, float) else str(item) for item in value) + "]"
        elif isinstance(value, dict):
            value = "{" + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                    for k, v in value.items()) + "}"
        shown.append(f"{key}: {value}")
    return "; ".join(shown)


def _model_section(model: Mapping[str, Any] | None) -> str:
    from bssfp2dt.evaluation.pages import html_table

    if not model:
        return ""
    rows = [["id", model.get("id")], ["version", model.get("version")], ["sha256", model.get("sha256")],
            ["input modality", model.get("modality")], ["generator size", model.get("size")],
            ["training stage", model.get("stage")]]
    caveats = "".join(f"<li>{html.escape(text)}</li>" for text in model.get("caveats", []))
    return (f'<h2 id="model">Model</h2>\n<div class="text">{html_table(["field", "value"], rows)}</div>\n'
            f'<div class="note"><strong>Caveats (model card)</strong><ul>{caveats}</ul></div>')


def _figures_section(output_dir: Path, subject: str, report_dir: Path, which: str) -> str:
    from bssfp2dt.evaluation.pages import html_figure

    folder = figures_dir(output_dir, subject)
    # subject-level figures (tissues, normalisation) first, then each session's, in session order
    found = sorted(folder.glob("*.png"), key=lambda path: ("_desc-coreg" in path.name, path.name)) \
        if folder.is_dir() else []
    parts = []
    for path in found:
        caption = _caption(path.name, which)
        if caption is not None:
            parts.append(html_figure(Path(os.path.relpath(path, report_dir)).as_posix(), f"{path.stem}: {caption}"))
    title = {"QC": "Input quality control", "maps": "Predicted maps"}[which]
    anchor = {"QC": "qc", "maps": "maps"}[which]
    if not parts:
        parts.append('<p class="note">No figures were found in '
                     f"{html.escape(Path(os.path.relpath(folder, report_dir)).as_posix())}.</p>")
    return f'<h2 id="{anchor}">{title}</h2>\n' + "\n".join(parts)


def _caption(name: str, which: str) -> str | None:
    """The caption of a figure of section ``which`` (None when the figure belongs to another section)."""
    if which == "QC":
        return next((caption for desc, (suffix, caption) in QC_FIGURES.items()
                     if f"_desc-{desc}_{suffix}.png" in name or name.endswith(f"_desc-{desc}_{suffix}.png")), None)
    if name.endswith("_dwimap.png"):
        return next((caption for param, (_, caption) in MAP_FIGURES.items() if f"_param-{param}_" in name), None)
    return None


def _errors_section(output_dir: Path, subject: str, report_dir: Path) -> str:
    from bssfp2dt.io.derivatives import subject_log_dir

    folder = subject_log_dir(output_dir, subject, "x").parent
    # bssfp2dt's crash files (.txt) and nipype's (crash-*.pklz, read with `nipypecli crash`)
    crashes = sorted(folder.glob("*/crash-*"), reverse=True) if folder.is_dir() else []
    if not crashes:
        return '<h2 id="errors">Errors</h2>\n<p>No errors to report.</p>'
    items = []
    for path in crashes:
        lines = path.read_text(errors="replace").splitlines() if path.suffix == ".txt" else []
        summary = lines[1] if len(lines) > 1 else f"nipype crash file: nipypecli crash {path.name}"
        link = Path(os.path.relpath(path, report_dir)).as_posix()
        items.append(f'<li><a href="{html.escape(link, quote=True)}">{html.escape(path.parent.name)}/'
                     f"{html.escape(path.name)}</a>: {html.escape(summary)}</li>")
    return f'<h2 id="errors">Errors</h2>\n<p class="note">{len(crashes)} failed step(s):</p><ul>{"".join(items)}</ul>'
