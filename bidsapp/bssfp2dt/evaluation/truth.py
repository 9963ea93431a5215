"""Errors against a simulated subject's ground truth: what the packaged models and baselines are judged by.

Reference: the tensor fitted to the subject's noiseless DWI and the true WM probability, both written by
``bssfp2dt-simulate`` to ``derivatives/bssfp2dt-truth/sub-<label>/`` in T1w space (at the DWI's voxel size).
Both are resampled (trilinear) onto the prediction's grid (the same T1w space, usually finer), so the
judgement does not depend on the pipeline's own tissue maps or DWI fit. White matter: true WM probability
above ``WM_PROBABILITY``.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from bssfp2dt.dti.maps import tensor_maps

WM_PROBABILITY = 0.8
TRUTH = "derivatives/bssfp2dt-truth"


def _truth_file(bids_dir: Path | str, subject: str, name: str) -> Path:
    """``derivatives/bssfp2dt-truth/sub-<subject>/<name>`` of a simulated dataset (``name`` may hold
    ``{sub}`` for ``sub-<subject>``); FileNotFoundError when it is missing."""
    path = Path(bids_dir) / TRUTH / f"sub-{subject}" / name.format(sub=f"sub-{subject}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {bids_dir} a dataset written by bssfp2dt-simulate?")
    return path


def truth_paths(bids_dir: Path | str, subject: str) -> tuple[Path, Path]:
    """(noiseless-fit tensor, WM probability) files of ``subject`` in a simulated dataset."""
    return (_truth_file(bids_dir, subject,
                        "dwi/{sub}_space-T1w_desc-noiselessfit_model-tensor_param-diffusivity_dwimap.nii.gz"),
            probseg_path(bids_dir, subject, "WM"))


def on_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The image at ``path`` resampled (trilinear, 0 outside) onto the grid (shape[:3], affine); float64."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    volumes = [data] if data.ndim == 3 else [data[..., k] for k in range(data.shape[-1])]
    resampled = [np.asarray(resample_from_to(nib.Nifti1Image(volume, image.affine), (shape[:3], affine), order=1,
                                             mode="constant", cval=0.0).dataobj) for volume in volumes]
    return resampled[0] if data.ndim == 3 else np.stack(resampled, axis=-1)


def tracts_path(bids_dir: Path | str, subject: str) -> Path | None:
    """The simulator's tract mask of ``subject`` (the boxes of the major tracts), None for datasets written
    before it existed."""
    try:
        return _truth_file(bids_dir, subject, "anat/{sub}_space-T1w_desc-tracts_mask.nii.gz")
    except FileNotFoundError:
        return None


def probseg_path(bids_dir: Path | str, subject: str, label: str) -> Path:
    """The simulator's true probability map of tissue ``label`` (GM, WM or CSF) of ``subject``, T1w space."""
    return _truth_file(bids_dir, subject, f"anat/{{sub}}_space-T1w_label-{label}_probseg.nii.gz")


def b0_direction(bids_dir: Path | str, subject: str, session: str | None = None) -> np.ndarray:
    """The B0 direction (3,) of ``subject``'s pc-bSSFP scan (``session``; None: the first) as a unit vector in
    the truth's T1w-space axes (the common grid's xyz), from the head poses the simulator recorded.

    A scan sees head point x at R x + t with B0 along the scanner's z; the T1w space is the scanner frame at
    the T1w's pose R_t. A fibre axis f (head) makes with B0 during the bSSFP (pose R_b) the angle between
    R_b f and z, which is the angle between R_t f (its T1w-space axis) and R_t R_b^T z: the returned vector.
    The head's tilt against B0 (its base pose) is common to both scans, so it differs from z only by the
    scans' pose jitter.
    """
    from bssfp2dt.simulation.geometry import rotation_matrix

    scans = json.loads(_truth_file(bids_dir, subject, "{sub}_simulation.json").read_text())["subject"]["scans"]
    t1w = next(scan for scan in scans if scan["modality"] == "t1w")
    bssfp = [scan for scan in scans if scan["modality"] == "pcbssfp" and session in (None, scan["session"])]
    if not bssfp:
        raise ValueError(f"sub-{subject} has no simulated pc-bSSFP scan{f' in session {session}' if session else ''}")
    direction = rotation_matrix(t1w["pose"]["rotation_deg"]) @ rotation_matrix(
        bssfp[0]["pose"]["rotation_deg"]).T @ np.array([0.0, 0.0, 1.0])
    return direction / np.linalg.norm(direction)


def white_matter_errors(prediction: np.ndarray, affine: np.ndarray, bids_dir: Path | str,
                        subject: str) -> dict[str, float]:
    """Median WM errors of ``prediction`` (X, Y, Z, 6) mm^2/s on the grid ``affine`` against the truth.

    Returns ``v1_angle`` (degrees, sign-invariant), ``fa_error`` and ``md_error`` (|pred - ref| / ref),
    ``fa_ratio`` (pred / ref FA), ``voxels`` (WM voxels compared) and ``non_finite`` (non-finite predicted
    voxels anywhere in the brain's bounding volume). Where the dataset has the tract mask, the same four
    medians inside the tracts (``tract_*``: one known direction per tract, learnable only from context) and in
    the other white matter (``other_*``: fibres along the WM map's structure), NaN for an empty part.
    """
    tensor_path, wm_path = truth_paths(bids_dir, subject)
    reference = on_grid(tensor_path, prediction.shape, affine)
    region = on_grid(wm_path, prediction.shape, affine) > WM_PROBABILITY
    predicted = tensor_maps(prediction, region)
    truth = tensor_maps(reference, region)
    errors = {**_median_errors(predicted, truth, region), "voxels": int(region.sum()),
              "non_finite": int((~np.isfinite(prediction)).any(axis=-1).sum())}
    tracts = tracts_path(bids_dir, subject)
    if tracts is not None:
        in_tract = on_grid(tracts, prediction.shape, affine) > 0.5
        for name, part in (("tract", region & in_tract), ("other", region & ~in_tract)):
            errors.update({f"{name}_{key}": value for key, value in _median_errors(predicted, truth, part).items()})
    return errors


def _median_errors(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                   region: np.ndarray) -> dict[str, float]:
    """V1 angle, FA/MD relative errors and FA ratio medians over ``region`` (bool (X, Y, Z)) of two map sets."""
    if not region.any():
        return dict.fromkeys(("v1_angle", "fa_error", "md_error", "fa_ratio"), float("nan"))
    cosine = np.abs((predicted["v1"][region] * truth["v1"][region]).sum(axis=-1)).clip(max=1.0)
    fa_true, md_true = truth["fa"][region], truth["md"][region]
    return {"v1_angle": float(np.median(np.degrees(np.arccos(cosine)))),
            "fa_error": float(np.median(np.abs(predicted["fa"][region] - fa_true) / np.maximum(fa_true, 1e-3))),
            "md_error": float(np.median(np.abs(predicted["md"][region] - md_true) / np.maximum(md_true, 1e-9))),
            "fa_ratio": float(np.median(predicted["fa"][region] / np.maximum(fa_true, 1e-3)))}
