"""Group level: aggregate the participants' error tables into group tables, figures and an HTML report.

Reads only what the participant level wrote (the MRIQC pattern): every ``*_errors.tsv`` under the
selected subjects' folders; it never reruns the network. Writes under ``output_dir/group/``:

- ``group_errors.tsv``: all participant rows, long format (the participant columns, unchanged),
- ``group_summary.tsv``: per modality, tissue, metric and statistic, the distribution over session pairs
  (n_pairs, n_subjects, mean, std (ddof 0), median, p25, p75, min, max of the per-pair values),
- ``group_report.html`` + ``figures/``: boxplots of the per-pair median error by tissue and input modality
  (the reference's Figures 4.6-4.9), the summary table next to the reference thesis' published numbers,
  and the subjects included and excluded, with the reason.

Subjects with participant outputs but no error table (no reference tensor) are listed as excluded; if no
subject has one, the report says so and the run still succeeds (exit 0). No participant results at all
is a :class:`~bssfp2dt.errors.MissingInputError` (exit 66). Subjects whose participant run did not finish
(``sub-<label>/log/<run_uuid>/status.json``, :mod:`bssfp2dt.pipeline.completion`) are left out and
listed as excluded; the group outputs of the others are written, then the run exits 66 naming them
and the command that finishes them.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import InputOutputError, MissingInputError
from bssfp2dt.evaluation import figures
from bssfp2dt.evaluation.reference_results import SOURCE, reference_text
from bssfp2dt.evaluation.pages import html_figure, html_page, html_table
from bssfp2dt.evaluation.report import REPORT_METRICS, display_unit, display_units, display_values, format_number
from bssfp2dt.evaluation.statistics import BRAIN, COLUMNS, TISSUES, frame_to_tsv, read_table
from bssfp2dt.io.derivatives import (find_error_tables, group_dir, group_errors_path, group_figure_path,
                                     group_report_path, group_summary_path)
from bssfp2dt.io.atomic import remove_stale_temporaries, write_text
from bssfp2dt.messages import capped
from bssfp2dt.pipeline.completion import finish_hint, incomplete_subjects

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("modality", "tissue", "metric", "statistic", "n_pairs", "n_subjects", "mean", "std", "median",
                   "p25", "p75", "min", "max")
#: Group figures: name -> metrics (Figure 4.6: tensor elements; 4.7-4.9: scalars and angles).
BOXPLOT_GROUPS = {"tensor-elements": ("diagonal", "offdiagonal"), "scalars": ("fa", "md", "ad", "rd"),
                  "angles": ("inclination", "azimuth", "v1angle")}
#: The per-pair statistic the figures and the summary table show.
SHOWN_STATISTIC = "median"
MODALITY_ORDER = tuple(modality.desc for modality in modalities.REPORT_ORDER)  # desc labels


def run_group(plan) -> int:
    """Aggregate ``plan.participant_results`` (subject -> tensor files) under ``plan.config.paths.output_dir``.

    Returns 0; raises MissingInputError (exit 66) when there are no participant results.
    """
    output_dir = Path(plan.config.paths.output_dir)
    incomplete = incomplete_subjects(output_dir, plan.config.selection.participant_labels)
    for label, reason in incomplete.items():
        logger.warning("sub-%s is incomplete and left out: %s", label, reason)
    subjects = sorted(label for label in plan.participant_results if label not in incomplete)
    if not subjects:
        _raise_incomplete(plan, incomplete)
        raise MissingInputError(f"output_dir {output_dir} has no participant results; run the participant level first")
    stale = remove_stale_temporaries(group_dir(output_dir))  # a killed earlier group run's unfinished files
    if stale:
        logger.info("removed %d unfinished file(s) of an interrupted group run", len(stale))
    frame, included, excluded = collect_tables(output_dir, subjects)
    excluded.update({label: f"incomplete: {reason}" for label, reason in incomplete.items()})
    figure_paths: dict[str, Path] = {}
    summary = None
    try:
        if frame is not None:
            summary = summarise_pairs(frame)
            write_text(frame_to_tsv(frame), group_errors_path(output_dir))
            write_text(summary.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g"),
                       group_summary_path(output_dir))
            figure_paths = write_group_figures(frame, output_dir)
        report = write_text(render_group_report(frame, summary, included, excluded, figure_paths, output_dir),
                            group_report_path(output_dir))
    except OSError as error:
        raise InputOutputError(f"cannot write the group outputs under {output_dir / 'group'} ({error.strerror}); "
                               "check free space and permissions") from None
    if frame is None:
        logger.warning("no subject has an error table (no reference tensor was evaluated); see %s", report)
    else:
        logger.info("group level: %d session pair(s) of %d subject(s) in %s", _count_pairs(frame), len(included),
                    report)
    _raise_incomplete(plan, incomplete)
    return 0


def _raise_incomplete(plan, incomplete: Mapping[str, str]) -> None:
    """Exit 66 naming the incomplete subjects and how to finish them (the report lists them as excluded)."""
    if not incomplete:
        return
    labels = sorted(incomplete)
    config = plan.config
    first = labels[0]
    raise MissingInputError(
        f"{len(labels)} subject(s) incomplete ({capped('sub-' + label for label in labels)}; sub-{first}: "
        f"{incomplete[first]}); {finish_hint(config.paths.bids_dir, config.paths.output_dir, labels)}, or leave "
        "them out with --participant-label, then rerun the group level")


def collect_tables(output_dir: Path, subjects: Sequence[str]):
    """Read every subject's error tables.

    Returns (concatenated DataFrame with :data:`COLUMNS` or None, included subject -> tables,
    excluded subject -> reason).
    """
    import pandas as pd

    frames, included, excluded = [], {}, {}
    for subject in subjects:
        tables = find_error_tables(output_dir, subject)
        if not tables:
            excluded[subject] = "no *_errors.tsv: no reference tensor was evaluated at the participant level"
            continue
        subject_frames, problems = [], []
        for table in tables:
            try:
                subject_frames.append(read_table(table))
            except (OSError, ValueError) as error:
                problems.append(f"{table.name} unreadable ({str(error).splitlines()[0] if str(error) else error})")
        for problem in problems:
            logger.warning("sub-%s: %s", subject, problem)
        if subject_frames:
            frames.extend(subject_frames)
            included[subject] = tables
        else:
            excluded[subject] = "; ".join(problems)
    if not frames:
        return None, included, excluded
    frame = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    return frame, included, excluded


def summarise_pairs(frame):
    """Distribution over session pairs of each (modality, tissue, metric, statistic) value (:data:`SUMMARY_COLUMNS`)."""
    import pandas as pd

    rows = []
    keys = ["modality", "tissue", "metric", "statistic"]
    for key, group in frame.groupby(keys, sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        present = np.isfinite(values)
        values = values[present]
        row = dict(zip(keys, key), n_pairs=int(values.size), n_subjects=int(group["participant_id"][present].nunique()))
        if values.size:
            p25, median, p75 = np.percentile(values, [25, 50, 75])
            row.update(mean=values.mean(), std=values.std(), median=median, p25=p25, p75=p75, min=values.min(),
                       max=values.max())
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _count_pairs(frame) -> int:
    return len(frame[["participant_id", "input_session", "dwi_session", "modality"]].drop_duplicates())


def _modalities(frame) -> list[str]:
    present = list(dict.fromkeys(frame["modality"]))
    return [m for m in MODALITY_ORDER if m in present] + [m for m in present if m not in MODALITY_ORDER]


def write_group_figures(frame, output_dir: Path) -> dict[str, Path]:
    """Boxplots (one value per session pair: its :data:`SHOWN_STATISTIC`) by tissue and modality."""
    modalities = _modalities(frame)
    shown = frame[frame["statistic"] == SHOWN_STATISTIC]
    written = {}
    for name, metrics in BOXPLOT_GROUPS.items():
        samples = {metric: {(tissue, modality): display_values(metric, group["value"].to_numpy(dtype=np.float64))
                            for (tissue, modality), group in shown[shown["metric"] == metric]
                            .groupby(["tissue", "modality"])}
                   for metric in metrics}
        if not any(samples.values()):
            continue
        written[name] = figures.group_boxplot(
            samples, display_units(), modalities, TISSUES, group_figure_path(output_dir, name),
            f"per-pair {SHOWN_STATISTIC} error by tissue and input modality")
    return written


# --------------------------------------------------------------------------- HTML
def render_group_report(frame, summary, included: Mapping[str, Sequence[Path]], excluded: Mapping[str, str],
                        figure_paths: Mapping[str, Path], output_dir: Path) -> str:
    """The group report HTML (offline: inline CSS, figures by relative path)."""
    parts = ["<h1>bssfp2dt group report</h1>"]
    if frame is None:
        parts.append('<p class="note">No reference tensor: the participant outputs exist, but no subject has an '
                     "error table, so no errors were computed. Run the participant level on data with DWI (a "
                     "reference tensor) to evaluate the predictions.</p>")
    else:
        parts.append(f"<p>{_count_pairs(frame)} session pair(s) of {len(included)} subject(s); input modalities: "
                     f"{html.escape(', '.join(_modalities(frame)))}.</p>")
        parts.append("<h2>Summary</h2>")
        parts.append(_summary_table(summary, _modalities(frame)))
        parts.append("<h2>Errors by tissue and input modality</h2>")
        report_dir = group_report_path(output_dir).parent
        for name, path in figure_paths.items():
            parts.append(html_figure(Path(path).relative_to(report_dir).as_posix(),
                                     f"{name}: per-pair median error (one dot per session pair); boxes: quartiles, "
                                     "whiskers: 1st/99th percentiles"))
    parts.append("<h2>Subjects</h2>")
    rows = [[f"sub-{label}", "included", f"{len(tables)} error table(s)"] for label, tables in included.items()]
    rows += [[f"sub-{label}", "excluded", reason] for label, reason in excluded.items()]
    parts.append(html_table(["subject", "status", "detail"], sorted(rows)))
    return html_page("bssfp2dt group report", "\n".join(parts))


def _summary_table(summary, modalities: Sequence[str]) -> str:
    """Metric x tissue rows; per modality the median over pairs of the per-pair median [IQR] and the reference."""
    index = {(row.modality, row.tissue, row.metric, row.statistic): row for row in summary.itertuples(index=False)}
    rows = []
    for metric in (*REPORT_METRICS, "psnr", "ssim", "fid"):
        image_metric = metric in ("psnr", "ssim", "fid")
        statistic = "value" if image_metric else SHOWN_STATISTIC
        for tissue in ((BRAIN,) if image_metric else TISSUES):
            cells, found = [], False
            for modality in modalities:
                entry = index.get((modality, tissue, metric, statistic))
                if entry is not None and entry.n_pairs:
                    found = True
                    cells.append(f"{format_number(metric, entry.median)} [{format_number(metric, entry.p25)}, "
                                 f"{format_number(metric, entry.p75)}] (n={entry.n_pairs})")
                else:
                    cells.append("n/a")
                cells.append(reference_text(metric, modality, tissue) or "-")
            if found:
                rows.append([f"{metric} ({display_unit(metric)})", tissue, *cells])
    header = ["metric", "tissue"] + [f"{modality} {what}" for modality in modalities
                                     for what in ("measured: median [IQR] over pairs", "reference thesis")]
    note = (f'<p class="ref">Measured: for each session pair the {SHOWN_STATISTIC} voxel error (voxels above the '
            f"tissue probability threshold), then the median [25th, 75th percentile] over pairs. Reference thesis: "
            f"{html.escape(SOURCE)} (multi-stage training, read from its Figures 4.6-4.9; approximate).</p>")
    return note + html_table(header, rows)
