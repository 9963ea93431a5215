"""FSL's topup and eddy on the reference DWI (as the reference method ran them), through fslpy's wrappers.

Used when ``FSLDIR`` is set, its ``bin/`` holds ``topup`` and ``eddy``, and the DWI has a reverse
phase-encoded b0 (``fmap/*_dir-<X>_epi``); otherwise the DWI path without FSL runs and the provenance
says why (:func:`fsl_status`). Steps, all on the native DWI grid:

1. the first b0 of the DWI and the first volume of the reverse-PE image stacked (``b0_pair.nii.gz``);
2. ``acqp.txt`` from the sidecars' ``PhaseEncodingDirection`` and ``TotalReadoutTime`` (s; 0.05 when
   absent, which only scales topup's field map in Hz) and ``index.txt`` (every DWI volume: row 1);
3. ``topup --config=b02b0.cnf`` (field and corrected b0s);
4. ``eddy`` with the topup result, a brain mask from the uncorrected b0s, the b-values and b-vectors;
   it corrects eddy currents and head motion and rotates the b-vectors (``*.eddy_rotated_bvecs``).

``cmdonly=True`` returns the command lines fslpy builds without running anything (FSL cannot be
installed everywhere; the tests check the commands).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bssfp2dt.errors import MissingInputError

FSL_TOOLS = ("topup", "eddy")
DEFAULT_READOUT_S = 0.05
_AXES = {"i": (1, 0, 0), "j": (0, 1, 0), "k": (0, 0, 1)}


@dataclass(frozen=True)
class FslResult:
    """Paths of the corrected DWI and rotated b-vectors, the commands, and the provenance record."""

    dwi: Path
    bvec: Path
    commands: list[list[str]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def fsl_status(reverse_pe_b0: str | Path | None, environ=None) -> str | None:
    """None when topup/eddy can run; else the reason they do not (recorded as ``skipped: <reason>``)."""
    environ = os.environ if environ is None else environ
    fsldir = environ.get("FSLDIR")
    if not fsldir:
        return "FSL not found (FSLDIR is not set)"
    missing = [tool for tool in FSL_TOOLS if not os.access(Path(fsldir) / "bin" / tool, os.X_OK)]
    if missing:
        return f"FSL at {fsldir} lacks {', '.join(missing)}"
    try:
        import fsl.wrappers  # noqa: F401  (fslpy)
    except ImportError:
        return "fslpy is not installed"
    if not reverse_pe_b0:
        return "no reverse phase-encoded b0 (fmap/*_dir-<X>_epi) for topup"
    return None


def phase_encoding_row(sidecar: dict[str, Any]) -> tuple[list[int], float, bool]:
    """``([x, y, z], readout s, readout given)`` of one acqp row from a BIDS sidecar."""
    direction = str(sidecar.get("PhaseEncodingDirection", ""))
    if not direction or direction[0] not in _AXES or direction[1:] not in ("", "-"):
        raise MissingInputError(f"PhaseEncodingDirection {direction!r} is not i, j, k (or i-, j-, k-); "
                                "add it to the DWI and reverse-PE b0 sidecars for topup")
    sign = -1 if direction.endswith("-") else 1
    readout = sidecar.get("TotalReadoutTime")
    return [sign * value for value in _AXES[direction[0]]], float(readout or DEFAULT_READOUT_S), readout is not None


def _sidecar(image: Path) -> dict[str, Any]:
    path = Path(str(image).removesuffix(".gz").removesuffix(".nii") + ".json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def prepare_inputs(dwi: Path, bval: Path, reverse_pe_b0: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``b0_pair.nii.gz``, ``acqp.txt``, ``index.txt`` and ``b0_mask.nii.gz``; return their paths."""
    import nibabel as nib

    from bssfp2dt.preprocessing.dwi import brain_mask

    out_dir.mkdir(parents=True, exist_ok=True)
    image, reverse = nib.load(str(dwi)), nib.load(str(reverse_pe_b0))
    data = np.asarray(image.dataobj, dtype=np.float32)
    bvals = np.loadtxt(bval, ndmin=1)
    reverse_data = np.asarray(reverse.dataobj, dtype=np.float32)
    reverse_data = reverse_data[..., 0] if reverse_data.ndim == 4 else reverse_data
    if reverse_data.shape != data.shape[:3]:
        raise MissingInputError(f"reverse-PE b0 {reverse_pe_b0} has shape {reverse_data.shape}, the DWI "
                                f"{data.shape[:3]}: topup needs both on one grid")
    first_b0 = int(np.argmin(bvals))
    paths = {name: out_dir / name for name in ("b0_pair.nii.gz", "acqp.txt", "index.txt", "b0_mask.nii.gz")}
    nib.save(nib.Nifti1Image(np.stack([data[..., first_b0], reverse_data], axis=-1), image.affine),
             str(paths["b0_pair.nii.gz"]))
    rows = [phase_encoding_row(_sidecar(dwi)), phase_encoding_row(_sidecar(reverse_pe_b0))]
    paths["acqp.txt"].write_text("".join(f"{v[0]} {v[1]} {v[2]} {readout:.6f}\n" for v, readout, _ in rows))
    paths["index.txt"].write_text(" ".join("1" for _ in range(data.shape[3])) + "\n")
    mask = brain_mask(data.astype(np.float64), bvals).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, image.affine), str(paths["b0_mask.nii.gz"]))
    return paths


def topup_eddy(dwi: str | Path, bval: str | Path, bvec: str | Path, reverse_pe_b0: str | Path,
               out_dir: str | Path, *, cmdonly: bool = False) -> FslResult:
    """Run (or, with ``cmdonly``, only build) topup then eddy; returns the corrected DWI and rotated b-vectors."""
    from fsl import wrappers

    out_dir = Path(out_dir).resolve()
    inputs = prepare_inputs(Path(dwi), Path(bval), Path(reverse_pe_b0), out_dir / "fsl")
    topup_prefix, eddy_prefix = out_dir / "fsl" / "topup", out_dir / "fsl" / "eddy"
    topup = wrappers.topup(imain=str(inputs["b0_pair.nii.gz"]), datain=str(inputs["acqp.txt"]), config="b02b0.cnf",
                           out=str(topup_prefix), iout=f"{topup_prefix}_b0", fout=f"{topup_prefix}_field",
                           cmdonly=cmdonly)
    eddy = wrappers.eddy(imain=str(dwi), mask=str(inputs["b0_mask.nii.gz"]), index=str(inputs["index.txt"]),
                         acqp=str(inputs["acqp.txt"]), bvecs=str(bvec), bvals=str(bval), out=str(eddy_prefix),
                         topup=str(topup_prefix), cmdonly=cmdonly)
    commands = [list(topup), list(eddy)] if cmdonly else []
    given = [phase_encoding_row(_sidecar(Path(image)))[2] for image in (dwi, reverse_pe_b0)]
    readout = "from the sidecars" if all(given) else f"{DEFAULT_READOUT_S} s assumed (not in a sidecar)"
    record = {"tool": "FSL topup + eddy (fslpy wrappers)", "topup_config": "b02b0.cnf",
              "fsldir": os.environ.get("FSLDIR"), "acqp": inputs["acqp.txt"].read_text().strip().splitlines(),
              "readout_time": readout}
    return FslResult(dwi=Path(f"{eddy_prefix}.nii.gz"), bvec=Path(f"{eddy_prefix}.eddy_rotated_bvecs"),
                     commands=commands, record=record)
