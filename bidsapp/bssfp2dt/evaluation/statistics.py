"""Tissue-stratified statistics of error maps, as a tidy long-format table.

Per metric and tissue (probabilistic maps CSF/GM/WM, values 0..1, as in the reference method, plus
``brain`` = every voxel of the mask with weight 1):

- ``weighted_mean``: sum(p e) / sum(p) over the evaluated voxels of the mask (p = tissue probability);
  its ``n_voxels`` / ``n_excluded`` count the mask voxels with p > 0.
- ``median``, ``p01``, ``p25``, ``p75``, ``p99`` (numpy's linear percentiles), ``mean`` and ``std``
  (population, ddof = 0) of the voxels with p > ``threshold`` (default 0.5); ``n_voxels`` counts them,
  ``n_excluded`` the voxels above the threshold whose error was excluded (NaN: near-zero reference).

Pooled metrics ``diagonal`` (D11, D22, D33) and ``offdiagonal`` (D12, D13, D23) take the voxel errors of
their three elements together (each voxel counted three times), as the reference reports them.
Excluded voxels never enter a statistic; a statistic with no voxel is missing (``n/a`` in the TSV).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bssfp2dt.evaluation.errors import DIAGONAL_ELEMENTS, ERROR_METRICS, OFF_DIAGONAL_ELEMENTS

logger = logging.getLogger(__name__)

TISSUES = ("CSF", "GM", "WM")
BRAIN = "brain"
STATISTICS = ("weighted_mean", "median", "p01", "p25", "p75", "p99", "mean", "std")
_PERCENTILES = {"median": 50.0, "p01": 1.0, "p25": 25.0, "p75": 75.0, "p99": 99.0}
#: Pooled tensor-element metrics and their members.
POOLED_METRICS = {"diagonal": DIAGONAL_ELEMENTS, "offdiagonal": OFF_DIAGONAL_ELEMENTS}
#: Metrics of the statistics table, in order.
TABLE_METRICS = tuple(POOLED_METRICS) + ERROR_METRICS
#: Columns of the long-format table, in order.
COLUMNS = ("participant_id", "input_session", "dwi_session", "modality", "tissue", "metric", "statistic", "value",
           "n_voxels", "n_excluded")
COLUMN_DESCRIPTIONS = {
    "participant_id": "participant (sub-<label>)",
    "input_session": "session of the input image the tensor was predicted from (n/a: no session)",
    "dwi_session": "session of the reference DWI tensor (n/a: no session)",
    "modality": "input modality desc label (pcbssfp, bssfp, t1w, dwi)",
    "tissue": "CSF, GM, WM (probabilistic maps) or brain (whole mask); image metrics use brain",
    "metric": "D11..D33, diagonal, offdiagonal, fa, md, ad, rd: relative error |pred - ref| / |ref| (ratio); "
              "inclination, azimuth, v1angle: absolute angular error (deg); psnr (dB), ssim: image metrics",
    "statistic": "weighted_mean (probability-weighted), median, p01, p25, p75, p99, mean, std (voxels above "
                 "the probability threshold); value for image metrics",
    "value": "the statistic (ratio for relative errors, deg for angles)",
    "n_voxels": "voxels the statistic is computed from (diagonal/offdiagonal: voxel-element pairs, 3 per voxel)",
    "n_excluded": "voxels of the same selection excluded (near-zero or undefined reference)",
}


@dataclass(frozen=True)
class EvaluationEntities:
    """Which prediction was compared with which reference.

    ``modality`` is the desc label (``pcbssfp``) or ``--input-modality`` value (``pc-bssfp``);
    sessions are labels without ``ses-`` (None when the dataset has no sessions).
    """

    subject: str
    input_session: str | None
    dwi_session: str | None
    modality: str

    def columns(self) -> dict[str, str | None]:
        """The identifying columns of a table row (modality as its desc label)."""
        from bssfp2dt.io.derivatives import MODALITY_DESC

        return {"participant_id": f"sub-{self.subject}", "input_session": self.input_session,
                "dwi_session": self.dwi_session,
                "modality": MODALITY_DESC.get(self.modality, self.modality)}


def summarise(values: np.ndarray, weights: np.ndarray, excluded_weights: np.ndarray,
              threshold: float) -> list[tuple[str, float | None, int, int]]:
    """Statistics of one metric in one tissue.

    Parameters
    ----------
    values : (N,) errors of the evaluated voxels (finite).
    weights : (N,) tissue probabilities of those voxels, 0..1.
    excluded_weights : (M,) tissue probabilities of the excluded voxels of the mask.
    threshold : probability above which a voxel belongs to the tissue for the unweighted statistics.

    Returns
    -------
    (statistic, value or None, n_voxels, n_excluded) for each of :data:`STATISTICS`.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    excluded_weights = np.asarray(excluded_weights, dtype=np.float64)
    weight_sum = weights.sum()
    weighted = float(np.dot(weights, values) / weight_sum) if weight_sum > 0 else None
    rows = [("weighted_mean", weighted, int(np.count_nonzero(weights > 0)),
             int(np.count_nonzero(excluded_weights > 0)))]
    selected = values[weights > threshold]
    n_selected, n_excluded = int(selected.size), int(np.count_nonzero(excluded_weights > threshold))
    if n_selected:
        percentiles = np.percentile(selected, list(_PERCENTILES.values()))
        summary = dict(zip(_PERCENTILES, percentiles.tolist()))
        summary.update(mean=float(selected.mean()), std=float(selected.std()))
    else:
        summary = {}
    rows.extend((name, summary.get(name), n_selected, n_excluded) for name in STATISTICS[1:])
    return rows


def tissue_statistics(maps: Mapping[str, np.ndarray], tissues: Mapping[str, np.ndarray], mask: np.ndarray,
                      entities: EvaluationEntities, threshold: float = 0.5) -> list[dict]:
    """Long-format rows (dicts with :data:`COLUMNS`) of every metric x tissue x statistic.

    Parameters
    ----------
    maps : metric -> (X, Y, Z) error map, NaN at excluded voxels (from :func:`~.errors.error_maps`).
    tissues : tissue name (CSF, GM, WM) -> (X, Y, Z) probability 0..1; ``brain`` (the mask) is added.
    mask : (X, Y, Z) bool brain mask.
    entities : identifying columns.
    threshold : tissue probability threshold of the unweighted statistics (0..1).
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"tissue probability threshold must be in [0, 1), got {threshold}")
    mask = np.asarray(mask, dtype=bool)
    weights_by_tissue = {name: np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float64)), 0.0, 1.0)[mask]
                         for name, prob in tissues.items()}
    weights_by_tissue[BRAIN] = np.ones(int(mask.sum()))
    identity = entities.columns()
    rows = []
    for metric in TABLE_METRICS:
        members = POOLED_METRICS.get(metric, (metric,))
        if not all(member in maps for member in members):
            continue
        values = np.concatenate([np.asarray(maps[member])[mask] for member in members])
        evaluated = np.isfinite(values)
        for tissue, weights in weights_by_tissue.items():
            weights = np.tile(weights, len(members))
            for statistic, value, n_voxels, n_excluded in summarise(values[evaluated], weights[evaluated],
                                                                    weights[~evaluated], threshold):
                rows.append({**identity, "tissue": tissue, "metric": metric, "statistic": statistic,
                             "value": value, "n_voxels": n_voxels, "n_excluded": n_excluded})
    return rows


def image_metric_rows(metrics: Mapping[str, float | None], entities: EvaluationEntities,
                      n_voxels: int) -> list[dict]:
    """Rows (tissue ``brain``, statistic ``value``) of whole-image metrics such as PSNR and SSIM."""
    identity = entities.columns()
    return [{**identity, "tissue": BRAIN, "metric": name, "statistic": "value", "value": value,
             "n_voxels": n_voxels, "n_excluded": 0} for name, value in metrics.items() if value is not None]


# --------------------------------------------------------------------------- TSV I/O
def rows_to_frame(rows: Sequence[Mapping]):
    """Rows -> pandas DataFrame with :data:`COLUMNS` in order (missing values as NaN/None)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def frame_to_tsv(frame) -> str:
    """BIDS TSV text: tab-separated, ``n/a`` for missing values, full float precision."""
    return frame.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g")


def read_table(path: Path | str):
    """Read an error TSV written by :func:`frame_to_tsv`; ValueError if a column is missing."""
    import pandas as pd

    frame = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                        dtype={"participant_id": str, "input_session": str, "dwi_session": str})
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} missing")
    return frame[list(COLUMNS)]
