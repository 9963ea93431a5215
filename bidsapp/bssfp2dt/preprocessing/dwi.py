"""DWI preprocessing steps (everything before the tensor fit) as pure array functions.

Conventions: a DWI series is ``(X, Y, Z, N)`` (N volumes, scanner units); ``bvals`` are ``(N,)``
in s/mm^2; ``bvecs`` are ``(N, 3)`` unit vectors whose components lie along the image's voxel axes
(BIDS/FSL ``.bvec`` files hold the transpose, ``(3, N)``). We read the components as given along
the voxel axes, as dipy does; FSL additionally flips the first component for images stored with a
positive-determinant (neurological) affine, so bvecs written by FSL for such images need that flip
before they are used here. Transforms follow :mod:`bssfp2dt.preprocessing.registration`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bssfp2dt.errors import InputOutputError, MissingInputError, UsageError
from bssfp2dt.preprocessing.registration import RegistrationSettings, levels_for_shape, register
from bssfp2dt.preprocessing.resampling import axis_directions, resample, rotation_part

logger = logging.getLogger(__name__)

#: b-values at or below this (s/mm^2) count as b0 (scanners report b=5..50 for "b0").
B0_THRESHOLD = 50.0
#: Denoising methods of :func:`denoise`; ``--denoise-method`` offers "dwidenoise" and "none".
DENOISE_METHODS = ("none", "dwidenoise", "mppca", "patch2self")
DENOISE_DESCRIPTIONS = {"dwidenoise": "MRtrix3 dwidenoise (MP-PCA, 5x5x5 window; nipype DWIDenoise)",
                        "mppca": "dipy mppca (MP-PCA)", "patch2self": "dipy patch2self"}
MRTRIX_PACKAGE = "mrtrix3"


def read_bvals_bvecs(bval_path: Path | str, bvec_path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read a BIDS ``.bval``/``.bvec`` pair.

    Returns:
        ``bvals`` ``(N,)`` s/mm^2 and ``bvecs`` ``(N, 3)`` in image voxel axes, the non-zero rows
        normalised to unit length (scanners write them rounded to a few decimals).
    """
    paths = {"bval": Path(bval_path), "bvec": Path(bvec_path)}
    for kind, path in paths.items():
        if not path.is_file():
            raise MissingInputError(f".{kind} file {path} not found: BIDS DWI needs .bval and .bvec next to the image")
    try:
        bvals = np.atleast_1d(np.loadtxt(paths["bval"], dtype=np.float64).reshape(-1))
        bvecs = np.atleast_2d(np.loadtxt(paths["bvec"], dtype=np.float64))
    except ValueError as error:
        raise InputOutputError(f"cannot parse {paths['bval']} / {paths['bvec']} as numbers ({error})") from error
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        logger.warning("%s holds N rows of 3 values; BIDS wants 3 rows of N: reading it transposed", paths["bvec"])
        bvecs = bvecs.T
    if bvecs.shape != (3, bvals.size):
        raise InputOutputError(f"{paths['bvec']} has shape {bvecs.shape}, expected (3, {bvals.size}) "
                               f"to match {paths['bval']}")
    return bvals, normalise_bvecs(bvecs.T)


def normalise_bvecs(bvecs: np.ndarray) -> np.ndarray:
    """``(N, 3)`` with every non-zero row scaled to unit length (zero rows stay zero)."""
    bvecs = np.asarray(bvecs, dtype=np.float64)
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    return np.where(norms > 1e-8, bvecs / np.where(norms > 1e-8, norms, 1.0), 0.0)


def b0_indices(bvals: np.ndarray, threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Indices of the b0 volumes (b <= ``threshold`` s/mm^2); UsageError when there are none."""
    indices = np.flatnonzero(np.asarray(bvals) <= threshold)
    if indices.size == 0:
        raise UsageError(f"the DWI series has no b0 volume (b <= {threshold} s/mm^2): the tensor needs one")
    return indices


def mean_b0(dwi: np.ndarray, bvals: np.ndarray, threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Mean of the b0 volumes: ``(X, Y, Z, N)`` -> ``(X, Y, Z)`` float64, scanner units."""
    dwi = _check_dwi(dwi, bvals)
    return dwi[..., b0_indices(bvals, threshold)].mean(axis=-1)


def brain_mask(dwi: np.ndarray, bvals: np.ndarray, median_radius: int = 2, numpass: int = 2,
               threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Brain mask by dipy's ``median_otsu`` on the mean b0 (median filter, then Otsu threshold).

    Args:
        dwi: ``(X, Y, Z, N)``.
        bvals: ``(N,)`` s/mm^2.
        median_radius: median filter radius (voxels); 2 suits 2 mm data.
        numpass: median filter passes.
    Returns:
        boolean ``(X, Y, Z)``.
    """
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(mean_b0(dwi, bvals, threshold), median_radius=median_radius, numpass=numpass)
    return np.asarray(mask, dtype=bool)


def remove_gibbs(dwi: np.ndarray, slice_axis: int = 2, num_processes: int = 1, method: str = "dipy") -> np.ndarray:
    """Gibbs-ringing removal (sub-voxel shifts; dipy or MRtrix3's ``mrdegibbs``) of every volume:
    ``(X, Y, Z, N)`` float64.

    Magnitude DWI is what the scanner gives; the ringing of high-SNR magnitude images is close to
    that of the underlying real image, which the method assumes.
    """
    from bssfp2dt.preprocessing.unringing import remove_gibbs_real

    return remove_gibbs_real(dwi, method=method, slice_axis=slice_axis, threads=num_processes)


def dwidenoise_available() -> bool:
    """Whether MRtrix3's ``dwidenoise`` is on the PATH."""
    return shutil.which("dwidenoise") is not None


def check_denoise_method(method: str) -> str:
    """``method`` when it can run here; :class:`UsageError` (exit 64) for an unknown method or a missing
    ``dwidenoise``."""
    if method not in DENOISE_METHODS:
        raise UsageError(f"denoising method {method!r} unknown: use one of {', '.join(DENOISE_METHODS)}")
    if method == "dwidenoise" and not dwidenoise_available():
        raise UsageError(f"--denoise-method dwidenoise: dwidenoise is not on the PATH; install MRtrix3 (Debian "
                         f"package {MRTRIX_PACKAGE}) or use --denoise-method none")
    return method


def denoise(dwi: np.ndarray, bvals: np.ndarray, method: str = "mppca", mask: np.ndarray | None = None,
            patch_radius: int = 2, threads: int = 1) -> np.ndarray:
    """Optional denoising of the DWI series; run it first, on the data as acquired (MP-PCA assumes noise
    that no interpolation or ringing removal has touched).

    ``"dwidenoise"``: MRtrix3's MP-PCA (Veraart et al. 2016; QSIPrep's default) through nipype's
    ``DWIDenoise``, 5x5x5 windows, ``threads`` threads (its result does not depend on them).
    ``"mppca"``: dipy's Marchenko-Pastur PCA (Veraart et al. 2016) on local patches; it
    estimates the noise level itself, needs no training and runs in seconds on a 2 mm brain, so it
    is the offline default. ``"patch2self"``: dipy's self-supervised regression across volumes
    (stronger on many-direction data, but slower). ``"none"``: returned unchanged.

    Args:
        dwi: ``(X, Y, Z, N)`` scanner units.
        bvals: ``(N,)`` s/mm^2 (patch2self needs them to treat b0s apart).
        method: "none", "dwidenoise", "mppca" or "patch2self".
        mask: optional boolean ``(X, Y, Z)`` for mppca (voxels outside are left out).
        patch_radius: mppca patch radius (voxels); the patch must hold more voxels than volumes.
        threads: dwidenoise's threads.
    Returns:
        ``(X, Y, Z, N)`` float64.
    """
    check_denoise_method(method)
    dwi = _check_dwi(dwi, bvals)
    if method == "none":
        return dwi
    if method == "dwidenoise":
        return _dwidenoise(dwi, threads)
    if method == "mppca":
        from dipy.denoise.localpca import mppca

        return np.asarray(mppca(dwi, mask=mask, patch_radius=patch_radius, suppress_warning=True),
                          dtype=np.float64)
    from dipy.denoise.patch2self import patch2self

    return np.asarray(patch2self(dwi, np.asarray(bvals, dtype=np.float64), model="ols",
                                 shift_intensity=True, clip_negative_vals=False), dtype=np.float64)


def _dwidenoise(dwi: np.ndarray, threads: int) -> np.ndarray:
    """Run ``dwidenoise`` on a float32 NIfTI copy of ``dwi`` in a private temporary folder."""
    import nibabel as nib
    from nipype.interfaces.mrtrix3 import DWIDenoise

    with tempfile.TemporaryDirectory(prefix="bssfp2dt_dwidenoise_") as folder:
        source, target = Path(folder) / "in.nii", Path(folder) / "out.nii"
        nib.save(nib.Nifti1Image(dwi.astype(np.float32), np.eye(4)), str(source))
        interface = DWIDenoise(in_file=str(source), out_file=str(target), noise=str(Path(folder) / "noise.nii"),
                               extent=(5, 5, 5), nthreads=max(int(threads), 1), args="-quiet -datatype float32")
        interface.run(cwd=folder)
        return np.asarray(nib.load(str(target)).dataobj, dtype=np.float64).reshape(dwi.shape)


def rotate_bvecs(bvecs: np.ndarray, transforms: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Rotate b-vectors into the reference frame after motion correction.

    Volume ``i`` was registered with ``T_i`` (reference world -> volume world), i.e. the head had
    moved by ``T_i``; a gradient ``g`` applied along world ``Q g`` (``Q``: voxel-axis directions)
    probed the reference tissue along ``R_i^T Q g``, with ``R_i`` the rotation part of ``T_i``
    (finite strain). In voxel axes again: ``g' = Q^T R_i^T Q g``.

    Args:
        bvecs: ``(N, 3)`` voxel axes.
        transforms: ``(N, 4, 4)`` per-volume registration transforms (mm).
        affine: 4x4 voxel -> world of the DWI grid.
    Returns:
        ``(N, 3)`` rotated b-vectors (zero rows stay zero).
    """
    bvecs = np.asarray(bvecs, dtype=np.float64)
    transforms = np.asarray(transforms, dtype=np.float64)
    if transforms.shape != (bvecs.shape[0], 4, 4):
        raise UsageError(f"need one 4x4 transform per b-vector, got {transforms.shape} for {bvecs.shape}")
    axes = axis_directions(affine)
    rotated = np.empty_like(bvecs)
    for i, (vector, transform) in enumerate(zip(bvecs, transforms)):
        rotated[i] = axes.T @ rotation_part(transform[:3, :3]).T @ axes @ vector
    return rotated


@dataclass(frozen=True)
class MotionCorrection:
    """Result of :func:`motion_correct`.

    Attributes:
        dwi: ``(X, Y, Z, N)`` volumes resampled onto the reference pose.
        bvecs: ``(N, 3)`` b-vectors rotated accordingly (voxel axes).
        transforms: ``(N, 4, 4)`` reference world -> volume world (mm).
    """

    dwi: np.ndarray
    bvecs: np.ndarray
    transforms: np.ndarray


def motion_correct(dwi: np.ndarray, affine: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
                   mask: np.ndarray | None = None,
                   settings: RegistrationSettings = RegistrationSettings(),
                   threshold: float = B0_THRESHOLD, order: int = 1, n_procs: int = 1) -> MotionCorrection:
    """Rigid motion correction of every volume to the mean b0, with b-vector rotation.

    Two passes fix the reference pose to the first b0 without biasing it: the other b0s are first
    registered to the first b0 and averaged with it (a sharper, less noisy reference in the first
    b0's pose); then every volume is registered to that mean. (Registering to the plain mean of
    unaligned b0s would pull each b0 towards an average pose that it is itself part of.)
    Mutual information copes with the contrast difference between the b0 reference and the
    diffusion-weighted volumes. Eddy-current distortions (affine per volume) are not modelled.

    Args:
        dwi: ``(X, Y, Z, N)`` scanner units.
        affine: 4x4 voxel -> world (mm).
        bvals: ``(N,)`` s/mm^2.
        bvecs: ``(N, 3)`` voxel axes.
        mask: optional boolean ``(X, Y, Z)`` restricting the metric on the reference.
        settings: registration settings.
        threshold: b0 threshold (s/mm^2).
        order: interpolation order of the resampling.
        n_procs: worker processes for the per-volume registrations (``--nprocs``); every volume's
            result is independent of the others and of the worker that computes it, so the output
            does not depend on ``n_procs``.
    Returns:
        :class:`MotionCorrection`.
    """
    dwi = _check_dwi(dwi, bvals)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.shape != (dwi.shape[-1], 3):
        raise UsageError(f"bvecs shape {bvecs.shape} does not match {dwi.shape[-1]} DWI volumes")
    b0s = b0_indices(bvals, threshold)
    settings = levels_for_shape(settings, dwi.shape)  # a small field of view skips the coarsest levels

    first = dwi[..., b0s[0]]
    transforms = np.empty((dwi.shape[-1], 4, 4))
    corrected = np.empty_like(dwi)
    with _workers(min(int(n_procs), dwi.shape[-1])) as pool:  # one pool for both passes: workers start once
        jobs = [(dwi[..., i], first, affine, mask, settings, order) for i in b0s[1:]]
        aligned_b0s = [first] + [result[1] for result in _map(_align_volume, jobs, pool)]
        reference = np.mean(aligned_b0s, axis=0)
        jobs = [(dwi[..., i], reference, affine, mask, settings, order) for i in range(dwi.shape[-1])]
        for i, (transform, volume) in enumerate(_map(_align_volume, jobs, pool)):
            transforms[i], corrected[..., i] = transform, volume
            logger.debug("volume %d: rotation %.3f deg", i, np.degrees(np.arccos(
                np.clip((np.trace(rotation_part(transforms[i][:3, :3])) - 1) / 2, -1, 1))))
    return MotionCorrection(dwi=corrected, bvecs=rotate_bvecs(bvecs, transforms, affine), transforms=transforms)


def _align_volume(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Rigid registration of one volume to the reference and its resampling: ``(4x4, (X, Y, Z))``."""
    volume, reference, affine, mask, settings, order = job
    transform = register(reference, affine, volume, affine, "rigid", settings=settings, static_mask=mask)
    return transform, resample(volume, affine, volume.shape, affine, transform, order=order)


@contextmanager
def _workers(n_procs: int):
    """``n_procs`` spawned worker processes (None when 1 or fewer: the jobs run here, one after the other).

    Spawned, not forked: the parent may hold OpenMP (torch) or ITK thread pools, which a fork can
    leave locked in the child.
    """
    if n_procs <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=n_procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _map(function, jobs: list, pool) -> list:
    """``[function(job) for job in jobs]``, in order, over ``pool``'s processes (here when ``pool`` is None)."""
    if pool is None or len(jobs) <= 1:
        return [function(job) for job in jobs]
    return list(pool.map(function, jobs))


def _check_dwi(dwi: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    dwi = np.asarray(dwi, dtype=np.float64)
    if dwi.ndim != 4:
        raise UsageError(f"a DWI series must be 4D (X, Y, Z, N), got shape {dwi.shape}")
    if np.asarray(bvals).shape != (dwi.shape[-1],):
        raise UsageError(f"{np.asarray(bvals).size} b-values for {dwi.shape[-1]} DWI volumes: "
                         "check the .bval file against the image")
    return dwi
