"""Rigid and affine registration with ANTs (``antsRegistration`` through antspyx), in the package's convention.

The images are handed to ITK with their NIfTI world coordinates (RAS, mm) as ITK's physical space:
origin, spacing and direction come straight from the 4x4 voxel -> world affine, so the transform ITK
returns already maps a point of the **static** image's world to the **moving** image's world, the
"pull" convention of :mod:`bssfp2dt.preprocessing.registration` (no LPS flips to undo: a rigid
registration does not care which handedness the physical space has).

Reproducibility: the metric samples on a regular grid with a seeded random jitter (``--random-seed``)
and ITK runs one thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``): with two or more threads the
Mattes metric's partial sums are combined in a varying order and two runs on the same inputs differ
(measured: 0.52 vs 0.82 deg on the same phantom), which would break byte-identical reruns. Parallelism
comes from processes instead (nipype's MultiProc, the DWI volumes over ``--nprocs``). ITK reads the
variable once per process, at its first use.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)

#: Seed of the metric's sampling jitter (any non-zero integer; 0 would mean "the clock" to ANTs).
SEED = 20240614
THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_TRANSFORMS = {"translation": "Translation", "rigid": "Rigid", "affine": "Affine"}


def single_thread() -> None:
    """One ITK thread in this process (effective only before ITK's first use in the process)."""
    os.environ[THREADS_VARIABLE] = "1"


#: The metric samples at least this many fixed-image points (at full resolution), whatever the proportion:
#: a quarter of a 2 mm head (~180k points) is plenty, a quarter of a small image is too few (on the test
#: phantoms, 0.25 of ~30^3 voxels let rigid fits jump by tens of degrees).
MIN_SAMPLES = 100_000


def sampling_proportion(requested: float | None, voxels: int) -> float:
    """The metric's sampling proportion: ``requested`` (None = all), raised to reach :data:`MIN_SAMPLES`."""
    if requested is None:
        return 1.0
    return float(min(1.0, max(float(requested), MIN_SAMPLES / max(int(voxels), 1))))


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ``ants.ANTsImage`` (float32) whose physical space is the NIfTI world of ``affine`` (mm).

    Args:
        data: ``(X, Y, Z)``.
        affine: 4x4 voxel -> world (mm); its columns must be orthogonal (no shear), as for any scan.
    """
    import ants

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise UsageError("the image affine has sheared axes, which ANTs cannot represent; reslice it first")
    return ants.from_numpy(np.ascontiguousarray(data, dtype=np.float32), origin=tuple(affine[:3, 3]),
                           spacing=tuple(spacing), direction=direction)


def itk_to_matrix(parameters: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 world map of an ITK affine transform: ``y = A (x - c) + c + t``.

    Args:
        parameters: ``(12,)`` ITK parameters: ``A`` row by row (9), then ``t`` (3).
        centre: ``(3,)`` the transform's fixed parameters (its centre ``c``, mm).
    """
    parameters = np.asarray(parameters, dtype=np.float64)
    centre = np.asarray(centre, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = parameters[:9].reshape(3, 3)
    matrix[:3, 3] = parameters[9:12] + centre - matrix[:3, :3] @ centre
    return matrix


def _initial_argument(initial: np.ndarray | None, fixed_ptr: str, moving_ptr: str, folder: Path) -> str:
    """``-r`` argument: centre-of-mass alignment (None), identity, or a written 4x4 start."""
    import ants

    if initial is None:
        return f"[{fixed_ptr},{moving_ptr},1]"
    initial = np.asarray(initial, dtype=np.float64)
    if np.array_equal(initial, np.eye(4)):
        return "Identity"
    transform = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                           matrix=initial[:3, :3], offset=initial[:3, 3])
    path = folder / "initial.mat"
    ants.write_transform(transform, str(path))
    return str(path)


def register_ants(static: np.ndarray, static_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                  kind: str, settings, static_mask: np.ndarray | None = None,
                  moving_mask: np.ndarray | None = None, initial: np.ndarray | None = None) -> np.ndarray:
    """``antsRegistration`` with Mattes mutual information, one stage of ``kind``, multi-resolution.

    Args:
        static, moving: ``(X, Y, Z)`` images (any units, any contrasts).
        static_affine, moving_affine: 4x4 voxel -> world (mm).
        kind: "translation", "rigid" or "affine".
        settings: :class:`bssfp2dt.preprocessing.registration.RegistrationSettings` (bins, levels as
            shrink factors and smoothing sigmas in voxels, iterations, sampling proportion, gradient step).
        static_mask, moving_mask: optional boolean masks restricting the metric.
        initial: 4x4 start (static world -> moving world); None = centre-of-mass alignment.
    Returns:
        4x4 float64: static world -> moving world (mm).
    """
    single_thread()
    import ants
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    fixed, mover = to_ants(static, static_affine), to_ants(moving, moving_affine)
    images = [fixed, mover]  # kept alive: ANTs reads them through pointers
    fixed_ptr, moving_ptr = get_pointer_string(fixed), get_pointer_string(mover)
    masks = []
    for mask, reference in ((static_mask, static_affine), (moving_mask, moving_affine)):
        # ANTs wants a binary (uchar) mask image, as antspyx builds it: ``image != 0``.
        masks.append("NA" if mask is None else _keep(images, to_ants(np.asarray(mask) > 0, reference) != 0))
    proportion = sampling_proportion(settings.sampling_proportion, static.size)
    with tempfile.TemporaryDirectory(prefix="bssfp2dt_ants_") as folder:
        prefix = Path(folder) / "reg_"
        arguments = [
            "--dimensionality", "3", "--float", "1",
            "-r", _initial_argument(initial, fixed_ptr, moving_ptr, Path(folder)),
            *_stages(kind, settings, f"MI[{fixed_ptr},{moving_ptr},1,{settings.nbins},Regular,{proportion}]",
                     f"[{masks[0]},{masks[1]}]"),
            "-u", "0", "-z", "1",
            "--output", str(prefix),  # the transform only: no warped images (two full resamplings per call)
            "--random-seed", str(SEED)]
        status = get_lib_fn("antsRegistration")(process_arguments(arguments))
        if status != 0:
            raise RuntimeError(f"antsRegistration failed with status {status}")
        transform = ants.read_transform(f"{prefix}0GenericAffine.mat")
        matrix = itk_to_matrix(transform.parameters, transform.fixed_parameters)
    logger.debug("ANTs %s registration: %s", kind, np.array2string(matrix, precision=4))
    return matrix


def _stages(kind: str, settings, metric: str, masks: str) -> list[str]:
    """The stage's arguments: one stage of ``kind`` (a translation stage before the rigid one doubled the cost
    and did not improve the fits on the simulator's subjects)."""
    arguments: list[str] = []
    for name in (_TRANSFORMS[kind],):
        arguments += ["--metric", metric, "--transform", f"{name}[{settings.gradient_step}]",
                      "--convergence", f"[{'x'.join(str(int(n)) for n in settings.level_iters)},1e-6,10]",
                      "--smoothing-sigmas", "x".join(f"{s:g}" for s in settings.sigmas) + "vox",
                      "--shrink-factors", "x".join(str(int(f)) for f in settings.factors), "-x", masks]
    return arguments


def _keep(images: list, image) -> str:
    from ants.internal import get_pointer_string

    images.append(image)
    return get_pointer_string(image)
