"""PNG figures of the evaluation: reference vs prediction slices, error maps, boxplots by tissue.

Figures are drawn with matplotlib's object API on an explicit Agg canvas (no pyplot, no global backend
change, nothing displayed), so they work headless and in threads. Slices are taken through the centre
of the brain mask's bounding box along the voxel axes, assuming the pipeline's RAS+ orientation:
sagittal = x, coronal = y, axial = z, shown with anterior/superior up.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PLANES = ("sagittal", "coronal", "axial")
TISSUE_COLOURS = {"CSF": "#4c72b0", "GM": "#8c8c8c", "WM": "#dd8452", "brain": "#55a868"}
MODALITY_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
DPI = 100


def _figure(width: float, height: float):
    """A matplotlib Figure bound to an Agg canvas (the backend is chosen here, per figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins, not constrained layout: that halves the drawing time of these grid figures.
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _tick_format():
    """Three significant digits, no offset: float noise around a constant (10 % +- 1e-14) stays readable."""
    from matplotlib.ticker import FormatStrFormatter

    return FormatStrFormatter("%.3g")


def _save(figure, path: Path) -> Path:
    from bssfp2dt.io.atomic import atomic_path

    with atomic_path(path) as temp_path:
        figure.savefig(temp_path, format="png", dpi=DPI)
    return Path(path)


def mask_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel indices (i, j, k) of the centre of the mask's bounding box (the volume centre if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(size // 2 for size in mask.shape[:3])
    return tuple(int((axis.min() + axis.max()) // 2) for axis in np.nonzero(mask))


def plane_slices(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal, axial slices of (X, Y, Z[, 3]) through ``centre``, as images (rows, cols[, 3])
    for ``imshow(origin="lower")``."""
    volume = np.asarray(volume)
    i, j, k = centre
    slices = (volume[i, :, :], volume[:, j, :], volume[:, :, k])
    return [np.swapaxes(plane, 0, 1) for plane in slices]


def display_range(values: np.ndarray, mask: np.ndarray, percentiles=(1.0, 99.0)) -> tuple[float, float]:
    """Robust (low, high) intensity window of ``values`` inside ``mask`` (the reference image's, shared)."""
    inside = np.asarray(values)[np.asarray(mask, dtype=bool)]
    inside = inside[np.isfinite(inside)]
    if inside.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(inside, percentiles)
    return float(low), float(high)


def comparison_figure(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, path: Path, title: str,
                      unit: str = "", value_range: tuple[float, float] | None = None) -> Path:
    """Reference (top row) vs prediction (bottom row) in three planes, same intensity window.

    ``reference``, ``prediction``: (X, Y, Z) scalar maps (grey scale, window from the reference inside
    ``mask`` unless ``value_range``) or (X, Y, Z, 3) colour-FA in [0, 1] (shown as RGB).
    """
    centre = mask_centre(mask)
    rgb = np.ndim(reference) == 4
    if value_range is None and not rgb:
        value_range = display_range(reference, mask)
        if value_range[1] - value_range[0] <= 1e-9 * max(abs(value_range[0]), 1e-30):  # flat reference
            value_range = display_range(np.stack([reference, prediction]), np.stack([mask, mask]))
    low, high = value_range or (0.0, 1.0)
    figure = _figure(9.0, 6.4)
    axes = figure.subplots(2, 3, gridspec_kw=dict(left=0.01, right=0.82, bottom=0.02, top=0.88, wspace=0.04,
                                                  hspace=0.12))
    image = None
    for row, (label, volume) in enumerate((("reference", reference), ("prediction", prediction))):
        for column, (plane, data) in enumerate(zip(PLANES, plane_slices(volume, centre))):
            axis = axes[row, column]
            if rgb:
                axis.imshow(np.clip(data, 0.0, 1.0), origin="lower", interpolation="nearest")
            else:
                image = axis.imshow(data, origin="lower", cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            axis.set_title(f"{label}, {plane}", fontsize=9)
            axis.set_axis_off()
    if image is not None:
        colour_bar = figure.colorbar(image, cax=figure.add_axes((0.84, 0.1, 0.02, 0.7)), label=unit)
        colour_bar.formatter = _tick_format()
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def error_maps_figure(maps: Mapping[str, np.ndarray], units: Mapping[str, str], mask: np.ndarray, path: Path,
                      title: str) -> Path:
    """One row per error map (X, Y, Z), three planes each; NaN (excluded) voxels in light blue.

    ``maps`` are in their display units (``units``: ``%`` or ``deg``); the colour scale is 0..max(p99, 1).
    """
    from matplotlib import colormaps

    centre = mask_centre(mask)
    colour_map = colormaps["magma"].with_extremes(bad="#9ecae1")
    height = 2.6 * len(maps) + 0.6
    figure = _figure(9.0, height)
    top = 1.0 - 0.6 / height
    axes = figure.subplots(len(maps), 3, squeeze=False, gridspec_kw=dict(left=0.01, right=0.86, bottom=0.01,
                                                                         top=top, wspace=0.04, hspace=0.15))
    for row, (name, volume) in enumerate(maps.items()):
        shown = np.where(np.asarray(mask, dtype=bool), volume, 0.0)  # NaN marks excluded voxels only
        finite = volume[np.isfinite(volume)]
        high = max(float(np.percentile(finite, 99)) if finite.size else 1.0, 1.0)
        image = None
        for column, (plane, data) in enumerate(zip(PLANES, plane_slices(shown, centre))):
            image = axes[row, column].imshow(data, origin="lower", cmap=colour_map, vmin=0.0, vmax=high,
                                             interpolation="nearest")
            axes[row, column].set_title(f"{name}, {plane}", fontsize=9)
            axes[row, column].set_axis_off()
        box = axes[row, -1].get_position()
        figure.colorbar(image, cax=figure.add_axes((0.88, box.y0 + 0.1 * box.height, 0.015, 0.8 * box.height)),
                        label=units.get(name, ""))
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def tissue_boxplot(samples: Mapping[str, Mapping[str, np.ndarray]], units: Mapping[str, str], path: Path,
                   title: str) -> Path:
    """Boxplots per metric (one panel each) of voxel errors by tissue.

    ``samples``: metric -> tissue -> (N,) finite errors of the voxels above the probability threshold.
    Boxes: quartiles and median; whiskers: 1st and 99th percentiles (the reference's statistics); no fliers.
    """
    metrics = list(samples)
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    height = 2.8 * rows + 0.5
    figure = _figure(3.4 * columns, height)
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=0.1, right=0.98, bottom=0.06, top=1.0 - 0.6 / height, wspace=0.4, hspace=0.35)).ravel()
    for axis, metric in zip(axes, metrics):
        tissues = [name for name, values in samples[metric].items() if np.size(values)]
        data = [np.asarray(samples[metric][name]) for name in tissues]
        if data:
            boxes = axis.boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True, tick_labels=tissues,
                               medianprops={"color": "black"})
            for patch, name in zip(boxes["boxes"], tissues):
                patch.set_facecolor(TISSUE_COLOURS.get(name, "#cccccc"))
        axis.set_title(metric, fontsize=10)
        axis.set_ylabel(units.get(metric, ""))
        axis.yaxis.set_major_formatter(_tick_format())
    for axis in axes[len(metrics):]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def group_boxplot(samples: Mapping[str, Mapping[tuple[str, str], np.ndarray]], units: Mapping[str, str],
                  modalities: Sequence[str], tissues: Sequence[str], path: Path, title: str) -> Path:
    """Boxplots of one value per session pair (e.g. its median error), grouped by tissue, one box per modality.

    ``samples``: metric -> (tissue, modality) -> (N,) values. Whiskers at the 1st/99th percentiles; every
    value is drawn as a dot on its box (group sizes are small).
    """
    metrics = list(samples)
    columns = min(2, len(metrics))
    rows = -(-len(metrics) // columns)
    height = 3.2 * rows + 0.6
    figure = _figure(5.2 * columns, height)
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=0.08, right=0.98, bottom=0.06, top=1.0 - 0.6 / height, wspace=0.25, hspace=0.3)).ravel()
    width = 0.8 / max(len(modalities), 1)
    for axis, metric in zip(axes, metrics):
        for m_index, modality in enumerate(modalities):
            colour = MODALITY_COLOURS[m_index % len(MODALITY_COLOURS)]
            positions, data = [], []
            for t_index, tissue in enumerate(tissues):
                values = np.asarray(samples[metric].get((tissue, modality), ()), dtype=np.float64)
                values = values[np.isfinite(values)]
                if values.size:
                    positions.append(t_index + (m_index - (len(modalities) - 1) / 2) * width)
                    data.append(values)
            if not data:
                continue
            boxes = axis.boxplot(data, positions=positions, widths=width * 0.85, whis=(1, 99), showfliers=False,
                                 patch_artist=True, manage_ticks=False, medianprops={"color": "black"})
            for patch in boxes["boxes"]:
                patch.set_facecolor(colour)
                patch.set_alpha(0.6)
            for position, values in zip(positions, data):
                axis.plot(np.full(values.size, position), values, ".", color="k", markersize=3)
            axis.plot([], [], "s", color=colour, label=modality)
        axis.set_xticks(range(len(tissues)), list(tissues))
        axis.set_xlim(-0.6, len(tissues) - 0.4)
        axis.set_title(metric, fontsize=10)
        axis.set_ylabel(units.get(metric, ""))
        axis.yaxis.set_major_formatter(_tick_format())
        axis.legend(fontsize=8, loc="upper right")
    for axis in axes[len(metrics):]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)
