"""Quality-control figures of one subject (NiPreps-style reportlets, drawn with matplotlib).

- :func:`registration_figure`: a moving image (bSSFP mean magnitude, DWI mean b0) on the T1w grid before
  (scanner coordinates only) and after the rigid registration, with the T1w's brain and white-matter
  outlines drawn over it, so a misregistration shows as edges that miss the image's boundaries;
- :func:`tissue_outline_figure`: the T1w with the brain mask and the GM/WM/CSF outlines (probability 0.5);
- :func:`map_mosaic`: axial slices of a predicted map (FA, MD in mm^2/s, colour-FA as RGB).

All volumes are (X, Y, Z[, 3]) arrays on the same RAS+ grid; slices are shown with anterior/superior up.
Figures go through :func:`bssfp2dt.evaluation.figures._save` (atomic PNG writes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bssfp2dt.evaluation.figures import PLANES, _figure, _save, _tick_format, display_range, mask_centre, plane_slices

#: Outline colours: brain mask, WM, GM, CSF (the 0.5 iso-line of each probability map).
OUTLINE_COLOURS = {"brain": "#e41a1c", "WM": "#377eb8", "GM": "#4daf4a", "CSF": "#ff7f00"}
MOSAIC_SLICES = 8


def _contours(axis, volume: np.ndarray, colour: str, level: float = 0.5) -> None:
    """Draw the ``level`` iso-line of a 2-D slice (nothing when the slice does not cross it)."""
    volume = np.asarray(volume, dtype=np.float64)
    if volume.min() < level < volume.max():
        axis.contour(volume, levels=[level], colors=[colour], linewidths=0.9, origin="lower")


def registration_figure(before: np.ndarray, after: np.ndarray, outlines: Mapping[str, np.ndarray], mask: np.ndarray,
                        path: Path, title: str) -> Path:
    """Moving image before (top row) and after (bottom row) registration, three planes, T1w outlines on top.

    ``before``/``after``: the moving image resampled onto the T1w grid without and with the transform
    (scanner units, windowed to its 1st-99th percentile inside ``mask``); ``outlines``: name -> (X, Y, Z)
    probability map of the T1w (``brain``, ``WM``), drawn at 0.5.
    """
    centre = mask_centre(mask)
    figure = _figure(9.0, 6.6)
    axes = figure.subplots(2, 3, gridspec_kw=dict(left=0.01, right=0.99, bottom=0.07, top=0.88, wspace=0.04,
                                                  hspace=0.14))
    low, high = display_range(after, mask)
    for row, (label, volume) in enumerate((("before registration", before), ("after registration", after))):
        for column, (plane, data) in enumerate(zip(PLANES, plane_slices(volume, centre))):
            axis = axes[row, column]
            axis.imshow(data, origin="lower", cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            for name, probability in outlines.items():
                _contours(axis, plane_slices(probability, centre)[column], OUTLINE_COLOURS.get(name, "#ffff33"))
            axis.set_title(f"{label}, {plane}", fontsize=9)
            axis.set_axis_off()
    _legend(figure, {f"T1w {name} outline": OUTLINE_COLOURS.get(name, "#ffff33") for name in outlines})
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def tissue_outline_figure(t1w: np.ndarray, outlines: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """The T1w in three planes at three positions each, with the mask and tissue outlines (probability 0.5)."""
    mask = np.asarray(outlines.get("brain", np.ones(t1w.shape)), dtype=np.float64) > 0.5
    high = display_range(t1w, mask, (1.0, 99.5))[1] * 1.15  # headroom: bright WM stays below white
    low = 0.0
    lower, upper = _mask_extent(mask)
    figure = _figure(9.0, 9.4)
    axes = figure.subplots(3, 3, gridspec_kw=dict(left=0.01, right=0.99, bottom=0.06, top=0.92, wspace=0.04,
                                                  hspace=0.12))
    for column, fraction in enumerate((0.3, 0.5, 0.7)):
        centre = tuple(int(round(lo + fraction * (hi - lo))) for lo, hi in zip(lower, upper))
        for row, plane in enumerate(PLANES):
            axis = axes[row, column]
            axis.imshow(plane_slices(t1w, centre)[row], origin="lower", cmap="gray", vmin=low, vmax=high,
                        interpolation="nearest")
            for name, probability in outlines.items():
                _contours(axis, plane_slices(probability, centre)[row], OUTLINE_COLOURS.get(name, "#ffff33"))
            axis.set_title(f"{plane} {centre[row]}", fontsize=9)
            axis.set_axis_off()
    _legend(figure, {("brain mask" if name == "brain" else name): OUTLINE_COLOURS.get(name, "#ffff33")
                     for name in outlines})
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def map_mosaic(volume: np.ndarray, mask: np.ndarray, path: Path, title: str, unit: str = "",
               value_range: tuple[float, float] | None = None, cmap: str = "gray") -> Path:
    """Axial mosaic (:data:`MOSAIC_SLICES` slices evenly across the mask) of a scalar or RGB (X, Y, Z, 3) map.

    Scalars are windowed to ``value_range`` (default: 1st-99th percentile inside ``mask``) with a colour bar in
    ``unit``; RGB maps (colour-FA, components in [0, 1]) are shown as they are.
    """
    mask = np.asarray(mask, dtype=bool)
    rgb = np.ndim(volume) == 4
    lower, upper = _mask_extent(mask)
    positions = np.unique(np.linspace(lower[2], upper[2], MOSAIC_SLICES + 2).round().astype(int)[1:-1])
    columns = 4
    rows = -(-len(positions) // columns)
    figure = _figure(9.0, 2.3 * rows + 0.7)
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=0.01, right=0.86, bottom=0.02, top=1.0 - 0.6 / (2.3 * rows + 0.7), wspace=0.03, hspace=0.1)).ravel()
    low, high = (0.0, 1.0) if rgb else (value_range or display_range(volume, mask))
    if not rgb:  # outside the brain: the colour map's 'bad' colour (black), not its lowest colour
        volume = np.where(mask, volume, np.nan)
    image = None
    from matplotlib import colormaps

    scalar_map = colormaps[cmap].with_extremes(bad="black")
    for axis, k in zip(axes, positions):
        data = np.swapaxes(np.asarray(volume)[:, :, k], 0, 1)
        if rgb:
            axis.imshow(np.clip(data, 0.0, 1.0), origin="lower", interpolation="nearest")
        else:
            image = axis.imshow(data, origin="lower", cmap=scalar_map, vmin=low, vmax=high, interpolation="nearest")
        axis.set_title(f"axial {k}", fontsize=8)
    for axis in axes:
        axis.set_axis_off()
    if image is not None:
        colour_bar = figure.colorbar(image, cax=figure.add_axes((0.88, 0.1, 0.02, 0.75)), label=unit)
        colour_bar.formatter = _tick_format()
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def _mask_extent(mask: np.ndarray) -> tuple[Sequence[int], Sequence[int]]:
    """Lowest and highest voxel index of the mask on each axis (the whole volume when empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return [0, 0, 0], [size - 1 for size in mask.shape[:3]]
    found = np.nonzero(mask)
    return [int(axis.min()) for axis in found], [int(axis.max()) for axis in found]


def _legend(figure, entries: Mapping[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, linewidth=2, label=label) for label, colour in entries.items()]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def mean_b0(dwi: np.ndarray, bvals: np.ndarray, threshold: float = 50.0) -> np.ndarray:
    """Mean of the volumes with b <= ``threshold`` s/mm^2 of a (X, Y, Z, N) DWI (the first volume if none)."""
    low = np.asarray(bvals, dtype=np.float64) <= threshold
    return np.asarray(dwi, dtype=np.float64)[..., low if low.any() else slice(0, 1)].mean(axis=-1)


__all__ = ["registration_figure", "tissue_outline_figure", "map_mosaic", "mean_b0", "PLANES"]
