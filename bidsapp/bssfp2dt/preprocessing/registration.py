"""Rigid and affine registration (mutual information, multi-resolution) with ANTs or dipy.

Two back ends share one interface (:func:`register`) and one settings object: ``"ants"``
(``antsRegistration`` through antspyx, :mod:`bssfp2dt.preprocessing.ants_registration`; the
application's default, several times cheaper) and ``"dipy"`` (dipy's ``AffineRegistration``).

A registration returns a 4x4 world -> world (mm) matrix ``T`` mapping a point of the **static**
(fixed) image's world space to the corresponding point of the **moving** image's world space, the
"pull" direction :func:`bssfp2dt.preprocessing.resampling.resample` takes as ``transform``:
``resample(moving, moving_affine, static.shape, static_affine, T)`` puts the moving image on the
static grid. (If the moving image was made from the static one by resampling with a known ``M``,
the registration recovers ``T = M^-1``.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)

REGISTRATION_KINDS = ("translation", "rigid", "affine")
REGISTRATION_BACKENDS = ("ants", "dipy")


@dataclass(frozen=True)
class RegistrationSettings:
    """Optimiser settings of :func:`register`.

    Attributes:
        nbins: histogram bins of the mutual-information metric.
        sampling_proportion: fraction of voxels the metric samples (None = all; deterministic).
        level_iters: iterations per resolution level, coarsest first.
        sigmas: Gaussian smoothing per level (voxels), coarsest first.
        factors: down-sampling factor per level, coarsest first.
        backend: "dipy" or "ants" (see the module docstring).
        gradient_step: ANTs' optimiser step (ignored by dipy).
    """

    nbins: int = 32
    sampling_proportion: float | None = None
    level_iters: tuple[int, ...] = (200, 100, 50)
    sigmas: tuple[float, ...] = (3.0, 1.0, 0.0)
    factors: tuple[int, ...] = (4, 2, 1)
    backend: str = "dipy"
    gradient_step: float = 0.1

    def __post_init__(self):
        if not len(self.level_iters) == len(self.sigmas) == len(self.factors):
            raise UsageError("registration level_iters, sigmas and factors need one entry per level")
        if self.backend not in REGISTRATION_BACKENDS:
            raise UsageError(f"registration backend {self.backend!r} unknown: use one of "
                             f"{', '.join(REGISTRATION_BACKENDS)}")


#: A multi-resolution level is used only when its shrunk grid holds at least this many voxels along every axis.
MIN_LEVEL_VOXELS = 12


def levels_for_shape(settings: RegistrationSettings, shape: tuple[int, ...],
                     min_voxels: int = MIN_LEVEL_VOXELS) -> RegistrationSettings:
    """``settings`` without the coarse levels that would shrink an image of ``shape`` below ``min_voxels`` along
    an axis (too few voxels to hold the head's shape); the coarsest level kept takes the coarsest level's
    iterations, so the optimiser still gets its long first run. Unchanged when every level fits."""
    import dataclasses

    keep = [i for i, factor in enumerate(settings.factors) if min(shape[:3]) / factor >= min_voxels or factor == 1]
    keep = keep or [len(settings.factors) - 1]
    if len(keep) == len(settings.factors):
        return settings
    iterations = [settings.level_iters[i] for i in keep]
    iterations[0] = max(iterations[0], settings.level_iters[0])
    return dataclasses.replace(settings, level_iters=tuple(iterations),
                               sigmas=tuple(settings.sigmas[i] for i in keep),
                               factors=tuple(settings.factors[i] for i in keep))


def register(static: np.ndarray, static_affine: np.ndarray, moving: np.ndarray,
             moving_affine: np.ndarray, kind: str = "rigid",
             settings: RegistrationSettings = RegistrationSettings(),
             static_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
             initial: np.ndarray | None = None) -> np.ndarray:
    """Register ``moving`` to ``static`` with ``settings.backend``.

    dipy: centre of mass, then translation, rigid (, affine), each stage starting from the previous
    stage's result (dipy's recommended progression), so the rigid fit never starts far from the
    optimum. ANTs: one ``antsRegistration`` stage of ``kind`` from the same start, seeded and
    deterministic (:func:`bssfp2dt.preprocessing.ants_registration.register_ants`).

    Args:
        static: ``(X, Y, Z)`` the fixed image (any intensity units; mutual information copes
            with different contrasts).
        static_affine: 4x4 voxel -> world (mm) of ``static``.
        moving: ``(X', Y', Z')`` the image to align.
        moving_affine: 4x4 voxel -> world (mm) of ``moving``.
        kind: "translation" (3 dof), "rigid" (6 dof) or "affine" (12 dof).
        settings: metric and multi-resolution settings.
        static_mask, moving_mask: optional ``(X, Y, Z)``/``(X', Y', Z')`` masks for the metric.
        initial: optional 4x4 starting transform (static world -> moving world); default is the
            centre-of-mass alignment.
    Returns:
        4x4 float64: static world -> moving world (mm).
    """
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    if kind not in REGISTRATION_KINDS:
        raise UsageError(f"registration kind {kind!r} unknown: use one of {', '.join(REGISTRATION_KINDS)}")
    static = np.asarray(static, dtype=np.float64)
    moving = np.asarray(moving, dtype=np.float64)
    if static.ndim != 3 or moving.ndim != 3:
        raise UsageError(f"registration needs 3D volumes, got {static.shape} and {moving.shape}")
    static_affine = np.asarray(static_affine, dtype=np.float64)
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    if settings.backend == "ants":
        from bssfp2dt.preprocessing.ants_registration import register_ants

        return register_ants(static, static_affine, moving, moving_affine, kind, settings, static_mask=static_mask,
                             moving_mask=moving_mask, initial=initial)
    if initial is None:
        current = transform_centers_of_mass(static, static_affine, moving, moving_affine).affine
    else:
        current = np.asarray(initial, dtype=np.float64)

    metric = MutualInformationMetric(nbins=settings.nbins, sampling_proportion=settings.sampling_proportion)
    optimiser = AffineRegistration(metric=metric, level_iters=list(settings.level_iters),
                                   sigmas=list(settings.sigmas), factors=list(settings.factors),
                                   verbosity=0)
    stages = {"translation": [TranslationTransform3D()],
              "rigid": [TranslationTransform3D(), RigidTransform3D()],
              "affine": [TranslationTransform3D(), RigidTransform3D(), AffineTransform3D()]}[kind]
    masks = {}
    if static_mask is not None:
        masks["static_mask"] = np.asarray(static_mask, dtype=np.int32)
    if moving_mask is not None:
        masks["moving_mask"] = np.asarray(moving_mask, dtype=np.int32)
    for transform in stages:
        result = optimiser.optimize(static, moving, transform, None, static_grid2world=static_affine,
                                    moving_grid2world=moving_affine, starting_affine=current, **masks)
        current = result.affine
    logger.debug("%s registration: %s", kind, np.array2string(current, precision=4))
    return np.array(current, dtype=np.float64)


def rigid_matrix(angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                 centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rigid world map ``y = R (x - c) + c + t`` with ``R = Rz(gamma) Ry(beta) Rx(alpha)``.

    Args:
        angles_deg: ``(alpha, beta, gamma)``: right-handed rotations about x, y, z (degrees),
            applied in that order.
        translation_mm: ``t`` (mm).
        centre_mm: ``c``, the point the rotation keeps fixed (mm).
    Returns:
        4x4 float64.
    """
    alpha, beta, gamma = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(alpha), -np.sin(alpha)], [0, np.sin(alpha), np.cos(alpha)]])
    ry = np.array([[np.cos(beta), 0, np.sin(beta)], [0, 1, 0], [-np.sin(beta), 0, np.cos(beta)]])
    rz = np.array([[np.cos(gamma), -np.sin(gamma), 0], [np.sin(gamma), np.cos(gamma), 0], [0, 0, 1]])
    rotation = rz @ ry @ rx
    centre = np.asarray(centre_mm, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(translation_mm, dtype=np.float64)
    return matrix


def rigid_parameters(transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation angles and translation of a rigid 4x4 transform (inverse of :func:`rigid_matrix`
    with the centre at the world origin).

    Args:
        transform: 4x4 rigid (the rotation part is taken by polar decomposition, so a nearly
            rigid matrix from an optimiser is fine).
    Returns:
        ``(angles_deg, translation_mm)``: ``(3,)`` (alpha, beta, gamma) about x, y, z in degrees,
        ``R = Rz Ry Rx``, beta in [-90, 90]; ``(3,)`` translation in mm.
    """
    from bssfp2dt.preprocessing.resampling import rotation_part

    transform = np.asarray(transform, dtype=np.float64)
    if transform.shape != (4, 4):
        raise UsageError(f"a transform must be 4x4, got shape {transform.shape}")
    rotation = rotation_part(transform[:3, :3])
    beta = np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))
    alpha = np.arctan2(rotation[2, 1], rotation[2, 2])
    gamma = np.arctan2(rotation[1, 0], rotation[0, 0])
    return np.rad2deg([alpha, beta, gamma]), transform[:3, 3].copy()


def rotation_angle_deg(transform: np.ndarray) -> float:
    """Total rotation angle (degrees, 0..180) of a 4x4 (or 3x3) transform's rotation part."""
    from bssfp2dt.preprocessing.resampling import rotation_part

    matrix = np.asarray(transform, dtype=np.float64)
    rotation = rotation_part(matrix[:3, :3])
    return float(np.rad2deg(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def displacement_mm(transform: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Distance (mm) each point moves under a 4x4 transform: ``|T p - p|``, ``(N, 3)`` -> ``(N,)``.

    Used to judge a registration residual over a field of view rather than by its translation
    alone (which depends on where the world origin sits).
    """
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    transform = np.asarray(transform, dtype=np.float64)
    moved = points @ transform[:3, :3].T + transform[:3, 3]
    return np.linalg.norm(moved - points, axis=1)
