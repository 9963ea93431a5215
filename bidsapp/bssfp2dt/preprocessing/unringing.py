"""Gibbs-ringing removal back ends: MRtrix3's ``mrdegibbs`` (through nipype's ``MRDeGibbs``) or dipy.

Both implement the local sub-voxel-shift method of Kellner et al. (2016) slice by slice; ``mrdegibbs``
(C++, Debian package ``mrtrix3``, QSIPrep's default) is several times faster than dipy's Python version.
``auto`` picks ``mrdegibbs`` when it is on the PATH and dipy otherwise; the choice is resolved once,
when the run's settings are made, so it is part of the cached steps' hash and of their provenance.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)

UNRINGING_METHODS = ("auto", "mrdegibbs", "dipy", "none")
MRTRIX_PACKAGE = "mrtrix3"
DESCRIPTIONS = {"mrdegibbs": "MRtrix3 mrdegibbs (nipype MRDeGibbs)", "dipy": "dipy gibbs_removal"}


def mrdegibbs_available() -> bool:
    """Whether MRtrix3's ``mrdegibbs`` is on the PATH."""
    return shutil.which("mrdegibbs") is not None


def resolve_method(method: str) -> str:
    """``auto`` -> ``mrdegibbs`` when available, else ``dipy``; an explicit ``mrdegibbs`` must be installed."""
    if method not in UNRINGING_METHODS:
        raise UsageError(f"unringing method {method!r} unknown: use one of {', '.join(UNRINGING_METHODS)}")
    if method == "auto":
        return "mrdegibbs" if mrdegibbs_available() else "dipy"
    if method == "mrdegibbs" and not mrdegibbs_available():
        raise UsageError(f"--unringing-method mrdegibbs: mrdegibbs is not on the PATH; install MRtrix3 (Debian "
                         f"package {MRTRIX_PACKAGE}) or use --unringing-method dipy")
    return method


def remove_gibbs_real(data: np.ndarray, method: str = "dipy", slice_axis: int = 2, threads: int = 1,
                      n_points: int = 3) -> np.ndarray:
    """Ringing removal of a real ``(X, Y, Z)`` or ``(X, Y, Z, N)`` array, in the two axes other than ``slice_axis``.

    Args:
        data: real array (any units).
        method: "mrdegibbs" or "dipy" (resolved, see :func:`resolve_method`).
        slice_axis: the slice direction (0, 1 or 2).
        threads: worker threads (mrdegibbs ``-nthreads``) or processes (dipy).
        n_points: dipy's neighbourhood of the local oscillation measure (mrdegibbs uses its defaults,
            ``-minW 1 -maxW 3 -nshifts 20``).
    Returns:
        float64 array of ``data``'s shape.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim not in (3, 4):
        raise UsageError(f"Gibbs removal needs a 3D or 4D volume, got shape {data.shape}")
    if method == "dipy":
        from dipy.denoise.gibbs import gibbs_removal

        return gibbs_removal(np.array(data), slice_axis=slice_axis, n_points=n_points, inplace=False,
                             num_processes=max(int(threads), 1))
    if method != "mrdegibbs":
        raise UsageError(f"Gibbs removal method {method!r} unknown: use mrdegibbs or dipy")
    return _mrdegibbs(data, slice_axis, threads)


def _mrdegibbs(data: np.ndarray, slice_axis: int, threads: int) -> np.ndarray:
    """Run ``mrdegibbs`` on a float32 NIfTI copy of ``data`` in a private temporary folder."""
    import nibabel as nib
    from nipype.interfaces.mrtrix3 import MRDeGibbs

    if not mrdegibbs_available():
        raise UsageError(f"mrdegibbs is not on the PATH: install MRtrix3 (Debian package {MRTRIX_PACKAGE})")
    axes = [axis for axis in range(3) if axis != slice_axis]
    with tempfile.TemporaryDirectory(prefix="bssfp2dt_degibbs_") as folder:
        source, target = Path(folder) / "in.nii", Path(folder) / "out.nii"
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(source))
        interface = MRDeGibbs(in_file=str(source), out_file=str(target), axes=axes, nthreads=max(int(threads), 1),
                              args="-quiet -datatype float32")
        interface.run(cwd=folder)
        return np.asarray(nib.load(str(target)).dataobj, dtype=np.float64).reshape(data.shape)
