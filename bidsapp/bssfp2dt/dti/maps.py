"""Scalar and directional maps of diffusion tensors: FA, MD, AD, RD, V1, colour-FA, inclination, azimuth.

Definitions (dipy's, ``dipy.reconst.dti``), from the eigenvalues l1 >= l2 >= l3 after clipping them
below at ``min_diffusivity`` (dipy's ``decompose_tensor`` clips at 0, since negative diffusivities are
not physical; ``min_diffusivity=None`` keeps them, e.g. to get MD = trace / 3 for any tensor):

- FA = sqrt(((l1 - l2)^2 + (l2 - l3)^2 + (l3 - l1)^2) / (2 (l1^2 + l2^2 + l3^2))), 0 for an all-zero
  tensor; in [0, 1] whenever the eigenvalues are non-negative.
- MD = (l1 + l2 + l3) / 3, AD = l1, RD = (l2 + l3) / 2, in the tensor's units (mm^2/s).
- V1: unit principal eigenvector (x, y, z) in the tensor's frame (the image axes for BEP016
  ``Reference: "xyz"``). V1 is an axis, so its sign is made canonical: z > 0, or z = 0 and y > 0,
  or z = y = 0 and x >= 0.
- colour-FA (RGB): |V1| * clip(FA, 0, 1), (..., 3), red = x, green = y, blue = z; non-negative.
- inclination: polar angle of V1 from the +z axis, arctan2(sqrt(x^2 + y^2), z), in degrees, in [0, 90]
  (0 = along z, 90 = in the xy plane).
- azimuth: angle of V1's projection on the xy plane from +x towards +y, arctan2(y, x), in degrees,
  in (-180, 180]. With the canonical sign, (inclination, azimuth) identify the axis uniquely; for
  V1 near the xy plane the azimuth jumps by 180 deg when z changes sign, so angular errors of
  azimuth must be taken modulo 180 deg (or as the angle between the axes).

The reference method's evaluation ("Evaluation Pipeline" in the thesis summary) lists inclination and
azimuth of the principal eigenvector without formulas; the standard spherical-coordinate definitions
above are this project's choice.

Voxels outside the mask or with a non-finite component get 0 in every map; all-zero tensors inside
it get FA = 0 and the arbitrary axis V1 = (0, 0, 1) (inclination 0, azimuth 0).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from bssfp2dt.dti.eigen import eigen_planar, mask_voxels, planar_blocks

#: Keys of the dict returned by ``tensor_maps``.
MAP_NAMES = ("fa", "md", "ad", "rd", "v1", "rgb", "inclination", "azimuth")
_VECTOR_MAPS = ("v1", "rgb")


def tensor_maps(tensor6: np.ndarray, mask: np.ndarray | None = None, min_diffusivity: float | None = 0.0,
                dtype: DTypeLike = np.float64) -> dict[str, np.ndarray]:
    """All tensor maps from one eigen-decomposition per voxel.

    Parameters
    ----------
    tensor6 : (..., 6) BEP016 components D11, D12, D13, D22, D23, D33, in mm^2/s (any float dtype).
    mask : (...) bool, optional; maps are computed inside it only.
    min_diffusivity : eigenvalues below it are raised to it before the maps (dipy's default 0);
        None keeps them as they are.
    dtype : of the returned maps; they are always computed in float64. float32 (what the NIfTI files
        hold) halves the memory of full-volume maps.

    Returns
    -------
    dict of ``dtype`` arrays (keys ``MAP_NAMES``): ``fa`` (...) unitless; ``md``, ``ad``, ``rd`` (...)
    mm^2/s; ``v1`` (..., 3) unit vector with the canonical sign; ``rgb`` (..., 3) colour-FA in [0, 1];
    ``inclination`` and ``azimuth`` (...) in degrees; see the module docstring.
    """
    tensor6 = np.asarray(tensor6)
    batch_shape = tensor6.shape[:-1]
    n_voxels = int(np.prod(batch_shape))
    maps = {name: np.zeros((n_voxels, 3) if name in _VECTOR_MAPS else n_voxels, dtype=dtype) for name in MAP_NAMES}
    # Scatter one component at a time: fancy assignment of (V,) runs ~2x faster than of (V, 3) rows.
    targets = {name: [maps[name][:, k] for k in range(3)] if name in _VECTOR_MAPS else [maps[name]]
               for name in MAP_NAMES}
    for index, components, finite in planar_blocks(tensor6, mask_voxels(mask, batch_shape)):
        for name, values in _maps_planar(components, min_diffusivity).items():
            if finite is not None:
                values[..., ~finite] = 0.0
            for target, row in zip(targets[name], values.reshape(-1, values.shape[-1])):
                target[index] = row
    return {name: values.reshape(batch_shape + values.shape[1:]) for name, values in maps.items()}


def _maps_planar(components: np.ndarray, min_diffusivity: float | None) -> dict[str, np.ndarray]:
    """Maps of (6, V) finite tensors -> dict of (V,) or (3, V) arrays."""
    evals, evecs = eigen_planar(components, first_vector_only=True)
    if min_diffusivity is not None:
        np.maximum(evals, min_diffusivity, out=evals)
    l1, l2, l3 = evals
    d12, d23, d31 = l1 - l2, l2 - l3, l3 - l1
    norm_sq = l1 * l1 + l2 * l2 + l3 * l3
    norm_sq += norm_sq == 0.0  # all-zero tensor: FA = 0 / 1 = 0, as in dipy
    fa = np.sqrt(0.5 * (d12 * d12 + d23 * d23 + d31 * d31) / norm_sq)

    v1 = evecs[:, 0]
    vx, vy, vz = v1
    v1 *= _canonical_sign(vx, vy, vz)
    v1 += 0.0  # -0.0 -> +0.0, or arctan2 would give -180 deg for an axis along z
    in_plane = np.sqrt(vx * vx + vy * vy)
    return {
        "fa": fa,
        "md": (l1 + l2 + l3) / 3.0,
        "ad": l1,
        "rd": 0.5 * (l2 + l3),
        "v1": v1,
        "rgb": np.abs(v1) * np.minimum(np.maximum(fa, 0.0), 1.0),
        "inclination": np.degrees(np.arctan2(in_plane, vz)),
        "azimuth": np.degrees(np.arctan2(vy, vx)),
    }


def color_fa(fa: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Colour-FA |V1| * clip(FA, 0, 1): fa (...), v1 (..., 3) unit vectors -> (..., 3) in [0, 1]."""
    return np.abs(np.asarray(v1)) * np.clip(np.asarray(fa), 0.0, 1.0)[..., None]


def v1_angles(v1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclination and azimuth in degrees, (...) each, of axes v1 (..., 3), sign-invariant (module docstring)."""
    v1 = np.asarray(v1, dtype=np.float64)
    vx, vy, vz = v1[..., 0], v1[..., 1], v1[..., 2]
    sign = _canonical_sign(vx, vy, vz)
    vx, vy, vz = vx * sign + 0.0, vy * sign + 0.0, vz * sign + 0.0  # + 0.0 turns -0.0 into +0.0
    return np.degrees(np.arctan2(np.hypot(vx, vy), vz)), np.degrees(np.arctan2(vy, vx))


def _canonical_sign(vx, vy, vz):
    """+1 or -1 per axis so that sign * v has z > 0, or z = 0 and y > 0, or z = y = 0 and x >= 0."""
    vx, vy, vz = np.asarray(vx), np.asarray(vy), np.asarray(vz)
    sign = np.array(np.copysign(1.0, vz))
    in_plane = np.asarray(vz == 0.0)  # also catches -0.0, whose copysign is -1
    if in_plane.any():  # rare: only axes exactly in the xy plane need the tie-breaks
        x, y = vx[in_plane], vy[in_plane]
        sign[in_plane] = np.where((y < 0.0) | ((y == 0.0) & (x < 0.0)), -1.0, 1.0)
    return sign
