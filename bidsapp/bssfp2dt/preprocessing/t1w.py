"""T1w preprocessing: brain mask, normalisation, 6-channel input, tissue probability maps.

Arrays are ``(X, Y, Z)`` in scanner units unless stated otherwise.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from scipy import ndimage

from bssfp2dt.errors import Bssfp2dtError, UsageError
from bssfp2dt.preprocessing.normalization import Normalization, normalize_t1w

logger = logging.getLogger(__name__)

#: Order of the tissue probability maps returned by :func:`tissue_probability_maps`.
TISSUES = ("CSF", "GM", "WM")
N_INPUT_CHANNELS = 6
#: Offset (fraction of the in-mask range) separating brain intensities from dipy's background 0.
HMRF_OFFSET = 0.1
#: Seed of the noise dipy's HMRF adds to the background, so tissue maps are reproducible bit for bit.
HMRF_SEED = 0
_DIPY_NOISE_LOCK = threading.Lock()


def brain_mask(t1w: np.ndarray, median_radius: int = 4, numpass: int = 4, closing_mm: float = 0.0,
               voxel_mm: float = 1.0, working_mm: float = 2.0) -> np.ndarray:
    """Brain (head) mask by dipy's ``median_otsu``, cleaned by morphology.

    median_otsu (median filter + Otsu threshold) needs no template or trained model, so it works
    offline on any T1w. It separates head from background, not brain from skull: give it an image
    whose background is dark (for MP2RAGE, the background-suppressed UNI or the INV2-weighted one,
    not the raw UNI with its salt-and-pepper background). The result is reduced to its largest connected
    component (drops stray noise islands) and holes are filled (ventricles are dark in T1w and must stay inside).

    Args:
        t1w: ``(X, Y, Z)``.
        median_radius: median filter radius (voxels).
        numpass: median filter passes.
        closing_mm: optional morphological closing radius (mm) to smooth the border; 0 = off.
        voxel_mm: voxel size of ``t1w`` (mm), for ``closing_mm`` and ``working_mm``.
        working_mm: the mask is found on blocks of about this size (block means) and copied back to
            every voxel of a block: the network's grid is 2 mm, and median filtering a 1 mm head costs
            minutes where 2 mm blocks take seconds. ``median_radius`` is in voxels of ``voxel_mm``.
    Returns:
        boolean ``(X, Y, Z)``.
    """
    from dipy.segment.mask import median_otsu

    t1w = _check_volume(t1w)
    # blocks of at least ~0.75 x working_mm (1 mm -> 2 mm, 1.5 mm -> 3 mm, 2 mm -> no blocks)
    factor = max(1, int(np.ceil(working_mm / voxel_mm - 0.25)))
    blocks = _block_mean(t1w, factor)
    _, small = median_otsu(blocks, median_radius=max(1, int(round(median_radius / factor))), numpass=numpass)
    mask = _expand_blocks(np.asarray(small, dtype=bool), factor, t1w.shape)
    mask = largest_component(mask)
    if closing_mm > 0:
        radius = max(1, int(round(closing_mm / voxel_mm)))
        mask = ndimage.binary_closing(mask, structure=_ball(radius), border_value=0)
    return ndimage.binary_fill_holes(mask)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Means of ``factor``^3 blocks (the volume is edge-padded to a multiple of ``factor``)."""
    if factor == 1:
        return volume
    pad = [(0, -size % factor) for size in volume.shape]
    padded = np.pad(volume, pad, mode="edge")
    x, y, z = (size // factor for size in padded.shape)
    return padded.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def _expand_blocks(blocks: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Each block value copied to its ``factor``^3 voxels, cropped to ``shape``."""
    if factor == 1:
        return blocks
    full = blocks.repeat(factor, axis=0).repeat(factor, axis=1).repeat(factor, axis=2)
    return full[:shape[0], :shape[1], :shape[2]]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean ``(X, Y, Z)`` mask (empty stays empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _ball(radius: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * 3) - radius
    return (grid ** 2).sum(axis=0) <= radius ** 2


def replicate_channels(volume: np.ndarray, n_channels: int = N_INPUT_CHANNELS) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(X, Y, Z, n_channels)``, every channel a copy, so the T1w matches the
    tensor's 6-channel input contract."""
    volume = _check_volume(volume)
    return np.repeat(volume[..., None], n_channels, axis=-1)


def prepare_t1w(t1w: np.ndarray, mask: np.ndarray, params: Normalization, **options) -> np.ndarray:
    """Network input from a T1w already on the common grid: mask, normalise to [0, 1], 6 channels.

    Args:
        t1w: ``(X, Y, Z)`` scanner units.
        mask: boolean ``(X, Y, Z)``.
        params: dataset normalisation (its ``t1w`` range).
        options: passed to :func:`bssfp2dt.preprocessing.normalization.apply_range`.
    Returns:
        ``(X, Y, Z, 6)`` float32 in [0, 1], zero outside the mask.
    """
    return replicate_channels(normalize_t1w(_check_volume(t1w), params, mask, **options))


def tissue_probability_maps(t1w: np.ndarray, mask: np.ndarray, beta: float = 0.1,
                            max_iter: int = 10, seed: int = HMRF_SEED) -> np.ndarray:
    """CSF/GM/WM probability maps by dipy's HMRF classifier (3 classes + background).

    The classes are ordered by their mean T1w intensity, CSF < GM < WM (T1w contrast), so the
    output order does not rely on dipy's internal label order. dipy jitters the background voxels
    with Gaussian noise (1e-4 of the rescaled intensity range); that noise is drawn from
    ``numpy.random.default_rng(seed)``, so the same inputs give bit-identical maps.

    Args:
        t1w: ``(X, Y, Z)``, bias-corrected enough that each tissue has one intensity mode.
        mask: boolean ``(X, Y, Z)`` brain mask (voxels outside become background).
        beta: MRF smoothing weight (dipy's suggestion 0.1).
        max_iter: ICM/EM iterations (10 is plenty on 2 mm data).
        seed: seed of dipy's background noise.
    Returns:
        ``(X, Y, Z, 3)`` float64 probabilities in [0, 1] in :data:`TISSUES` order, 0 outside the mask.
    """
    from dipy.segment.tissue import TissueClassifierHMRF

    t1w = _check_volume(t1w)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != t1w.shape:
        raise UsageError(f"mask shape {mask.shape} differs from the T1w {t1w.shape}")
    if not mask.any():
        raise UsageError("the brain mask is empty: cannot segment tissues")
    # dipy models the zeros as a 4th (background) class: lift the in-mask intensities clear of
    # zero so no dark brain voxel (CSF) is taken for background. 10 % of the range suits dipy's
    # evenly spaced initial class means (on phantoms 0-0.14 all work, 0.2 and above collapse).
    inside = t1w[mask]
    span = float(np.ptp(inside)) or 1.0
    image = np.where(mask, t1w - inside.min() + HMRF_OFFSET * span, 0.0)
    with _seeded_dipy_noise(seed):
        _, _, pve = TissueClassifierHMRF(verbose=False).classify(image, 3, beta, max_iter=max_iter)
    pve = np.asarray(pve, dtype=np.float64)
    if not np.all(np.isfinite(pve[mask])):
        raise Bssfp2dtError("HMRF tissue classification diverged (a class lost all its voxels): "
                            "check the T1w brain mask and bias correction")
    pve = pve * mask[..., None]
    # Condition on "tissue" (the dropped background class may keep a sliver of probability).
    total = pve.sum(axis=-1, keepdims=True)
    pve = np.divide(pve, total, out=np.zeros_like(pve), where=total > 0)
    weights = pve[mask]
    means = (weights * t1w[mask][:, None]).sum(axis=0) / np.maximum(weights.sum(axis=0), 1e-12)
    order = np.argsort(means)
    logger.debug("HMRF class means %s -> order %s", means, order)
    return pve[..., order]


@contextmanager
def _seeded_dipy_noise(seed: int) -> Iterator[None]:
    """Make ``dipy.segment.tissue``'s ``add_noise`` draw from a seeded generator while inside.

    dipy 1.x calls ``add_noise`` without an ``rng``, i.e. from an unseeded ``default_rng()``, and
    offers no seed argument; a lock keeps concurrent threads from swapping the module global under us.
    """
    from dipy.segment import tissue

    original = getattr(tissue, "add_noise", None)
    if original is None:  # another dipy layout: run unseeded (the rerun tests would catch new randomness)
        logger.warning("dipy.segment.tissue has no add_noise: HMRF tissue maps may differ between reruns")
        yield
        return
    rng = np.random.default_rng(seed)

    def seeded_add_noise(*args, **kwargs):
        if kwargs.get("rng") is None:
            kwargs["rng"] = rng
        return original(*args, **kwargs)

    with _DIPY_NOISE_LOCK:
        tissue.add_noise = seeded_add_noise
        try:
            yield
        finally:
            tissue.add_noise = original


def hard_labels(probabilities: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Most probable tissue per voxel: ``(X, Y, Z, 3)`` -> int ``(X, Y, Z)``, 1 = CSF, 2 = GM,
    3 = WM, 0 outside the mask."""
    labels = np.argmax(probabilities, axis=-1) + 1
    if mask is not None:
        labels = np.where(np.asarray(mask, dtype=bool), labels, 0)
    return labels


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise UsageError(f"a T1w volume must be 3D (X, Y, Z), got shape {volume.shape}")
    return volume
