"""Per-voxel error maps of a predicted diffusion tensor against a reference tensor.

Definitions (the reference method's "Evaluation Pipeline", thesis-summary.md):

- Relative error |pred - ref| / |ref| (dimensionless; 0.10 = 10 %) of the six tensor elements
  D11, D12, D13, D22, D23, D33 (BEP016 order, mm^2/s) and of FA, MD, AD, RD (from ``bssfp2dt.dti.maps``).
  The reference reports diagonal (D11, D22, D33) and off-diagonal (D12, D13, D23) elements separately;
  :mod:`bssfp2dt.evaluation.statistics` pools them that way.
- Near-zero references: a relative error divides by |ref|, so voxels with |ref| below a floor are
  *excluded* (NaN in the map, counted as ``n_excluded`` in the statistics, never averaged). Floors
  (:class:`ErrorFloors`): 1e-6 mm^2/s for tensor elements and diffusivities (typical brain diffusivities
  are ~1e-3 mm^2/s, so this only catches elements that cross zero, i.e. off-diagonals), 1e-3 for FA.
- Absolute angular errors (degrees) of the principal eigenvector V1: V1 is an axis (v and -v are the same
  fibre), so the predicted V1 is first given the sign that points it into the reference V1's hemisphere
  (v_pred . v_ref >= 0); then ``inclination`` = |incl(pred) - incl(ref)| with incl = arctan2(sqrt(x^2+y^2), z)
  in [0, 180], and ``azimuth`` = the circular difference of arctan2(y, x), in [0, 180]. Without the sign
  alignment an axis near the xy plane whose z changes sign would show a spurious 180 deg azimuth error.
  ``v1angle`` = arccos |v_pred . v_ref| in [0, 90] deg, the sign-invariant angle between the axes (the
  reference did not report it). The reference gives no formulas for its angles; these are this project's.
  Voxels where either tensor has no principal direction (zero tensor, non-finite values, or reference FA
  below ``ErrorFloors.fa_for_angles``, 0 by default = keep all) are excluded from the angular errors.

Every map is (X, Y, Z) float64: the error inside ``mask``, NaN outside it and at excluded voxels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from bssfp2dt.dti.maps import tensor_maps

logger = logging.getLogger(__name__)

#: BEP016 tensor element names, in volume order.
TENSOR_ELEMENTS = ("D11", "D12", "D13", "D22", "D23", "D33")
DIAGONAL_ELEMENTS = ("D11", "D22", "D33")
OFF_DIAGONAL_ELEMENTS = ("D12", "D13", "D23")
SCALARS = ("fa", "md", "ad", "rd")
ANGLES = ("inclination", "azimuth", "v1angle")
#: Every metric of :func:`error_maps`, in output order.
ERROR_METRICS = TENSOR_ELEMENTS + SCALARS + ANGLES
#: Units of each error map: relative errors are ratios (0.1 = 10 %), angular errors degrees.
ERROR_UNITS = {**{name: "ratio" for name in TENSOR_ELEMENTS + SCALARS}, **{name: "deg" for name in ANGLES}}


@dataclass(frozen=True)
class ErrorFloors:
    """Reference magnitudes below which a relative error is not computed (the voxel is excluded).

    Attributes:
        tensor: for the six tensor elements, mm^2/s.
        diffusivity: for MD, AD and RD, mm^2/s.
        fa: for FA (dimensionless).
        fa_for_angles: reference FA below which V1 counts as undefined for the angular errors (0 = keep all).
    """

    tensor: float = 1e-6
    diffusivity: float = 1e-6
    fa: float = 1e-3
    fa_for_angles: float = 0.0

    def floor(self, metric: str) -> float:
        """The floor of a relative-error metric (a tensor element name or fa/md/ad/rd)."""
        if metric in TENSOR_ELEMENTS:
            return self.tensor
        if metric == "fa":
            return self.fa
        if metric in ("md", "ad", "rd"):
            return self.diffusivity
        raise ValueError(f"{metric!r} has no relative-error floor")


def relative_error(predicted: np.ndarray, reference: np.ndarray, floor: float,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """|pred - ref| / |ref| (same shape as the inputs, float64, dimensionless).

    NaN where |ref| < ``floor`` (same units as the inputs), where either value is not finite, and outside
    ``mask`` (bool, same shape) when given.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    magnitude = np.abs(reference)
    valid = np.isfinite(predicted) & np.isfinite(reference) & (magnitude >= floor)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    error = np.full(reference.shape, np.nan)
    error[valid] = np.abs(predicted[valid] - reference[valid]) / magnitude[valid]
    return error


def axis_angle_errors(v1_predicted: np.ndarray, v1_reference: np.ndarray,
                      valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Angular errors (degrees) between principal axes given as unit vectors (..., 3).

    Returns ``inclination``, ``azimuth`` and ``v1angle`` maps of shape (...), NaN where ``valid`` (bool (...))
    is False or either vector is zero; see the module docstring for the definitions.
    """
    predicted = np.asarray(v1_predicted, dtype=np.float64)
    reference = np.asarray(v1_reference, dtype=np.float64)
    defined = (np.linalg.norm(predicted, axis=-1) > 0) & (np.linalg.norm(reference, axis=-1) > 0)
    if valid is not None:
        defined &= np.asarray(valid, dtype=bool)
    dot = np.sum(predicted * reference, axis=-1)
    aligned = predicted * np.where(dot < 0.0, -1.0, 1.0)[..., None]

    def angles(v):
        return (np.degrees(np.arctan2(np.hypot(v[..., 0], v[..., 1]), v[..., 2])),
                np.degrees(np.arctan2(v[..., 1], v[..., 0])))

    inclination_p, azimuth_p = angles(aligned)
    inclination_r, azimuth_r = angles(reference)
    azimuth = np.abs(azimuth_p - azimuth_r) % 360.0
    errors = {
        "inclination": np.abs(inclination_p - inclination_r),
        "azimuth": np.minimum(azimuth, 360.0 - azimuth),
        "v1angle": np.degrees(np.arccos(np.clip(np.abs(dot), 0.0, 1.0))),
    }
    for values in errors.values():
        values[~defined] = np.nan
    return errors


def axis_angle_errors_about(v1_predicted: np.ndarray, v1_reference: np.ndarray, axis: np.ndarray,
                            valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Angular errors (degrees) of principal axes (..., 3) in spherical coordinates about a direction ``axis`` (3,).

    Both are functions of axes, so neither depends on a vector's sign or needs the hemisphere alignment of
    :func:`axis_angle_errors`:

    - ``inclination``: |theta_pred - theta_ref| with theta = arccos |v . a| in [0, 90] (a = ``axis``, unit),
      the angle between the fibre axis and ``a``; in [0, 90]. A signal that depends on the fibre only through
      sin^2 theta (the bSSFP frequency shifts, with ``a`` = B0) determines exactly this angle.
    - ``azimuth``: the difference of the azimuths about ``a`` taken modulo 180 deg (an axis and its reverse
      share it), in [0, 90]; it does not depend on where the azimuth is counted from.

    NaN where ``valid`` (bool (...)) is False or either vector is zero.
    """
    predicted = np.asarray(v1_predicted, dtype=np.float64)
    reference = np.asarray(v1_reference, dtype=np.float64)
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    e1 = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    defined = (np.linalg.norm(predicted, axis=-1) > 0) & (np.linalg.norm(reference, axis=-1) > 0)
    if valid is not None:
        defined &= np.asarray(valid, dtype=bool)

    def angles(v):
        norm = np.maximum(np.linalg.norm(v, axis=-1), 1e-300)
        theta = np.degrees(np.arccos(np.clip(np.abs(v @ a) / norm, 0.0, 1.0)))
        return theta, np.degrees(np.arctan2(v @ e2, v @ e1)) % 180.0

    theta_p, phi_p = angles(predicted)
    theta_r, phi_r = angles(reference)
    azimuth = np.abs(phi_p - phi_r) % 180.0
    errors = {"inclination": np.abs(theta_p - theta_r), "azimuth": np.minimum(azimuth, 180.0 - azimuth)}
    for values in errors.values():
        values[~defined] = np.nan
    return errors


def error_maps(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray,
               floors: ErrorFloors = ErrorFloors()) -> dict[str, np.ndarray]:
    """Every error map of a predicted tensor against the reference.

    Parameters
    ----------
    predicted, reference : (X, Y, Z, 6) BEP016 tensors (D11, D12, D13, D22, D23, D33), mm^2/s.
    mask : (X, Y, Z) bool brain mask; errors are computed inside it only.
    floors : near-zero thresholds (:class:`ErrorFloors`).

    Returns
    -------
    dict metric -> (X, Y, Z) float64, keys :data:`ERROR_METRICS`: relative errors (ratio) of the tensor
    elements and FA/MD/AD/RD, absolute angular errors (deg) ``inclination``, ``azimuth``, ``v1angle``.
    NaN outside the mask and at excluded voxels.
    """
    predicted = np.asarray(predicted)
    reference = np.asarray(reference)
    mask = np.asarray(mask, dtype=bool)
    if predicted.shape != reference.shape or predicted.shape[-1:] != (6,) or predicted.shape[:-1] != mask.shape:
        raise ValueError(f"expected tensors (X, Y, Z, 6) and a mask (X, Y, Z), got {predicted.shape}, "
                         f"{reference.shape} and {mask.shape}")
    maps = {element: relative_error(predicted[..., k], reference[..., k], floors.tensor, mask)
            for k, element in enumerate(TENSOR_ELEMENTS)}
    finite = np.isfinite(predicted).all(axis=-1) & np.isfinite(reference).all(axis=-1)
    evaluated = mask & finite
    predicted_maps = tensor_maps(predicted, evaluated)
    reference_maps = tensor_maps(reference, evaluated)
    for scalar in SCALARS:
        maps[scalar] = relative_error(predicted_maps[scalar], reference_maps[scalar], floors.floor(scalar), evaluated)
    maps.update(axis_angle_errors(predicted_maps["v1"], reference_maps["v1"],
                                  evaluated & (reference_maps["fa"] >= floors.fa_for_angles)))
    excluded = {name: int(np.count_nonzero(mask & np.isnan(values))) for name, values in maps.items()}
    if any(excluded.values()):
        logger.info("voxels excluded from the error maps (near-zero or undefined reference): %s",
                    ", ".join(f"{name} {count}" for name, count in excluded.items() if count))
    return maps
