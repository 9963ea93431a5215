"""Anatomies the simulator can image: the MNI ICBM152 template (shipped inside nilearn) and a fully
procedural geometric phantom. Both are sampled at arbitrary template points (N, 3) in mm.

Tissue order everywhere: (GM, WM, CSF).
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bssfp2dt.simulation.fibres import (dyadic, principal_direction, template_fibre_field, _unit)

TISSUES = ("GM", "WM", "CSF")
MNI_LICENCE = (
    "MNI ICBM152 non-linear 2009a template, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging "
    "Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, modify, and "
    "distribute this software and its documentation for any purpose and without fee is hereby granted, "
    "provided that the above copyright notice appear in all copies. The authors and McGill University make "
    "no representations about the suitability of this software for any purpose. It is provided 'as is' "
    "without express or implied warranty."
)


@dataclass(frozen=True)
class FibreSample:
    """Fibre properties at N template points: unit V1 (N, 3) in template axes, the aligned share of the
    local direction distribution (N,) in [0, 1], and the tract coherence (N,) in [0, 1]."""

    v1: np.ndarray
    aligned_share: np.ndarray
    coherence: np.ndarray


class Anatomy(abc.ABC):
    """Interface: ``fractions(points)`` -> (N, 3) GM/WM/CSF fractions (sum <= 1, 0 outside the brain);
    ``fibres(points)`` -> :class:`FibreSample`; ``extent`` -> (lo (3,), hi (3,)) brain bounding box in mm."""

    name: str
    extent: tuple[np.ndarray, np.ndarray]

    @abc.abstractmethod
    def fractions(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) GM/WM/CSF fractions at template points (N, 3) mm."""

    @abc.abstractmethod
    def fibres(self, points: np.ndarray) -> FibreSample:
        """Fibre direction, aligned share and coherence at template points (N, 3) mm."""

    def near_brain_on_grid(self, template_from_voxel: np.ndarray, shape, pad_mm: float) -> np.ndarray:
        """Boolean volume ``shape``: voxels whose template position (4x4 affine ``template_from_voxel``)
        may lie within ``pad_mm`` of brain tissue. Cheap and conservative."""
        index = np.indices(shape, dtype=np.float32).reshape(3, -1).T
        linear = template_from_voxel[:3, :3].T.astype(np.float32)
        points = index @ linear + template_from_voxel[:3, 3].astype(np.float32)
        return self.near_brain(points, pad_mm).reshape(shape)

    @abc.abstractmethod
    def near_brain(self, points: np.ndarray, pad_mm: float) -> np.ndarray:
        """Boolean (N,): points that may lie within ``pad_mm`` of brain tissue (cheap, conservative)."""

    @abc.abstractmethod
    def brain_points(self) -> np.ndarray:
        """A sample (P, 3) of points covering the brain, for fitting fields of view."""

    def description(self) -> dict:
        return {"name": self.name}


def _world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    inverse = np.linalg.inv(affine)
    return (points @ inverse[:3, :3].T + inverse[:3, 3]).T


class MniAnatomy(Anatomy):
    """The MNI ICBM152 2009a template at 1 mm (nilearn): GM and WM maps, CSF = mask - GM - WM.

    Fibre directions follow :mod:`bssfp2dt.simulation.fibres` on a 2 mm copy of the template.
    ``randomise_fibres`` draws random directions per region from the given generator.
    """

    name = "mni"

    def __init__(self, randomise_fibres: np.random.Generator | None = None):
        gm, wm, mask, affine = _load_mni_maps()
        self._affine = affine
        self._maps = np.stack(_tissue_maps(gm, wm, mask), axis=0).astype(np.float32)  # (3, X, Y, Z)
        self._random = randomise_fibres
        self.extent = _extent(mask > 0.5, affine)
        self._brain_points = _mask_points(mask > 0.5, affine, step=3)
        # 2 mm brain mask dilated by 8 mm, for the cheap near-brain test
        coarse = _block_max(mask > 0.5)
        self._near_mask = ndimage.binary_dilation(coarse, iterations=4).astype(np.uint8)
        self._near_affine = _scaled_affine(affine, 2)

    def near_brain(self, points, pad_mm):
        self._check_pad(pad_mm)
        coords = _world_to_voxel(points, self._near_affine)
        return ndimage.map_coordinates(self._near_mask, coords, order=0, mode="constant", cval=0) > 0

    def near_brain_on_grid(self, template_from_voxel, shape, pad_mm):
        # one affine from grid voxels to mask voxels: scipy walks the grid without big intermediates
        self._check_pad(pad_mm)
        mask_from_voxel = np.linalg.inv(self._near_affine) @ template_from_voxel
        return ndimage.affine_transform(self._near_mask, mask_from_voxel[:3, :3], mask_from_voxel[:3, 3],
                                        output_shape=tuple(shape), order=0, mode="constant", cval=0) > 0

    @staticmethod
    def _check_pad(pad_mm):
        if pad_mm > 8.0:
            raise ValueError("MniAnatomy.near_brain supports a pad of at most 8 mm")

    def brain_points(self):
        return self._brain_points

    @functools.cached_property
    def _fibre_field(self):
        gm2, wm2, affine2 = _downsample_2mm(self._maps[0], self._maps[1], self._affine)
        field, coherence = template_fibre_field(wm2, gm2, affine2, random_rng=self._random)
        return field.astype(np.float32), coherence.astype(np.float32), affine2

    def fractions(self, points):
        coords = _world_to_voxel(points, self._affine)
        return np.stack([ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0)
                         for m in self._maps], axis=1).astype(np.float64)

    def fibres(self, points):
        field, coherence, affine2 = self._fibre_field
        coords = _world_to_voxel(points, affine2)
        six = np.stack([ndimage.map_coordinates(field[..., k], coords, order=1, mode="nearest")
                        for k in range(6)], axis=1).astype(np.float64)
        v1, share = principal_direction(six)
        return FibreSample(v1, share, ndimage.map_coordinates(coherence, coords, order=1, mode="nearest"))

    def description(self):
        return {"name": self.name, "template": "MNI152NLin2009aSym (nilearn)", "licence": MNI_LICENCE,
                "randomised_fibres": self._random is not None}


@functools.lru_cache(maxsize=1)
def _load_mni_maps():
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    return gm_img.get_fdata(dtype=np.float32), wm, mask, gm_img.affine.copy()


def _tissue_maps(gm, wm, mask):
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    total = gm + wm
    scale = np.where(total > 1, 1.0 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    return gm, wm, np.clip(mask - gm - wm, 0.0, 1.0)


def _mask_points(mask, affine, step):
    index = np.argwhere(mask[::step, ::step, ::step]) * step
    return index @ affine[:3, :3].T + affine[:3, 3]


def _scaled_affine(affine, factor):
    """Affine of a grid whose voxels are ``factor`` x larger (blocks of the original grid)."""
    scaled = affine.copy()
    scaled[:3, :3] *= factor
    scaled[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / 2.0)
    return scaled


def _block_max(mask):
    shape = tuple(s // 2 * 2 for s in mask.shape)
    m = mask[:shape[0], :shape[1], :shape[2]]
    return m.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).max(axis=(1, 3, 5))


def _downsample_2mm(gm, wm, affine):
    """Block-average the 1 mm maps to 2 mm (fibre geometry needs no more)."""
    def block_mean(volume):
        shape = tuple(s // 2 * 2 for s in volume.shape)
        v = volume[:shape[0], :shape[1], :shape[2]]
        return v.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))
    return block_mean(gm).astype(np.float64), block_mean(wm).astype(np.float64), _scaled_affine(affine, 2)


def _extent(mask, affine):
    index = np.argwhere(mask)
    corners = np.stack([index.min(axis=0), index.max(axis=0)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


# --- procedural phantom -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tube:
    """A straight cylinder of fibres: axis point ``centre`` (mm, unit-scale), unit ``direction``,
    ``radius`` and half-length (mm, unit-scale)."""

    name: str
    centre: tuple[float, float, float]
    direction: tuple[float, float, float]
    radius: float
    half_length: float

    def membership(self, points, scale, edge_mm):
        centre = np.asarray(self.centre) * scale
        axis = _unit(np.asarray(self.direction, dtype=np.float64))
        rel = points - centre
        along = rel @ axis
        radial = np.linalg.norm(rel - along[:, None] * axis, axis=1)
        inside_r = _soft_step((self.radius * scale - radial) / edge_mm)
        inside_l = _soft_step((self.half_length * scale - np.abs(along)) / edge_mm)
        return inside_r * inside_l, np.broadcast_to(axis, points.shape)


@dataclass(frozen=True)
class Sheet:
    """A planar slab of fibres running along ``direction`` (in the plane with normal ``normal``),
    bounded to a box half-size ``half_extent`` around ``centre`` (mm, unit-scale)."""

    name: str
    centre: tuple[float, float, float]
    normal: tuple[float, float, float]
    direction: tuple[float, float, float]
    half_thickness: float
    half_extent: float

    def membership(self, points, scale, edge_mm):
        centre = np.asarray(self.centre) * scale
        normal = _unit(np.asarray(self.normal, dtype=np.float64))
        direction = np.asarray(self.direction, dtype=np.float64)
        direction = _unit(direction - (direction @ normal) * normal)
        rel = points - centre
        across = np.abs(rel @ normal)
        inside = _soft_step((self.half_thickness * scale - across) / edge_mm)
        inside *= _soft_step((self.half_extent * scale - np.abs(rel).max(axis=1)) / edge_mm)
        return inside, np.broadcast_to(direction, points.shape)


def _soft_step(signed):
    """Logistic partial-volume edge: 0.5 on the boundary, ~1 inside, ~0 outside."""
    return 1.0 / (1.0 + np.exp(-4.0 * np.clip(signed, -20, 20)))


PHANTOM_STRUCTURES = (
    Tube("commissure_x", (0.0, 0.0, 22.0), (1, 0, 0), 7.0, 42.0),
    Tube("projection_z_left", (-24.0, -6.0, 0.0), (0, 0, 1), 6.0, 40.0),
    Tube("projection_z_right", (24.0, -6.0, 0.0), (0, 0, 1), 6.0, 40.0),
    Tube("association_y_left", (-38.0, 0.0, 12.0), (0, 1, 0), 5.0, 45.0),
    Tube("association_y_right", (38.0, 0.0, 12.0), (0, 1, 0), 5.0, 45.0),
    Sheet("oblique_sheet", (0.0, -45.0, 0.0), (0, 1, -1), (1, 1, 1), 3.5, 22.0),
)


class ProceduralAnatomy(Anatomy):
    """A brain-like geometric phantom defined analytically (no data files).

    An ellipsoidal brain (semi-axes 62 x 78 x 58 mm times ``scale``): 2 mm of outer CSF, 3 mm of cortex,
    white matter inside, two ventricles, and fibre structures with known directions: tubes along x, y
    and z and an oblique sheet. Other white matter runs circumferentially around z (coherence 0.2);
    cortex is radial. Edges are soft (partial volume over ~1 mm).
    """

    name = "procedural"
    SEMI_AXES = np.array([62.0, 78.0, 58.0])

    def __init__(self, scale: float = 1.0, edge_mm: float = 0.8):
        self.scale = float(scale)
        self.edge_mm = edge_mm
        half = self.SEMI_AXES * self.scale
        self.extent = (-half, half)

    def _depth(self, points):
        """Approximate depth below the brain surface in mm (negative outside)."""
        semi = self.SEMI_AXES * self.scale
        radius = np.linalg.norm(points / semi, axis=1)
        return (1.0 - radius) * semi.min()

    def _ventricles(self, points):
        s = self.scale
        out = np.zeros(len(points))
        for side in (-1.0, 1.0):
            centre = np.array([side * 9.0, 0.0, 8.0]) * s
            semi = np.array([5.0, 20.0, 8.0]) * max(s, 0.3)
            r = np.linalg.norm((points - centre) / semi, axis=1)
            out = np.maximum(out, _soft_step((1.0 - r) * semi.min() / self.edge_mm))
        return out

    def near_brain(self, points, pad_mm):
        return self._depth(points) > -pad_mm

    def brain_points(self):
        semi = self.SEMI_AXES * self.scale
        directions = np.random.default_rng(0).standard_normal((4000, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return directions * semi

    def fractions(self, points):
        depth = self._depth(points)
        brain = _soft_step(depth / self.edge_mm)
        below_csf = _soft_step((depth - 2.0) / self.edge_mm)
        below_gm = _soft_step((depth - 5.0) / self.edge_mm)
        ventricle = self._ventricles(points) * below_gm
        csf = brain - below_csf + ventricle
        gm = below_csf - below_gm
        wm = below_gm - ventricle
        return np.stack([gm, wm, csf], axis=1)

    def fibres(self, points):
        semi = self.SEMI_AXES * self.scale
        radial = _unit(points / semi ** 2)
        circumferential = _unit(np.stack([-points[:, 1], points[:, 0], np.zeros(len(points))], axis=1))
        circumferential[np.linalg.norm(circumferential, axis=1) == 0] = (0.0, 1.0, 0.0)
        depth = self._depth(points)
        cortical = 1.0 - _soft_step((depth - 5.0) / self.edge_mm)
        six = (1.0 - cortical)[:, None] * dyadic(circumferential) + cortical[:, None] * dyadic(radial)
        coherence = np.full(len(points), 0.2)
        for structure in PHANTOM_STRUCTURES:
            weight, direction = structure.membership(points, self.scale, self.edge_mm)
            six = (1.0 - weight)[:, None] * six + weight[:, None] * dyadic(direction)
            coherence = np.maximum(coherence, weight)
        v1, share = principal_direction(six)
        return FibreSample(v1, share, coherence)

    def description(self):
        return {"name": self.name, "scale": self.scale,
                "structures": [s.name for s in PHANTOM_STRUCTURES]}


def make_anatomy(kind: str, *, scale: float = 1.0, randomise_fibres: np.random.Generator | None = None) -> Anatomy:
    """``kind`` 'mni' (template; ``scale`` is ignored) or 'procedural' (size ``scale``)."""
    if kind == "mni":
        return MniAnatomy(randomise_fibres=randomise_fibres)
    if kind == "procedural":
        return ProceduralAnatomy(scale=scale)
    raise ValueError(f"unknown anatomy {kind!r}: use 'mni' or 'procedural'")
