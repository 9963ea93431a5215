"""Fibre directions (DTI V1) without an atlas: canonical directions by MNI region, structure elsewhere.

Directions are axes (v and -v are the same fibre), so they are handled as dyadics v v^T, smoothed
with a Gaussian and turned back into a direction by the principal eigenvector. Coordinates are MNI
RAS millimetres: x = left -> right, y = posterior -> anterior, z = inferior -> superior.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from bssfp2dt.dti.eigen import eigh_tensor

DYADIC_INDEX = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # BEP016 order of the six unique elements


def _unit(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)


def constant_direction(direction) -> Callable[[np.ndarray], np.ndarray]:
    """A direction field that is the same unit vector everywhere (points (N, 3) -> (N, 3))."""
    unit = _unit(np.asarray(direction, dtype=np.float64))
    return lambda points: np.broadcast_to(unit, points.shape).copy()


def callosal_direction(bend: float) -> Callable[[np.ndarray], np.ndarray]:
    """Left-right fibres that bend towards +y (bend > 0, genu) or -y (bend < 0, splenium) away from
    the midline: v = (1, bend * x / 15 mm, 0), which as an axis points antero- or postero-laterally on
    both sides."""
    def field(points: np.ndarray) -> np.ndarray:
        v = np.zeros_like(points)
        v[:, 0] = 1.0
        v[:, 1] = bend * points[:, 0] / 15.0
        return _unit(v)
    return field


@dataclass(frozen=True)
class FibreRegion:
    """A box in MNI mm (applied to white matter only) with a known fibre direction and coherence.

    ``abs_x`` makes the x-range apply to |x| (a bilateral pair). Later regions override earlier ones.
    """

    name: str
    x: tuple[float, float]
    y: tuple[float, float]
    z: tuple[float, float]
    direction: Callable[[np.ndarray], np.ndarray]
    coherence: float
    abs_x: bool = False

    def contains(self, points: np.ndarray) -> np.ndarray:
        x = np.abs(points[:, 0]) if self.abs_x else points[:, 0]
        inside = (self.x[0] <= x) & (x <= self.x[1])
        inside &= (self.y[0] <= points[:, 1]) & (points[:, 1] <= self.y[1])
        inside &= (self.z[0] <= points[:, 2]) & (points[:, 2] <= self.z[1])
        return inside


# Approximate MNI152 boxes of the major tracts (physics.md section 6). Order matters: later wins.
MNI_FIBRE_REGIONS: tuple[FibreRegion, ...] = (
    FibreRegion("corona_radiata", (15, 34), (-35, 20), (16, 48), constant_direction((0, 0, 1)), 0.5, abs_x=True),
    FibreRegion("superior_longitudinal_fasciculus", (30, 46), (-48, 8), (18, 42), constant_direction((0, 1, 0)),
                0.6, abs_x=True),
    FibreRegion("optic_radiation", (22, 40), (-92, -40), (-12, 12), constant_direction((0, 1, 0)), 0.8, abs_x=True),
    FibreRegion("brain_stem", (0, 14), (-45, -5), (-60, -8), constant_direction((0, 0, 1)), 0.8, abs_x=True),
    FibreRegion("anterior_limb_internal_capsule", (10, 24), (0, 22), (-6, 16), constant_direction((0.35, 0.75, 0.55)),
                0.9, abs_x=True),
    FibreRegion("posterior_limb_internal_capsule", (14, 30), (-28, 0), (-8, 18), constant_direction((0, 0, 1)), 1.0,
                abs_x=True),
    FibreRegion("cingulum", (4, 14), (-55, 40), (27, 46), constant_direction((0, 1, 0)), 0.8, abs_x=True),
    FibreRegion("corpus_callosum_body", (-16, 16), (-26, 18), (4, 27), callosal_direction(0.0), 1.0),
    FibreRegion("corpus_callosum_genu", (-20, 20), (18, 38), (-8, 24), callosal_direction(2.0), 1.0),
    FibreRegion("corpus_callosum_splenium", (-20, 20), (-44, -26), (0, 24), callosal_direction(-2.0), 1.0),
)


def dyadic(vectors: np.ndarray) -> np.ndarray:
    """Six unique elements of v v^T, (..., 3) -> (..., 6) in BEP016 order."""
    return np.stack([vectors[..., i] * vectors[..., j] for i, j in DYADIC_INDEX], axis=-1)


def principal_direction(six: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal eigenvector (..., 3) of a smoothed dyadic (..., 6) and its dispersion-free share.

    The share (l1 - l2) / (l1 + l2 + l3) is 1 for perfectly aligned fibres and 0 for isotropic
    dispersion; it lowers FA where directions fan out or cross.
    """
    values, vectors = eigh_tensor(six)  # descending
    trace = values.sum(axis=-1)
    share = np.divide(values[..., 0] - values[..., 1], trace, out=np.zeros_like(trace), where=trace > 1e-12)
    return vectors[..., :, 0], np.clip(share, 0.0, 1.0)


def _structure_axis(wm: np.ndarray, gm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Default white-matter direction: the axis along which the WM map varies least (smallest
    eigenvector of its structure tensor), turned radial (along grad GM) where WM meets cortex."""
    gradient = np.stack(np.gradient(ndimage.gaussian_filter(wm, 1.0 / voxel_mm)), axis=-1)
    structure = ndimage.gaussian_filter(dyadic(gradient), (3.0 / voxel_mm,) * 3 + (0,))
    _, vectors = eigh_tensor(structure)  # descending: the last is the least-varying axis
    along_wm = vectors[..., :, 2]
    gm_gradient = _unit(np.stack(np.gradient(ndimage.gaussian_filter(gm, 1.0 / voxel_mm)), axis=-1))
    cortical_weight = np.clip(gm / np.maximum(gm + wm, 1e-6), 0.0, 1.0)[..., None]
    return (1.0 - cortical_weight) * dyadic(along_wm) + cortical_weight * dyadic(gm_gradient)


def template_fibre_field(wm: np.ndarray, gm: np.ndarray, affine: np.ndarray,
                         regions: tuple[FibreRegion, ...] = MNI_FIBRE_REGIONS,
                         random_rng: np.random.Generator | None = None,
                         smoothing_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Fibre dyadics and coherence on a template grid.

    wm, gm: (X, Y, Z) probability maps on an isotropic grid with ``affine`` (mm). With ``random_rng``
    each region (and each 24 mm block of the remaining white matter) gets a random direction instead,
    to tell physics from anatomy. Returns the smoothed dyadic field (X, Y, Z, 6) and the coherence
    (X, Y, Z) in [0, 1] (1 in the coherent tracts, 0.2 in other white matter), also smoothed.
    """
    voxel_mm = float(abs(affine[0, 0]))
    field = _structure_axis(wm, gm, voxel_mm)
    coherence = np.full(wm.shape, 0.2)
    index = np.indices(wm.shape).reshape(3, -1).T
    points = index @ affine[:3, :3].T + affine[:3, 3]
    in_wm = (wm > 0.3).reshape(-1)
    flat_field = field.reshape(-1, 6)
    flat_coherence = coherence.reshape(-1)
    if random_rng is not None:
        blocks = np.floor(points / 24.0).astype(np.int64)
        _, block_id = np.unique(blocks, axis=0, return_inverse=True)
        block_dirs = _unit(random_rng.standard_normal((block_id.max() + 1, 3)))
        flat_field[in_wm] = dyadic(block_dirs[block_id.reshape(-1)[in_wm]])
    for region in regions:
        selected = in_wm & region.contains(points)
        if not selected.any():
            continue
        if random_rng is None:
            directions = region.direction(points[selected])
        else:
            directions = constant_direction(random_rng.standard_normal(3))(points[selected])
        flat_field[selected] = dyadic(directions)
        flat_coherence[selected] = region.coherence
    sigma = smoothing_mm / voxel_mm
    smoothed = ndimage.gaussian_filter(field, (sigma, sigma, sigma, 0))
    return smoothed, ndimage.gaussian_filter(coherence, sigma)
