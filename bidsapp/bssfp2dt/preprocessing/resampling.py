"""Resampling of scalar, 4D, complex and tensor volumes between voxel grids.

Conventions used throughout the preprocessing package:

* An *affine* is the 4x4 voxel-index -> world (mm, RAS) matrix of a NIfTI image.
* A *transform* ``T`` is a 4x4 world -> world matrix that maps a point of the **target** (fixed)
  image's world space to the point of the **source** (moving) world space whose value it takes.
  This is the "pull" direction that resampling needs and the one that
  :func:`bssfp2dt.preprocessing.registration.register` returns (dipy's ``AffineMap.affine`` with
  static = target, moving = source). ``None`` means the identity (the images are already aligned).
* Tensors are ``(..., 6)`` in BEP016 order D11, D12, D13, D22, D23, D33 (mm^2/s) with components
  along the image's voxel axes (unit vectors of the axes, independent of the voxel size).
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from bssfp2dt.dti.eigen import bep016_to_matrix, matrix_to_bep016
from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)

#: Index pairs (row, column) of the six BEP016 tensor components D11, D12, D13, D22, D23, D33.
TENSOR_INTERPOLATIONS = ("linear", "log-euclidean")


def _check_affine(affine: np.ndarray, name: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise UsageError(f"{name} must be a 4x4 matrix, got shape {affine.shape}")
    return affine


def target_to_source_voxels(source_affine: np.ndarray, target_affine: np.ndarray,
                            transform: np.ndarray | None = None) -> np.ndarray:
    """The composed 4x4 map from target voxel indices to source voxel indices.

    ``inv(source_affine) @ transform @ target_affine``.
    """
    source_affine = _check_affine(source_affine, "source affine")
    target_affine = _check_affine(target_affine, "target affine")
    transform = np.eye(4) if transform is None else _check_affine(transform, "transform")
    return np.linalg.inv(source_affine) @ transform @ target_affine


def resample(volume: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, int, int],
             target_affine: np.ndarray, transform: np.ndarray | None = None, order: int = 1,
             cval: float = 0.0) -> np.ndarray:
    """Resample a volume onto a target grid with ``scipy.ndimage.map_coordinates``.

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, ...)`` (extra axes resampled one by one), real or
            complex; complex data is resampled as real and imaginary parts separately, which is
            exact for linear interpolation of a complex signal (interpolating magnitude and
            phase would wrap the phase).
        source_affine: 4x4 voxel -> world (mm) of ``volume``.
        target_shape: ``(X', Y', Z')`` of the output grid.
        target_affine: 4x4 voxel -> world (mm) of the output grid.
        transform: 4x4 target world -> source world (mm), or None for the identity.
        order: spline order (1 = trilinear, 0 = nearest, 3 = cubic).
        cval: value outside the source field of view.
    Returns:
        ``(X', Y', Z', ...)`` float64 (or complex128).
    """
    volume = np.asarray(volume)
    if volume.ndim < 3:
        raise UsageError(f"resampling needs at least a 3D volume, got shape {volume.shape}")
    target_shape = tuple(int(n) for n in target_shape)
    if len(target_shape) != 3:
        raise UsageError(f"target shape must have 3 entries, got {target_shape}")
    if np.iscomplexobj(volume):
        real = resample(volume.real, source_affine, target_shape, target_affine, transform, order, cval)
        imag = resample(volume.imag, source_affine, target_shape, target_affine, transform, order, 0.0)
        return real + 1j * imag
    voxel_map = target_to_source_voxels(source_affine, target_affine, transform)
    grid = np.indices(target_shape, dtype=np.float64).reshape(3, -1)
    coords = voxel_map[:3, :3] @ grid + voxel_map[:3, 3:4]
    extra = volume.shape[3:]
    flat = volume.reshape(volume.shape[:3] + (-1,)).astype(np.float64, copy=False)
    out = np.empty((int(np.prod(target_shape)), flat.shape[-1]))
    for channel in range(flat.shape[-1]):
        out[:, channel] = ndimage.map_coordinates(flat[..., channel], coords, order=order,
                                                  mode="constant", cval=cval)
    return out.reshape(target_shape + extra)


def common_grid(t1w_affine: np.ndarray, t1w_shape: tuple[int, ...],
                voxel_mm: float = 2.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned RAS grid (positive diagonal affine) covering the T1w field of view.

    Image axes then coincide with world axes (x = L->R, y = P->A, z = I->S), so tensors on this
    grid are in the world "xyz" frame that BEP016's ``Reference: "xyz"`` means.

    Args:
        t1w_affine: 4x4 voxel -> world (mm) of the T1w image (any orientation or obliquity).
        t1w_shape: the T1w shape (first three entries used).
        voxel_mm: isotropic voxel size of the new grid (mm); 2 mm is the DWI resolution.
    Returns:
        ``(shape, affine)``: the 3-tuple shape and the 4x4 affine ``diag(voxel_mm) + origin``.
    """
    if voxel_mm <= 0:
        raise UsageError(f"voxel size must be positive, got {voxel_mm} mm")
    t1w_affine = _check_affine(t1w_affine, "T1w affine")
    extent = np.asarray(t1w_shape[:3], dtype=np.float64)
    # The field of view reaches half a voxel beyond the outer voxel centres.
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in extent], indexing="ij")).reshape(3, -1)
    world = t1w_affine[:3, :3] @ corners + t1w_affine[:3, 3:4]
    low, high = world.min(axis=1), world.max(axis=1)
    # A relative tolerance keeps an exact multiple of the voxel size from gaining a voxel.
    shape = tuple(int(np.ceil((h - lo) / voxel_mm - 1e-6)) for lo, h in zip(low, high))
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = low + voxel_mm / 2.0
    return shape, affine


def rotation_part(linear: np.ndarray) -> np.ndarray:
    """Rotation of a 3x3 linear map by the finite-strain polar decomposition.

    ``R = (F F^T)^(-1/2) F`` (Alexander et al. 2001): the orthogonal factor of ``F = V R``, the
    rotation closest to ``F`` once scaling and shear are removed. Computed from the SVD
    ``F = U S W^T`` as ``R = U W^T`` (identical, and stable).

    Args:
        linear: ``(3, 3)`` non-singular.
    Returns:
        ``(3, 3)`` orthogonal (determinant +1 for a proper map, -1 for one with a reflection).
    """
    linear = np.asarray(linear, dtype=np.float64)
    if linear.shape != (3, 3):
        raise UsageError(f"the linear part must be 3x3, got shape {linear.shape}")
    u, singular, wt = np.linalg.svd(linear)
    if singular.min() <= 1e-12 * max(singular.max(), 1e-300):
        raise UsageError("the transform is singular: cannot take its rotation part")
    return u @ wt


def axis_directions(affine: np.ndarray) -> np.ndarray:
    """Orthogonal 3x3 whose columns are the unit world directions of the voxel axes.

    The polar (rotation) part of ``affine[:3, :3]``: exact for any non-sheared affine, the nearest
    orthogonal frame otherwise.
    """
    return rotation_part(_check_affine(affine, "affine")[:3, :3])


def tensor_rotation(source_affine: np.ndarray, target_affine: np.ndarray,
                    transform: np.ndarray | None = None) -> np.ndarray:
    """Rotation taking tensor components in target voxel axes to source voxel axes.

    This is the rotation part of the composed target-voxel -> source-voxel transform with the voxel
    sizes divided out (``F = Q_s^T L Q_t``: ``Q`` the axis directions, ``L`` the transform's linear
    part), so anisotropic voxels are not mistaken for strain. A direction ``u_s`` in the source then
    appears as ``u_t = R^T u_s`` in the target, and a tensor as ``D_t = R^T D_s R``.

    Returns:
        ``(3, 3)`` rotation matrix ``R``.
    """
    transform = np.eye(4) if transform is None else _check_affine(transform, "transform")
    strain = axis_directions(source_affine).T @ transform[:3, :3] @ axis_directions(target_affine)
    return rotation_part(strain)


def _symmetric_function(matrix: np.ndarray, function) -> np.ndarray:
    # numpy's eigh is enough here: only the optional log-Euclidean interpolation needs it.
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * function(values)[..., None, :]) @ np.swapaxes(vectors, -1, -2)


def resample_tensor(tensor: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, int, int],
                    target_affine: np.ndarray, transform: np.ndarray | None = None, order: int = 1,
                    interpolation: str = "linear", floor: float = 1e-12) -> np.ndarray:
    """Resample a diffusion-tensor field onto a target grid and reorient it.

    Components are interpolated (trilinear by default; ``"log-euclidean"`` interpolates the matrix
    logarithm and exponentiates, which keeps tensors positive definite and avoids the swelling of
    linear averaging), then every tensor is rotated into the target voxel axes with
    ``D_t = R^T D_s R``, ``R`` from :func:`tensor_rotation` (finite strain: only the rotation of
    the transform reorients the tensor; scaling and shear do not change diffusivities).

    Args:
        tensor: ``(X, Y, Z, 6)`` BEP016 order, mm^2/s, in the source voxel axes.
        source_affine: 4x4 voxel -> world (mm) of ``tensor``.
        target_shape: ``(X', Y', Z')``.
        target_affine: 4x4 voxel -> world (mm) of the output grid.
        transform: 4x4 target world -> source world (mm), or None.
        order: spline order of the component interpolation.
        interpolation: "linear" or "log-euclidean".
        floor: smallest eigenvalue (mm^2/s) before the logarithm (background voxels are 0).
    Returns:
        ``(X', Y', Z', 6)`` float64, mm^2/s, in the target voxel axes.
    """
    if interpolation not in TENSOR_INTERPOLATIONS:
        raise UsageError(f"tensor interpolation {interpolation!r} unknown: use one of "
                         f"{', '.join(TENSOR_INTERPOLATIONS)}")
    tensor = np.asarray(tensor, dtype=np.float64)
    if tensor.ndim != 4 or tensor.shape[-1] != 6:
        raise UsageError(f"a tensor volume must be (X, Y, Z, 6), got shape {tensor.shape}")
    if interpolation == "log-euclidean":
        logs = _symmetric_function(bep016_to_matrix(tensor), lambda v: np.log(np.maximum(v, floor)))
        resampled_logs = resample(matrix_to_bep016(logs), source_affine, target_shape, target_affine,
                                  transform, order, cval=np.log(floor))
        matrices = _symmetric_function(bep016_to_matrix(resampled_logs), np.exp)
    else:
        matrices = bep016_to_matrix(resample(tensor, source_affine, target_shape, target_affine,
                                              transform, order))
    rotation = tensor_rotation(source_affine, target_affine, transform)
    rotated = rotation.T @ matrices @ rotation
    return matrix_to_bep016(rotated)
