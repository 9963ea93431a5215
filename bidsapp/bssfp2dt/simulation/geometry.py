"""Geometry of a simulated subject: image grids, rigid head poses and the smooth subject-to-template warp.

Frames: *template* (anatomy, mm), *head* (the subject's own anatomy, mm, centred on the brain), and
*scanner* (mm, B0 along +z). A scan sees head point x at scanner position R x + t (its pose).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation R = Rz @ Ry @ Rx from angles (about x, y, z) in degrees; (3, 3)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class RigidPose:
    """Head -> scanner rigid transform: rotation angles (deg, about x, y, z) and translation (mm)."""

    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]

    @property
    def rotation(self) -> np.ndarray:
        return rotation_matrix(self.rotation_deg)

    @property
    def matrix(self) -> np.ndarray:
        """4x4 homogeneous head -> scanner matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation_mm
        return m

    def head_points(self, scanner_points: np.ndarray) -> np.ndarray:
        """Scanner points (N, 3) -> head points (N, 3), in the points' floating-point type."""
        dtype = scanner_points.dtype
        return (scanner_points - np.asarray(self.translation_mm, dtype=dtype)) @ self.rotation.astype(dtype)

    def compose(self, other: "RigidPose") -> "RigidPose":
        """The pose ``self`` applied after ``other`` (angles re-derived from the product)."""
        matrix = self.matrix @ other.matrix
        return RigidPose(tuple(rotation_angles_deg(matrix[:3, :3])), tuple(matrix[:3, 3]))


def rotation_angles_deg(rotation: np.ndarray) -> np.ndarray:
    """Angles (about x, y, z, deg) of R = Rz Ry Rx (inverse of :func:`rotation_matrix`)."""
    ay = np.arcsin(-np.clip(rotation[2, 0], -1, 1))
    ax = np.arctan2(rotation[2, 1], rotation[2, 2])
    az = np.arctan2(rotation[1, 0], rotation[0, 0])
    return np.rad2deg([ax, ay, az])


@dataclass(frozen=True)
class SmoothWarp:
    """Head -> template map m = A x + c + sum_k a_k sin(w_k . x + phi_k).

    ``linear`` A (3, 3) (rotation and scaling), ``offset`` c (3,) mm, and K Fourier modes with
    wave vectors (K, 3) rad/mm, amplitudes (K, 3) mm and phases (K,) rad. Analytic Jacobian.
    """

    linear: np.ndarray
    offset: np.ndarray
    wave_vectors: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray

    def to_template(self, head_points: np.ndarray) -> np.ndarray:
        """(N, 3) head mm -> (N, 3) template mm."""
        argument = head_points @ self.wave_vectors.T + self.phases
        return head_points @ self.linear.T + self.offset + np.sin(argument) @ self.amplitudes

    def jacobian(self, head_points: np.ndarray) -> np.ndarray:
        """d(template)/d(head) at each point, (N, 3, 3)."""
        argument = head_points @ self.wave_vectors.T + self.phases  # (N, K)
        modes = np.einsum("nk,ki,kj->nij", np.cos(argument), self.amplitudes, self.wave_vectors)
        return self.linear[None] + modes

    def to_dict(self) -> dict:
        return {key: np.asarray(getattr(self, key)).tolist()
                for key in ("linear", "offset", "wave_vectors", "amplitudes", "phases")}


def sample_warp(rng: np.random.Generator, template_centre: np.ndarray, rotation_deg: float = 10.0,
                scale_fraction: float = 0.10, displacement_mm: tuple[float, float] = (2.0, 5.0),
                n_modes: int = 6, wavelength_mm: tuple[float, float] = (60.0, 150.0)) -> SmoothWarp:
    """Random affine (+-rotation_deg per axis, +-scale_fraction per axis) and a smooth displacement
    whose amplitude is drawn in ``displacement_mm`` (the sum of the mode amplitudes)."""
    rotation = rotation_matrix(rng.uniform(-rotation_deg, rotation_deg, 3))
    scales = 1.0 + rng.uniform(-scale_fraction, scale_fraction, 3)
    # head = S R^T (template - c)  <=>  template = R S^-1 head + c
    linear = rotation @ np.diag(1.0 / scales)
    directions = rng.standard_normal((n_modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wave_vectors = directions * (2.0 * np.pi / rng.uniform(*wavelength_mm, n_modes))[:, None]
    amplitude_dirs = rng.standard_normal((n_modes, 3))
    amplitude_dirs /= np.linalg.norm(amplitude_dirs, axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(n_modes))
    amplitudes = amplitude_dirs * (weights * rng.uniform(*displacement_mm))[:, None]
    return SmoothWarp(linear, np.asarray(template_centre, dtype=np.float64), wave_vectors, amplitudes,
                      rng.uniform(0, 2 * np.pi, n_modes))


@dataclass(frozen=True)
class ImageGrid:
    """A voxel grid: ``shape`` (3 ints) and 4x4 voxel -> world ``affine`` (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def world_points(self) -> np.ndarray:
        """World coordinates of all voxel centres, (N, 3) in C order."""
        index = np.indices(self.shape, dtype=np.float32).reshape(3, -1)
        return (self.affine[:3, :3].astype(np.float32) @ index).T + self.affine[:3, 3].astype(np.float32)

    @property
    def axes_in_world(self) -> np.ndarray:
        """Unit voxel axes in world coordinates as columns (3, 3)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)


def axis_aligned_grid(lo: np.ndarray, hi: np.ndarray, voxel_mm: float, flip_x: bool) -> ImageGrid:
    """A grid covering the box [lo, hi] (mm) with isotropic voxels; ``flip_x`` stores it LAS (as
    DICOM converters usually do, negative determinant) instead of RAS."""
    shape = tuple(int(np.ceil((h - low) / voxel_mm)) + 1 for low, h in zip(lo, hi))
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    affine[:3, 3] = centre - voxel_mm * (np.asarray(shape) - 1) / 2.0
    if flip_x:
        affine[0, 0] = -voxel_mm
        affine[0, 3] = centre[0] + voxel_mm * (shape[0] - 1) / 2.0
    return ImageGrid(shape, affine)
