"""Participant-level evaluation (error maps, tables, figures, ``sub-<label>.html``) and the HTML writers.

:func:`evaluate_participant` is what the participant pipeline calls once per prediction that has a
reference tensor (one subject, input session, DWI session and modality). It writes, through
:mod:`bssfp2dt.io.derivatives` (the only place that names outputs):

- error maps next to the prediction (``..._desc-<modality>error[ref<ses>]_model-tensor_param-<p>_dwimap``:
  ``diffusivity`` 6 volumes of element-wise relative errors, ``fa``/``md``/``ad``/``rd`` relative errors,
  ``inclination``/``azimuth``/``v1angle`` in degrees; NaN marks excluded voxels, 0 is outside the mask),
- the tidy statistics table ``..._errors.tsv`` (:mod:`.statistics`) and its JSON sidecar (column
  descriptions, image metrics, thresholds, the figures' paths),
- PNG figures in ``sub-<label>/figures/``; the report ``sub-<label>.html`` is rebuilt from every table,
  figure and run record of the subject on disk (:mod:`.subject_report`), so it covers all session pairs
  however many calls wrote them, and subjects without DWI get one too.

Reports are self-contained for offline viewing: inline CSS, no scripts, images referenced by relative
paths next to the report.
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bssfp2dt.errors import InputOutputError, MissingInputError
from bssfp2dt.evaluation.errors import ERROR_UNITS, TENSOR_ELEMENTS, ErrorFloors, error_maps
from bssfp2dt.evaluation.metrics import ImageMetrics, image_metrics
from bssfp2dt.evaluation.pages import CSS, html_figure, html_page, html_table  # noqa: F401 - also public here
from bssfp2dt.evaluation.statistics import (BRAIN, COLUMN_DESCRIPTIONS, POOLED_METRICS, TISSUES,
                                            EvaluationEntities, frame_to_tsv, image_metric_rows, read_table,
                                            rows_to_frame, tissue_statistics)

logger = logging.getLogger(__name__)

#: Units of every table metric (pooled elements are relative errors too).
METRIC_UNITS = {**{name: "ratio" for name in POOLED_METRICS}, **ERROR_UNITS, "psnr": "dB", "ssim": "", "fid": ""}
#: Metrics shown in the participant boxplots and summary tables.
REPORT_METRICS = ("diagonal", "offdiagonal", "fa", "md", "ad", "rd", "inclination", "azimuth", "v1angle")
#: Reference vs prediction figures (figure name -> (title, unit)), as the reference's Figures 4.10-4.15.
COMPARISON_FIGURES = {"Dxx": ("Dxx (D11)", "mm^2/s"), "Dyz": ("Dyz (D23)", "mm^2/s"), "MD": ("MD", "mm^2/s"),
                      "FA": ("FA", ""), "colourFA": ("colour-FA (red x, green y, blue z)", "")}
ERROR_MAP_FIGURE_METRICS = ("D11", "D23", "md", "fa", "v1angle")
_ERROR_MAP_PARAMS = ("diffusivity", "fa", "md", "ad", "rd", "inclination", "azimuth", "v1angle")


@dataclass(frozen=True)
class ParticipantEvaluation:
    """Paths written by :func:`evaluate_participant` and its image metrics."""

    table: Path
    sidecar: Path
    error_maps: dict[str, Path]
    figures: dict[str, Path]
    report: Path
    metrics: ImageMetrics


# --------------------------------------------------------------------------- participant level
def evaluate_participant(predicted, reference, tissues: Mapping[str, Any], mask, affine: np.ndarray | None,
                         entities: EvaluationEntities, output_dir: Path | str, *, threshold: float = 0.5,
                         floors: ErrorFloors = ErrorFloors(), normalization=None,
                         fid_weights: Path | str | None = None, sources: Sequence[str] = ()) -> ParticipantEvaluation:
    """Evaluate one predicted tensor against its reference and write maps, tables, figures and the report.

    Parameters
    ----------
    predicted, reference : (X, Y, Z, 6) BEP016 tensors in mm^2/s, arrays or NIfTI paths (same grid).
    tissues : ``{"CSF": ..., "GM": ..., "WM": ...}`` probability maps (X, Y, Z), 0..1, arrays or paths
        (keys case-insensitive: ``gm`` as in :class:`~bssfp2dt.io.derivatives.OutputPaths` works too).
    mask : (X, Y, Z) brain mask, array or path.
    affine : 4x4 voxel-to-mm affine; None takes the reference file's.
    entities : subject, input session, DWI session, modality.
    output_dir : root of the derivatives dataset.
    threshold : tissue probability above which a voxel enters the unweighted statistics.
    floors : near-zero reference thresholds of the relative errors.
    normalization : the model's tensor normalisation for PSNR/SSIM/FID (None: fitted on the reference).
    fid_weights : local MedicalNet ResNet-10 weights for FID (None: FID not computed).
    sources : BIDS URIs of the prediction and reference, recorded in the sidecars.
    """
    output_dir = Path(output_dir)
    predicted, pred_affine = _load(predicted, "predicted tensor")
    reference, ref_affine = _load(reference, "reference tensor")
    mask = _load(mask, "brain mask")[0] > 0
    tissues = {name.upper(): _load(value, f"{name} probability map")[0] for name, value in tissues.items()}
    affine = next((item for item in (affine, ref_affine, pred_affine) if item is not None), None)
    if affine is None:
        raise ValueError("an affine is needed when the tensors are given as arrays")
    affine = np.asarray(affine, dtype=np.float64)
    _check_shapes(predicted, reference, mask, tissues)

    maps = error_maps(predicted, reference, mask, floors)
    metrics = image_metrics(predicted, reference, mask, normalization, fid_weights)
    written_maps = _write_error_maps(maps, mask, affine, entities, output_dir, sources, floors)
    figures = _write_figures(predicted, reference, maps, tissues, mask, entities, output_dir, threshold)

    rows = tissue_statistics(maps, tissues, mask, entities, threshold)
    rows += image_metric_rows({"psnr": metrics.psnr, "ssim": metrics.ssim, "fid": metrics.fid}, entities,
                              int(mask.sum()))
    from bssfp2dt.io.derivatives import error_table_path, error_table_sidecar_path
    from bssfp2dt.io.nifti import write_json, write_text

    table = error_table_path(output_dir, entities.subject, entities.input_session, entities.modality,
                             entities.dwi_session)
    sidecar = error_table_sidecar_path(table)
    relative = {name: path.relative_to(output_dir).as_posix() for name, path in figures.items()}
    try:
        write_json(_table_sidecar(entities, metrics, threshold, floors, relative, written_maps, output_dir,
                                  sources), sidecar)
        write_text(frame_to_tsv(rows_to_frame(rows)), table)
    except OSError as error:
        raise InputOutputError(f"cannot write {table} ({error.strerror}); check free space and permissions") from None
    report = write_participant_report(output_dir, entities.subject)
    logger.info("sub-%s: error statistics in %s, report %s", entities.subject, table, report)
    return ParticipantEvaluation(table, sidecar, written_maps, figures, report, metrics)


def _load(value, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An array, or a NIfTI path loaded as float64 (with its affine)."""
    if isinstance(value, (str, Path)):
        import nibabel as nib

        try:
            image = nib.load(str(value))
            return np.asarray(image.dataobj, dtype=np.float64), image.affine
        except (OSError, nib.filebasedimages.ImageFileError) as error:
            raise MissingInputError(f"{what} {value} cannot be read ({error}); rerun the step that writes it") from None
    return np.asarray(value), None


def _check_shapes(predicted, reference, mask, tissues) -> None:
    if predicted.shape != reference.shape or predicted.shape[:-1] != mask.shape:
        raise ValueError(f"predicted {predicted.shape}, reference {reference.shape} and mask {mask.shape} "
                         "must share the grid (X, Y, Z, 6) / (X, Y, Z)")
    for name, values in tissues.items():
        if values.shape != mask.shape:
            raise ValueError(f"{name} probability map {values.shape} does not match the mask {mask.shape}")


def _write_error_maps(maps, mask, affine, entities, output_dir, sources, floors) -> dict[str, Path]:
    from bssfp2dt.io.derivatives import error_map_path, write_image

    inside = mask[..., None]
    volumes = {"diffusivity": np.where(inside, np.stack([maps[name] for name in TENSOR_ELEMENTS], axis=-1), 0.0)}
    volumes.update({name: np.where(mask, maps[name], 0.0) for name in _ERROR_MAP_PARAMS[1:]})
    written = {}
    for param, volume in volumes.items():
        relative = param not in ("inclination", "azimuth", "v1angle")
        floor = (floors.tensor if param == "diffusivity" else floors.floor(param)) if relative else None
        sidecar = {
            "Description": (f"relative error |pred - ref| / |ref| of {param}"
                            + (f" (volumes {', '.join(TENSOR_ELEMENTS)})" if param == "diffusivity" else "")
                            if relative else f"absolute angular error of the principal eigenvector: {param}"),
            "Units": "ratio" if relative else "deg",
            "ExcludedVoxels": "NaN: voxel of the mask whose reference is near zero or undefined; 0 outside the mask",
            "Sources": list(sources), "SkullStripped": True,
            "InputSession": entities.input_session, "DWISession": entities.dwi_session,
        }
        if floor is not None:
            sidecar["NearZeroThreshold"] = floor
        path = error_map_path(output_dir, entities.subject, entities.input_session, entities.modality, param,
                              entities.dwi_session)
        written[param] = write_image(volume, affine, path, sidecar)
    return written


def _write_figures(predicted, reference, maps, tissues, mask, entities, output_dir, threshold) -> dict[str, Path]:
    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.evaluation import figures
    from bssfp2dt.io.derivatives import participant_figure_path

    def path(name: str) -> Path:
        return participant_figure_path(output_dir, entities.subject, entities.input_session, entities.modality,
                                       entities.dwi_session, name)

    finite = mask & np.isfinite(predicted).all(-1) & np.isfinite(reference).all(-1)
    pred_maps, ref_maps = tensor_maps(predicted, finite), tensor_maps(reference, finite)
    volumes = {"Dxx": (reference[..., 0], predicted[..., 0]), "Dyz": (reference[..., 4], predicted[..., 4]),
               "MD": (ref_maps["md"], pred_maps["md"]), "FA": (ref_maps["fa"], pred_maps["fa"]),
               "colourFA": (ref_maps["rgb"], pred_maps["rgb"])}
    label = _pair_label(entities.columns())
    written = {}
    for name, (ref_volume, pred_volume) in volumes.items():
        title, unit = COMPARISON_FIGURES[name]
        value_range = (0.0, 1.0) if name == "FA" else None
        written[name] = figures.comparison_figure(np.where(_expand(mask, ref_volume), ref_volume, 0.0),
                                                  np.where(_expand(mask, pred_volume), pred_volume, 0.0), mask,
                                                  path(name), f"{title}: reference vs prediction, {label}", unit,
                                                  value_range)
    written["errormaps"] = figures.error_maps_figure(
        {name: display_values(name, maps[name]) for name in ERROR_MAP_FIGURE_METRICS}, display_units(), mask,
        path("errormaps"), f"error maps, {label}")
    samples = {}
    for metric in REPORT_METRICS:
        members = POOLED_METRICS.get(metric, (metric,))
        samples[metric] = {}
        ordered = sorted(tissues, key=lambda name: (TISSUES.index(name) if name in TISSUES else len(TISSUES), name))
        for tissue, probability in [*((name, tissues[name]) for name in ordered), (BRAIN, mask.astype(float))]:
            selected = mask & (np.nan_to_num(probability) > threshold)
            values = np.concatenate([maps[member][selected] for member in members])
            samples[metric][tissue] = display_values(metric, values[np.isfinite(values)])
    written["boxplots"] = figures.tissue_boxplot(samples, display_units(), path("boxplots"),
                                                 f"voxel errors by tissue (probability > {threshold:g}), {label}")
    return written


def _expand(mask: np.ndarray, volume: np.ndarray) -> np.ndarray:
    return mask[..., None] if np.ndim(volume) == mask.ndim + 1 else mask


def _table_sidecar(entities, metrics, threshold, floors, figures, error_maps_written, output_dir, sources) -> dict:
    return {
        **{column: {"Description": text} for column, text in COLUMN_DESCRIPTIONS.items()},
        "Entities": entities.columns(),
        "ImageMetrics": {**metrics.values(), "NotComputed": metrics.not_computed},
        "TissueProbabilityThreshold": threshold,
        "NearZeroThresholds": asdict(floors),
        "Figures": figures,
        "ErrorMaps": {name: path.relative_to(output_dir).as_posix() for name, path in error_maps_written.items()},
        "Sources": list(sources),
    }


def _pair_label(columns: Mapping[str, Any]) -> str:
    def session(value):
        return "no session" if value in (None, "") or _is_missing(value) else f"ses-{value}"

    return (f"{columns['participant_id']}, {columns['modality']} input ({session(columns['input_session'])}) "
            f"vs DWI reference ({session(columns['dwi_session'])})")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# --------------------------------------------------------------------------- participant report
def write_participant_report(output_dir: Path | str, subject: str) -> Path:
    """(Re)build ``sub-<subject>.html`` from what the output folder holds for the subject.

    Sections: summary (inputs found, settings, preprocessing that ran), model (id, sha256, card caveats),
    input QC (registration, mask and tissue outlines), predicted maps, the evaluation of every error table
    (only when a DWI reference was evaluated) and the errors (crash files). Works for subjects without DWI.
    """
    from bssfp2dt.evaluation.subject_report import report_sections
    from bssfp2dt.io.derivatives import error_table_sidecar_path, find_error_tables, participant_report_path
    from bssfp2dt.io.atomic import write_text

    output_dir = Path(output_dir)
    report = participant_report_path(output_dir, subject)
    evaluations = []
    for table in find_error_tables(output_dir, subject):
        try:
            frame = read_table(table)
            sidecar = json.loads(error_table_sidecar_path(table).read_text())
        except (OSError, ValueError) as error:
            logger.warning("%s is skipped in the report: %s", table, error)
            continue
        evaluations.append(_pair_section(frame, sidecar, output_dir, report.parent))
    sections = report_sections(output_dir, subject, report.parent)
    evaluation = ('<h2 id="evaluation">Evaluation against the DWI tensor</h2>\n' + "\n".join(evaluations)
                  if evaluations else
                  '<h2 id="evaluation">Evaluation</h2>\n<p class="note">No DWI reference was evaluated for this '
                  "subject (no DWI session, or none on the prediction's grid): the predicted maps are shown "
                  "without errors.</p>")
    links = " | ".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in (
        ("summary", "Summary"), ("model", "Model"), ("qc", "Input QC"), ("maps", "Predicted maps"),
        ("evaluation", "Evaluation"), ("errors", "Errors")))
    body = (f"<h1>bssfp2dt: sub-{html.escape(subject)}</h1>\n<p>{links}</p>\n"
            + "\n".join([sections["summary"], sections["model"], sections["qc"], sections["maps"], evaluation,
                          sections["errors"]]))
    return write_text(html_page(f"sub-{subject} report", body), report)


def _pair_section(frame, sidecar: Mapping, output_dir: Path, report_dir: Path) -> str:
    parts = [f"<h3>{html.escape(_pair_label(sidecar['Entities']))}</h3>"]
    metrics = sidecar.get("ImageMetrics", {})
    reasons = metrics.get("NotComputed", {})
    parts.append(html_table(["image metric", "value"], [
        [name.upper(), format_value(name, metrics.get(name)) if metrics.get(name) is not None
         else f"not computed: {reasons.get(name, 'unknown reason')}"] for name in ("psnr", "ssim", "fid")]))
    parts.append(f"<p>Weighted mean: tissue-probability-weighted "
                 f"over the brain mask; median [25th-75th percentile]: voxels with probability &gt; "
                 f"{sidecar.get('TissueProbabilityThreshold', 0.5):g}; excluded: voxels with a near-zero or "
                 f"undefined reference.</p>")
    parts.append(_statistics_table(frame))
    listed = sidecar.get("Figures", {})
    order = [name for name in (*COMPARISON_FIGURES, "errormaps", "boxplots") if name in listed]
    for name in order + sorted(set(listed) - set(order)):
        relative = listed[name]
        target = os.path.relpath(output_dir / relative, report_dir)
        parts.append(html_figure(Path(target).as_posix(), _figure_caption(name)))
    return "\n".join(parts)


def _figure_caption(name: str) -> str:
    if name in COMPARISON_FIGURES:
        return f"{COMPARISON_FIGURES[name][0]}: reference (top) vs prediction (bottom), three planes"
    captions = {"errormaps": "error maps (light blue: excluded voxels)",
                "boxplots": "voxel errors by tissue: median, quartiles, whiskers at the 1st/99th percentiles"}
    return captions.get(name, name)


def _statistics_table(frame) -> str:
    """One row per metric and tissue: weighted mean, median, quartiles, 1st/99th percentiles, voxel counts."""
    tissues = [tissue for tissue in (*TISSUES, BRAIN) if tissue in set(frame["tissue"])]
    lookup = {(metric, tissue, statistic): (value, n_voxels, n_excluded)
              for metric, tissue, statistic, value, n_voxels, n_excluded
              in frame[["metric", "tissue", "statistic", "value", "n_voxels", "n_excluded"]].itertuples(index=False)}
    shown = ("weighted_mean", "median", "p25", "p75", "p01", "p99")
    rows = []
    for metric in REPORT_METRICS:
        for tissue in tissues:
            if (metric, tissue, "median") not in lookup:
                continue
            _, n_voxels, n_excluded = lookup[(metric, tissue, "median")]
            rows.append([f"{metric} ({display_unit(metric)})", tissue]
                        + [format_number(metric, lookup.get((metric, tissue, name), (None,))[0]) for name in shown]
                        + [str(int(n_voxels)), str(int(n_excluded))])
    header = ["metric", "tissue", "weighted mean", "median", "p25", "p75", "p01", "p99", "voxels", "excluded"]
    return html_table(header, rows)


# --------------------------------------------------------------------------- HTML building blocks
def display_values(metric: str, values):
    """Values in their display unit: relative errors x 100 (%), everything else unchanged."""
    return values * 100.0 if METRIC_UNITS.get(metric) == "ratio" else values


def display_units() -> dict[str, str]:
    """Metric -> display unit label (``%``, ``deg``, ``dB``, ``-``), for figure axes."""
    return {metric: display_unit(metric) for metric in METRIC_UNITS}


def display_unit(metric: str) -> str:
    """Unit a metric is displayed in: % for relative errors, deg, dB, or ``-``."""
    return {"ratio": "%", "deg": "deg", "dB": "dB"}.get(METRIC_UNITS.get(metric, ""), "-")


def format_number(metric: str, value) -> str:
    """A statistic in its display unit, without the unit (relative errors x 100); ``n/a`` when missing."""
    if value is None or _is_missing(value):
        return "n/a"
    unit = METRIC_UNITS.get(metric, "")
    if unit == "ratio":
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if unit in ("deg", "dB") else f"{value:.4g}"


def format_value(metric: str, value) -> str:
    """A statistic for display: relative errors in %, angles in deg, PSNR in dB; ``n/a`` when missing."""
    number, unit = format_number(metric, value), display_unit(metric)
    return number if number == "n/a" or unit == "-" else f"{number} {unit}"
