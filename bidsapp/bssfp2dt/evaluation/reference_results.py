"""The reference thesis' published error numbers (multi-stage training, DOVE real data), as data.

Source: thesis-summary.md, "Quantitative Performance" (read from the thesis' Figures 4.6-4.9, so they are
approximate). They were measured on the DOVE dataset (120 healthy subjects, real acquisitions), not on
this project's simulated data: they are shown next to our numbers for orientation only, never compared
in tests. Relative errors are ratios (0.05 = 5 %), angles degrees. ``low``/``high`` give a range; an upper
bound ("< 0.5 deg") has ``low`` None; a single approximate value has ``low == high``.
"""
from __future__ import annotations

from dataclasses import dataclass

from bssfp2dt import modalities

SOURCE = "measured on DOVE (real data), from the reference thesis"
#: The thesis' modality names -> this project's desc labels.
THESIS_MODALITIES = {modality.label: modality.desc for modality in modalities.REPORT_ORDER}


@dataclass(frozen=True)
class ReferenceResult:
    """One published number: metric (our metric name), modality (desc label), tissue (None = all tissues)."""

    metric: str
    modality: str
    tissue: str | None
    low: float | None
    high: float
    figure: str

    def text(self) -> str:
        """Human-readable value, e.g. ``~7 %``, ``15-20 %``, ``< 0.5 deg``."""
        if self.metric in ("inclination", "azimuth"):
            return f"< {self.high:g} deg"
        if self.low is None:
            return f"< {100 * self.high:g} %"
        if self.low == self.high:
            return f"~{100 * self.high:g} %"
        return f"{100 * self.low:g}-{100 * self.high:g} %"


def _per_tissue(metric: str, values: dict[str, tuple[float, float, float]]) -> list[ReferenceResult]:
    """Approximate per-tissue percentages (CSF, GM, WM) of Figure 4.6."""
    return [ReferenceResult(metric, THESIS_MODALITIES[modality], tissue, value / 100, value / 100, "4.6")
            for modality, triple in values.items() for tissue, value in zip(("CSF", "GM", "WM"), triple)]


def _ranges(metric: str, figure: str, values: dict[str, tuple[float | None, float]]) -> list[ReferenceResult]:
    """Ranges over tissues (percent, or degrees for angles) of Figures 4.7-4.9."""
    scale = 1.0 if metric in ("inclination", "azimuth") else 0.01
    return [ReferenceResult(metric, THESIS_MODALITIES[modality], None,
                            None if low is None else low * scale, high * scale, figure)
            for modality, (low, high) in values.items()]


REFERENCE_RESULTS: tuple[ReferenceResult, ...] = tuple(
    _per_tissue("diagonal", {"DT": (3, 3, 5), "pc-bSSFP": (7, 8, 10), "bSSFP": (7, 8, 7), "T1w": (7, 7, 7)})
    + _per_tissue("offdiagonal", {"DT": (5, 5, 5), "pc-bSSFP": (20, 20, 55), "bSSFP": (25, 35, 60),
                                  "T1w": (20, 25, 60)})
    + _ranges("rd", "4.7-4.9", {"DT": (2, 5), "pc-bSSFP": (15, 20), "bSSFP": (15, 20), "T1w": (15, 20)})
    + _ranges("ad", "4.7-4.9", {"DT": (1, 3), "pc-bSSFP": (8, 14), "bSSFP": (8, 12), "T1w": (7, 10)})
    + _ranges("md", "4.7-4.9", {"DT": (2, 5), "pc-bSSFP": (10, 17), "bSSFP": (8, 15), "T1w": (8, 15)})
    + _ranges("fa", "4.7-4.9", {"DT": (8, 12), "pc-bSSFP": (15, 27), "bSSFP": (15, 25), "T1w": (10, 15)})
    + _ranges("inclination", "4.7-4.9", {"DT": (None, 0.05), "pc-bSSFP": (None, 0.5), "bSSFP": (None, 0.5),
                                         "T1w": (None, 0.5)})
    + _ranges("azimuth", "4.7-4.9", {"DT": (None, 0.25), "pc-bSSFP": (None, 2.0), "bSSFP": (None, 1.75),
                                     "T1w": (None, 1.75)})
)


def reference_text(metric: str, modality: str, tissue: str) -> str:
    """The published value for a metric, modality (desc label) and tissue, or ``""`` if the thesis gives none."""
    for result in REFERENCE_RESULTS:
        if result.metric == metric and result.modality == modality and result.tissue in (None, tissue):
            return result.text() + ("" if result.tissue else " (all tissues)")
    return ""
