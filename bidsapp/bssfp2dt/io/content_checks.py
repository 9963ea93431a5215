"""Cheap checks of what the input images hold, run after discovery and before anything is written.

Discovery (:mod:`bssfp2dt.io.bids`) checks headers, grids and sidecars; this module reads the voxel
values and decides per case (README "Reliability"):

* **stop** the run with one exit-66 line naming the file: images smaller than :data:`MIN_EDGE` voxels
  a side, more than :data:`REPAIR_FRACTION` non-finite values, a constant image or cycle (no signal),
  a mostly negative bSSFP magnitude (flipped sign), phase values outside their declared units;
* **repair** with a warning that counts what was repaired: up to :data:`REPAIR_FRACTION` of the
  values non-finite (set to 0 when the image is read, :func:`finite`) or negative in the bSSFP
  magnitude (set to 0 in :func:`bssfp2dt.preprocessing.steps.prepare_bssfp`);
* **drop an optional input**: a DWI whose gradient table cannot give a tensor (no diffusion-weighted
  volume, zero b-vectors, fewer than six independent directions) is only the evaluation's reference,
  so the prediction goes ahead and the evaluation is skipped with a warning. Training and
  ``--input-modality dwi-tensor`` need the DWI, so there it stops the run.

After registration, :func:`check_overlap` stops a subject whose moving image barely covers the T1w
brain mask (a "registration" to the identity of an image from elsewhere).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import MissingInputError

logger = logging.getLogger(__name__)

MIN_EDGE = 4  # voxels: the smallest image side registration, resampling and a patch can work with
REPAIR_FRACTION = 0.01  # up to 1 % of bad values are repaired (set to 0); more stops the subject
MIN_OVERLAP = 0.5  # fraction of the T1w brain mask the registered moving image must cover
B0_THRESHOLD = 50.0  # s/mm^2: volumes at or below it are b = 0 (as in the tensor fit)
_PI_TOLERANCE = 1e-4
SCANNER_PHASE_MAX = 4095


def _load(path: Path) -> np.ndarray:
    from bssfp2dt.io.nifti import load_nifti

    return np.asarray(load_nifti(path)[0])


def finite(data: np.ndarray) -> np.ndarray:
    """``data`` with NaN and +-Inf set to 0 (the repair of :func:`check_values`); same array when all finite."""
    if np.issubdtype(data.dtype, np.integer) or np.all(np.isfinite(data)):
        return data
    return np.where(np.isfinite(data), data, 0).astype(data.dtype, copy=False)


def check_size(path: Path, shape: tuple[int, ...]) -> None:
    """Every spatial side at least :data:`MIN_EDGE` voxels (else exit 66)."""
    if min(shape[:3]) < MIN_EDGE:
        raise MissingInputError(f"{path} is {'x'.join(str(n) for n in shape[:3])} voxels; at least {MIN_EDGE} "
                                "voxels a side are needed, give the full image")


@dataclass(frozen=True)
class ValueSummary:
    """What :func:`summarise` counted over an image's values (all volumes).

    ``constant``: ``(volume index, value)`` of the first volume holding one value everywhere, else None;
    ``low``/``high``: range of the finite values (0, 0 when there are none).
    """

    size: int
    n_volumes: int
    non_finite: int
    negative: int
    low: float
    high: float
    constant: tuple[int, float] | None


def volumes(path: Path) -> Iterator[np.ndarray]:
    """The image's 3D volumes, one at a time as float32 (scaled), so a large series is never held as floats."""
    import nibabel as nib

    from bssfp2dt.io.nifti import effective_shape

    image = nib.load(str(path))
    proxy = image.dataobj
    raw = np.asanyarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    raw = raw.reshape(effective_shape(raw.shape)[:3] + (-1,))
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    for index in range(raw.shape[-1]):
        volume = raw[..., index].astype(np.float32)
        yield volume * np.float32(slope) + np.float32(inter) if (slope, inter) != (1.0, 0.0) else volume


def summarise(volume_iter: Iterable[np.ndarray]) -> ValueSummary:
    """Count non-finite and negative values, the finite range and the first constant volume."""
    size = non_finite = negative = count = 0
    low, high = np.inf, -np.inf
    constant = None
    for index, volume in enumerate(volume_iter):
        count += 1
        size += volume.size
        good = np.isfinite(volume)
        non_finite += int(volume.size - np.count_nonzero(good))
        values = volume[good] if not good.all() else volume
        negative += int(np.count_nonzero(values < 0))
        if values.size:
            vmin, vmax = float(values.min()), float(values.max())
            low, high = min(low, vmin), max(high, vmax)
            if vmin == vmax and constant is None and values.size == volume.size:
                constant = (index, vmin)
        elif constant is None:
            constant = (index, float("nan"))
    if not np.isfinite(low):
        low = high = 0.0
    return ValueSummary(size=size, n_volumes=count, non_finite=non_finite, negative=negative, low=low, high=high,
                        constant=constant)


def check_values(path: Path, summary: ValueSummary, what: str, *, magnitude: bool = False) -> list[str]:
    """Finite, non-constant (per volume for 4D), and for a magnitude non-negative values.

    Returns the repairs as phrases ("3 non-finite value(s) set to 0"); raises MissingInputError (66)
    for what cannot be repaired.
    """
    repairs = []
    size, bad = summary.size, summary.non_finite
    if bad:
        if bad > REPAIR_FRACTION * size:
            raise MissingInputError(f"{what} {path}: {bad} of {size} voxel values are NaN or infinite "
                                    f"({100 * bad / size:.3g} %); re-export the image")
        repairs.append(f"{bad} non-finite value(s) set to 0")
    if summary.constant is not None:
        index, value = summary.constant
        where = f" (volume {index})" if summary.n_volumes > 1 else ""
        raise MissingInputError(f"{what} {path} holds one constant value ({value:g}) in every voxel{where}: there "
                                "is no signal; re-export or replace it")
    if magnitude:
        negative = summary.negative
        if negative > REPAIR_FRACTION * size:
            raise MissingInputError(f"{what} {path}: {negative} of {size} values are negative "
                                    f"({100 * negative / size:.3g} %), which a magnitude never is (a sign flip?); "
                                    "re-export the magnitude")
        if negative:
            repairs.append(f"{negative} negative value(s) set to 0")
    return repairs


def check_phase_range(path: Path, summary: ValueSummary, units: str) -> None:
    """Phase values consistent with their units: [-pi, pi] for rad, 0..4095 for arbitrary."""
    low, high = summary.low, summary.high
    if units == "rad" and (low < -np.pi - _PI_TOLERANCE or high > np.pi + _PI_TOLERANCE):
        hint = " (degrees?)" if high <= 360.0 + _PI_TOLERANCE and low >= -360.0 - _PI_TOLERANCE else ""
        raise MissingInputError(f"bSSFP phase {path}: the sidecar says \"Units\": \"rad\" but the values span "
                                f"[{low:.4g}, {high:.4g}]{hint}; convert them to radians or fix \"Units\"")
    if units == "arbitrary" and (low < 0 or high > SCANNER_PHASE_MAX):
        raise MissingInputError(f"bSSFP phase {path}: \"Units\": \"arbitrary\" means scanner integers "
                                f"0..{SCANNER_PHASE_MAX} but the values span [{low:.4g}, {high:.4g}]; fix the data "
                                "or \"Units\"")


def tensor_problem(b_values: Iterable[float], bvec: Path) -> str | None:
    """Why this gradient table cannot give a tensor, or None when it can (6 independent b > 0 directions)."""
    b_values = np.asarray(list(b_values), dtype=np.float64)
    weighted = b_values > B0_THRESHOLD
    if not weighted.any():
        return "every volume is b = 0"
    vectors = np.loadtxt(bvec, ndmin=2)[:, weighted].T
    norms = np.linalg.norm(vectors, axis=1)
    if np.all(norms < 1e-6):
        return f"every b-vector of a diffusion-weighted volume in {bvec.name} is zero"
    gx, gy, gz = vectors[norms >= 1e-6].T
    design = np.stack([gx * gx, gy * gy, gz * gz, gx * gy, gx * gz, gy * gz], axis=1)
    rank = int(np.linalg.matrix_rank(design, tol=1e-6))
    if rank < 6:
        return f"the b-vectors span {rank} of the 6 independent directions a tensor needs"
    return None


def covered_fraction(moving_on_grid: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the brain mask where the registered image has signal (any channel non-zero).

    ``moving_on_grid``: (X, Y, Z[, C]) resampled image (0 outside its field of view); ``mask`` (X, Y, Z) bool.
    """
    signal = np.abs(moving_on_grid).reshape(mask.shape + (-1,)).max(axis=-1) > 0
    inside = int(np.count_nonzero(mask))
    return float(np.count_nonzero(signal & mask)) / inside if inside else 0.0


def check_overlap(moving_on_grid: np.ndarray, mask: np.ndarray, what: str, moving: str) -> float:
    """:func:`covered_fraction`; exit 66 below :data:`MIN_OVERLAP`."""
    covered = covered_fraction(moving_on_grid, mask)
    if covered < MIN_OVERLAP:
        raise MissingInputError(f"{what} {moving} covers {100 * covered:.0f} % of the T1w brain mask after "
                                f"registration (at least {100 * MIN_OVERLAP:.0f} % needed): the images do not "
                                "overlap; check that both come from the same subject and session")
    return covered


def check_registered_bssfp(preprocessed_session, raw_bssfp) -> float:
    """:func:`check_overlap` of a preprocessed session's bSSFP channels (X, Y, Z, 24) with its brain mask."""
    channels = _load(preprocessed_session.bssfp)
    mask = _load(preprocessed_session.brain_mask) > 0
    return check_overlap(channels[..., 0::2], mask, "bSSFP magnitude", str(raw_bssfp.magnitude))


def reference_overlaps(tensor_path: Path, mask_path: Path, label: str, session: str | None) -> bool:
    """Whether a registered DWI tensor covers enough of the brain mask to evaluate against; warns if not."""
    covered = covered_fraction(_load(tensor_path), _load(mask_path) > 0)
    if covered < MIN_OVERLAP:
        logger.warning("sub-%s: the DWI of ses-%s covers %.0f %% of the T1w brain mask after registration (at least "
                       "%.0f %% needed); the prediction is kept, its evaluation against this DWI is skipped", label,
                       session, 100 * covered, 100 * MIN_OVERLAP)
        return False
    return True


# --------------------------------------------------------------------------- per session
def check_session(session, input_modality: str, dwi_required: bool):
    """Check one :class:`bssfp2dt.io.bids.SessionInputs`; return it (without the DWI if that is unusable)."""
    if session.t1w is not None:
        check_size(session.t1w.image, session.t1w.shape)
        _warn(session.t1w.image, check_values(session.t1w.image, summarise(volumes(session.t1w.image)), "T1w"))
    if session.bssfp is not None and modalities.get(input_modality).reads_bssfp:
        bssfp = session.bssfp
        check_size(bssfp.magnitude, bssfp.shape)
        _warn(bssfp.magnitude, check_values(bssfp.magnitude, summarise(volumes(bssfp.magnitude)), "bSSFP magnitude",
                                            magnitude=True))
        phase = summarise(volumes(bssfp.phase))
        check_phase_range(bssfp.phase, phase, bssfp.phase_units)
        _warn(bssfp.phase, check_values(bssfp.phase, phase, "bSSFP phase"))
    if session.dwi is not None:
        problem = _dwi_problem(session.dwi)
        if problem is not None:
            if dwi_required:
                raise MissingInputError(f"DWI {session.dwi.image}: {problem}, so it cannot give a tensor; "
                                        "fix the DWI or its .bval/.bvec")
            logger.warning("DWI %s: %s, so it cannot give a tensor; the prediction is still made, its "
                           "evaluation is skipped", session.dwi.image, problem)
            return dataclasses.replace(session, dwi=None)
    return session


def _dwi_problem(dwi) -> str | None:
    if min(dwi.shape[:3]) < MIN_EDGE:
        return f"it is {'x'.join(str(n) for n in dwi.shape[:3])} voxels (at least {MIN_EDGE} a side needed)"
    return tensor_problem(dwi.b_values, dwi.bvec)


def _warn(path: Path, repairs: list[str]) -> None:
    if repairs:
        logger.warning("%s: %s (repaired when read)", path, "; ".join(repairs))


def check_subjects(subjects, input_modality: str, training: bool) -> tuple:
    """Content checks of every discovered subject (see the module docstring); returns the checked inputs."""
    dwi_required = training or modalities.get(input_modality).needs_dwi
    return tuple(dataclasses.replace(subject, sessions=tuple(check_session(session, input_modality, dwi_required)
                                                             for session in subject.sessions))
                 for subject in subjects)
