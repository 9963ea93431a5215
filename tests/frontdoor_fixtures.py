"""Tiny raw BIDS datasets for the CLI / BIDS-input tests (naming of bids-conventions.md section 2).

Imported explicitly by the front-door tests (there is deliberately no conftest.py here). Every
image is 8 voxels a side; the arrays are random but seeded, so each call builds the same dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

N_CYCLES = 12
PHASE_INCREMENTS_DEG = [30.0 * k for k in range(N_CYCLES)]
SHAPE = (8, 8, 8)
# 2 mm isotropic, origin shifted so the grid is centred roughly on 0 mm.
AFFINE = np.array([[2.0, 0, 0, -8.0], [0, 2.0, 0, -8.0], [0, 0, 2.0, -8.0], [0, 0, 0, 1]])
BVALS = [0, 1000, 1000, 1000, 1000, 1000, 1000]
BVECS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                  [0.7071, 0.7071, 0], [0.7071, 0, 0.7071], [0, 0.7071, 0.7071]]).T  # 3 x N


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, *, tr: float | None = None) -> Path:
    """Save ``data`` with mm/s units (and the TR in pixdim[4] for 4D series, as BIDS expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    if tr is not None and data.ndim == 4:
        image.header["pixdim"][4] = tr
    nib.save(image, path)
    return path


def prefix(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def folder(root: Path, subject: str, session: str | None, datatype: str) -> Path:
    base = root / f"sub-{subject}"
    return (base / f"ses-{session}" if session else base) / datatype


def bssfp_paths(root: Path, subject: str, session: str | None) -> tuple[Path, Path]:
    anat = folder(root, subject, session, "anat")
    name = prefix(subject, session) + "_acq-pcbssfp_part-{}_T2w.nii.gz"
    return anat / name.format("mag"), anat / name.format("phase")


def dwi_path(root: Path, subject: str, session: str | None) -> Path:
    return folder(root, subject, session, "dwi") / f"{prefix(subject, session)}_dwi.nii.gz"


def t1w_path(root: Path, subject: str, session: str | None) -> Path:
    return folder(root, subject, session, "anat") / f"{prefix(subject, session)}_T1w.nii.gz"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json"))


def write_description(root: Path, **extra) -> None:
    write_json(root / "dataset_description.json",
               {"Name": "bssfp2dt front-door test", "BIDSVersion": "1.10.0", "DatasetType": "raw",
                "License": "CC0", "Authors": ["Test Author"], **extra})
    (root / "README").write_text("A tiny synthetic dataset for the bssfp2dt CLI tests.\n")


def write_bssfp(root: Path, subject: str, session: str | None, rng: np.random.Generator, *,
                phase_units: str | None = "rad", n_cycles: int = N_CYCLES,
                increments: list[float] | None = PHASE_INCREMENTS_DEG) -> tuple[Path, Path]:
    """Magnitude (arbitrary units) and phase (rad or scanner integers 0..4095) 4D series."""
    mag_path, phase_path = bssfp_paths(root, subject, session)
    tr = 0.005
    write_nifti(mag_path, rng.uniform(0, 1000, SHAPE + (n_cycles,)).astype(np.float32), tr=tr)
    phase = rng.uniform(-np.pi, np.pi, SHAPE + (n_cycles,))
    if phase_units == "arbitrary" or phase_units is None:
        phase_data = np.rint((phase + np.pi) / (2 * np.pi) * 4095).astype(np.int16)
    else:
        phase_data = phase.astype(np.float32)
    write_nifti(phase_path, phase_data, tr=tr)
    common = {"RepetitionTime": tr, "EchoTime": 0.0025, "FlipAngle": 15, "MagneticFieldStrength": 3,
              "Manufacturer": "Siemens"}
    if increments is not None:
        common["PhaseIncrements"] = increments
    write_json(sidecar(mag_path), dict(common))
    phase_meta = dict(common)
    if phase_units is not None:
        phase_meta["Units"] = phase_units
    write_json(sidecar(phase_path), phase_meta)
    return mag_path, phase_path


def write_t1w(root: Path, subject: str, session: str | None, rng: np.random.Generator) -> Path:
    path = t1w_path(root, subject, session)
    write_nifti(path, rng.uniform(0, 1000, SHAPE).astype(np.float32))
    write_json(sidecar(path), {"RepetitionTime": 2.3, "EchoTime": 0.003, "FlipAngle": 9,
                               "MagneticFieldStrength": 3})
    return path


def write_dwi(root: Path, subject: str, session: str | None, rng: np.random.Generator, *,
              with_fmap: bool = True) -> Path:
    path = dwi_path(root, subject, session)
    write_nifti(path, rng.uniform(0, 1000, SHAPE + (len(BVALS),)).astype(np.float32), tr=3.0)
    stem = str(path)[: -len(".nii.gz")]
    Path(stem + ".bval").write_text(" ".join(str(b) for b in BVALS) + "\n")
    Path(stem + ".bvec").write_text("\n".join(" ".join(f"{v:.4f}" for v in row) for row in BVECS) + "\n")
    write_json(sidecar(path), {"RepetitionTime": 3.0, "EchoTime": 0.08, "PhaseEncodingDirection": "j-",
                               "TotalReadoutTime": 0.05, "MagneticFieldStrength": 3})
    if with_fmap:
        fmap = folder(root, subject, session, "fmap") / f"{prefix(subject, session)}_dir-PA_epi.nii.gz"
        write_nifti(fmap, rng.uniform(0, 1000, SHAPE + (1,)).astype(np.float32), tr=3.0)
        relative = path.relative_to(root / f"sub-{subject}").as_posix()
        write_json(sidecar(fmap), {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05,
                                   "RepetitionTime": 3.0, "EchoTime": 0.08,
                                   "IntendedFor": [f"bids::sub-{subject}/{relative}"]})
    return path


def make_bids_dataset(root: Path, subjects: tuple[str, ...] = ("01",), sessions: tuple[str | None, ...] = ("1",),
                      *, t1w_sessions: tuple[str | None, ...] | None = None, dwi: bool = True,
                      phase_units: str | None = "rad", seed: int = 0) -> Path:
    """Write a raw BIDS dataset under ``root``; return ``root``.

    Every session gets pc-bSSFP (+ DWI + reverse-PE b0 when ``dwi``); the T1w is written only in
    ``t1w_sessions`` (default: the first session), since one T1w per subject is the common case.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_description(root)
    t1w_sessions = sessions[:1] if t1w_sessions is None else t1w_sessions
    for subject in subjects:
        for session in sessions:
            write_bssfp(root, subject, session, rng, phase_units=phase_units)
            if dwi:
                write_dwi(root, subject, session, rng)
        for session in t1w_sessions:
            write_t1w(root, subject, session, rng)
    write_json(root / "participants.json", {"participant_id": {"Description": "subject label"}})
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    return root


def make_derivatives_dataset(root: Path, subject: str = "01", session: str | None = None) -> Path:
    """An sMRIPrep-like derivatives folder: GM/WM/CSF probability maps and a brain mask in T1w space."""
    rng = np.random.default_rng(1)
    write_json(root / "dataset_description.json",
               {"Name": "smriprep", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "smriprep", "Version": "0.16.0"}]})
    anat = folder(root, subject, session, "anat")
    base = prefix(subject, session)
    probs = rng.dirichlet(np.ones(3), size=SHAPE).astype(np.float32)  # X, Y, Z, 3 summing to 1
    for index, label in enumerate(("GM", "WM", "CSF")):
        write_nifti(anat / f"{base}_label-{label}_probseg.nii.gz", probs[..., index])
    write_nifti(anat / f"{base}_desc-brain_mask.nii.gz", np.ones(SHAPE, dtype=np.uint8))
    # Same labels in a template space: must not be picked up (space must be absent).
    write_nifti(anat / f"{base}_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz", probs[..., 0])
    return root


RECORDED_PLANS: list = []


def record_plan(plan) -> int:
    """A stand-in pipeline entry point for the CLI tests: remembers the plan it was handed."""
    RECORDED_PLANS.append(plan)
    return 0
