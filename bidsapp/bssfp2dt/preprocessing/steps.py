"""Per-subject/session preprocessing steps on files: what the nodes of :mod:`.workflow` call.

Every step takes input file paths and plain settings (JSON-able, so nipype can hash them) and writes its
outputs into ``out_dir`` (the node's working folder when nipype runs it), returning their absolute paths
and a provenance dict (what was done, parameters found, steps skipped). The science lives in the pure
modules (``bssfp``, ``dwi``, ``t1w``, ``registration``, ``resampling``); these steps only load, call and
save. Images are saved float32 (complex64 for the complex bSSFP intermediate) and are NOT normalised:
normalisation is fitted on training subjects and travels in the model checkpoint.

The common grid is the T1w field of view at ``voxel_mm`` (2 mm, the DWI resolution), RAS and axis
aligned (:func:`bssfp2dt.preprocessing.resampling.common_grid`); its reference image is the T1w on that
grid, whose affine and shape every later step reads. Transforms follow the package convention (static
T1w world -> moving image world, mm).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from bssfp2dt.errors import UsageError
from bssfp2dt.io.nifti import load_nifti, save_nifti, write_json, write_text
from bssfp2dt.preprocessing.registration import RegistrationSettings

logger = logging.getLogger(__name__)

#: fslpy import name and the FSL binaries TOPUP/eddy need.
#: Linear interpolation of a binary mask is cut here to get a mask on another grid.
MASK_THRESHOLD = 0.5


#: Environment variable that carries ``--omp-nthreads`` into the workflow's nodes (not part of their hash).
THREADS_ENV = "BSSFP2DT_OMP_NTHREADS"
#: Environment variable that carries ``--nprocs`` into the nodes (the DWI motion correction's workers).
NPROCS_ENV = "BSSFP2DT_NPROCS"


def _nprocs() -> int:
    """``--nprocs`` as the workflow set it for its nodes (1 when unset); not part of any node's hash."""
    return max(1, int(os.environ.get(NPROCS_ENV, "1") or 1))


@dataclass(frozen=True)
class PreprocSettings:
    """Preprocessing choices; :meth:`to_dict`/:meth:`from_dict` carry them through nipype nodes.

    Attributes:
        voxel_mm: isotropic voxel size of the common grid (mm).
        gibbs: Gibbs-ringing removal of the bSSFP (complex) and DWI.
        unringing: its back end, "mrdegibbs" or "dipy" (default: mrdegibbs when on the PATH; resolved
            here, so the choice is part of the nodes' hash).
        denoise: DWI denoising, "none", "dwidenoise" (MRtrix3), "mppca" or "patch2self" (dipy).
        motion_correction: rigid DWI motion correction with b-vector rotation.
        single_bssfp: write the single-bSSFP variant (first cycle repeated) instead of all cycles.
        registration: bSSFP/b0 -> T1w rigid registration settings (ANTs by default,
            :func:`registration_settings`).
        motion_registration: volume -> mean b0 registration settings (same contrast family; cheaper).
        omp_nthreads: threads a step may use (Gibbs removal's workers; ANTs runs one, for reproducibility).
    """

    voxel_mm: float = 2.0
    gibbs: bool = True
    unringing: str = field(default_factory=lambda: _default_unringing())
    denoise: str = "none"
    motion_correction: bool = True
    single_bssfp: bool = False
    registration: RegistrationSettings = field(default_factory=lambda: registration_settings("ants"))
    motion_registration: RegistrationSettings = field(default_factory=lambda: motion_settings("ants"))
    omp_nthreads: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def node_options(self) -> dict[str, Any]:
        """:meth:`to_dict` without the thread count: what the workflow's nodes receive and nipype hashes.
        Threads do not change any result, so ``--omp-nthreads`` must not invalidate the work dir's cache;
        the nodes read them from ``THREADS_ENV`` instead (see :meth:`from_dict`)."""
        options = self.to_dict()
        del options["omp_nthreads"]
        return options

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PreprocSettings":
        """Inverse of :meth:`to_dict`; a dict without ``omp_nthreads`` (:meth:`node_options`) takes the
        thread count from the environment variable ``THREADS_ENV`` (1 when unset)."""
        values = dict(values)
        values.setdefault("omp_nthreads", max(1, int(os.environ.get(THREADS_ENV, "1") or 1)))
        for key in ("registration", "motion_registration"):
            if key in values:
                values[key] = _registration_settings(values[key])
        return replace(cls(), **values)


def _default_unringing() -> str:
    from bssfp2dt.preprocessing.unringing import resolve_method

    return resolve_method("auto")


def registration_settings(backend: str = "ants") -> RegistrationSettings:
    """bSSFP/b0 -> T1w settings of a back end. dipy: dense MI, 32 bins, levels 4-2-1 on the native T1w. ANTs:
    Mattes MI, 32 bins, on a quarter of the voxels of the 2 mm T1w (regular grid, seeded jitter, at least
    100k points), levels 4-2-1 with 100-50-25 iterations: on the full-size simulated subject 0.05-0.1 deg
    and <= 0.5 mm in the brain against the recorded poses, at a quarter of dipy's CPU time or less."""
    if backend == "dipy":
        return RegistrationSettings(nbins=32, level_iters=(200, 100, 50), sigmas=(3.0, 1.0, 0.0), factors=(4, 2, 1))
    return RegistrationSettings(nbins=32, sampling_proportion=0.25, level_iters=(100, 50, 25),
                                sigmas=(2.0, 1.0, 0.0), factors=(4, 2, 1), backend=backend, gradient_step=0.1)


def motion_settings(backend: str = "ants") -> RegistrationSettings:
    """Volume -> mean b0 settings of a back end (small motions, same scan). dipy: two levels, 100-50 iterations.
    ANTs samples a quarter of the voxels (at least 100k points, so small test images are sampled densely) and
    estimates the motion on the coarse grids: levels at 4x, 2x and 1x the voxel (8, 4 and 2 mm for 2 mm data)
    with 100-50-10 iterations, so the full-resolution level only polishes; the volume is then resampled once,
    at full resolution. On the full-size simulated subject (7 volumes moved by up to 3 deg and 2 mm) this took
    1.8 s CPU per volume against 4.2 s for two levels 2x-1x at 100-50, with a largest residual of 0.17 deg and
    0.66 mm in the brain (0.12 deg, 0.56 mm before; the moved volumes' own interpolation sets that floor)."""
    if backend == "dipy":
        return RegistrationSettings(nbins=32, level_iters=(100, 50), sigmas=(1.0, 0.0), factors=(2, 1))
    return RegistrationSettings(nbins=32, sampling_proportion=0.25, level_iters=(100, 50, 10), sigmas=(2.0, 1.0, 0.0),
                                factors=(4, 2, 1), backend=backend, gradient_step=0.1)


def _registration_settings(values: Mapping[str, Any]) -> RegistrationSettings:
    return RegistrationSettings(**{key: tuple(value) if isinstance(value, list) else value
                                   for key, value in values.items()})


# --------------------------------------------------------------------------- helpers
def _out(out_dir: str | Path, name: str) -> Path:
    folder = Path(out_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    from bssfp2dt.io.content_checks import finite

    data, affine = load_nifti(path)  # scaled values, singleton dimensions past the third dropped
    return finite(np.asarray(data)), affine  # the few non-finite values input checks allowed become 0


def _save(data: np.ndarray, affine: np.ndarray, out_dir: str | Path, name: str, dtype: Any = np.float32) -> str:
    return str(save_nifti(data, affine, _out(out_dir, name), dtype=dtype))


def _grid(reference: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    image = nib.load(str(reference))
    return tuple(int(n) for n in image.shape[:3]), image.affine


def _mask_on_grid(mask_grid: str | Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(mask_grid)).dataobj) > 0


def read_transform(path: str | Path) -> np.ndarray:
    """The 4x4 ``transform`` (static T1w world -> moving world, mm) of a :func:`register_to_t1w` JSON."""
    return np.asarray(json.loads(Path(path).read_text())["transform"], dtype=np.float64)


class _Timer:
    def __init__(self, step: str):
        self.step, self.started = step, time.perf_counter()

    def done(self, provenance: dict[str, Any]) -> dict[str, Any]:
        seconds = round(time.perf_counter() - self.started, 3)
        logger.info("preprocessing step %s: %.1f s", self.step, seconds)
        return {"step": self.step, "seconds": seconds, **provenance}


# --------------------------------------------------------------------------- T1w
def t1w_mask(t1w: str, prior_mask: str | None = None, out_dir: str = ".") -> tuple[str, dict]:
    """Brain mask on the native T1w grid: the ``--derivatives`` mask when given, else median-Otsu.

    Returns:
        (path of the uint8 ``(X, Y, Z)`` mask, provenance).
    """
    from bssfp2dt.preprocessing import resampling, t1w as t1w_steps

    timer = _Timer("t1w_mask")
    data, affine = _load(t1w)
    if prior_mask:
        prior, prior_affine = _load(prior_mask)
        mask = resampling.resample(np.asarray(prior, dtype=np.float64), prior_affine, data.shape[:3], affine,
                                   order=0) > 0
        method = f"derivatives mask {Path(prior_mask).name}"
    else:
        voxel_mm = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
        mask = t1w_steps.brain_mask(np.asarray(data, dtype=np.float64), voxel_mm=voxel_mm)
        method = "median_otsu (dipy, on ~2 mm blocks) + largest component + hole filling"
    path = _save(mask, affine, out_dir, "t1w_mask.nii.gz", dtype=np.uint8)
    return path, timer.done({"method": method, "voxels": int(mask.sum())})


def t1w_to_grid(t1w: str, mask: str, voxel_mm: float = 2.0, out_dir: str = ".") -> tuple[str, str, dict]:
    """T1w and its mask on the common grid (T1w field of view, ``voxel_mm``, RAS).

    The T1w is resampled trilinearly and masked; the mask is resampled trilinearly and cut at 0.5.

    Returns:
        (T1w float32 path, uint8 mask path, provenance); the T1w file is the common-grid reference.
    """
    from bssfp2dt.preprocessing import resampling

    timer = _Timer("t1w_to_grid")
    data, affine = _load(t1w)
    native_mask, _ = _load(mask)
    shape, grid_affine = resampling.common_grid(affine, data.shape, voxel_mm)
    grid_mask = resampling.resample(np.asarray(native_mask, dtype=np.float64), affine, shape, grid_affine) \
        >= MASK_THRESHOLD
    image = resampling.resample(np.asarray(data, dtype=np.float64), affine, shape, grid_affine) * grid_mask
    t1w_path = _save(image, grid_affine, out_dir, "t1w_grid.nii.gz")
    mask_path = _save(grid_mask, grid_affine, out_dir, "brain_mask_grid.nii.gz", dtype=np.uint8)
    return t1w_path, mask_path, timer.done({"grid_shape": list(shape), "grid_affine": grid_affine.tolist(),
                                            "voxel_mm": voxel_mm, "mask_voxels": int(grid_mask.sum())})


def tissue_maps(t1w_grid: str, mask_grid: str, gm: str | None = None, wm: str | None = None,
                csf: str | None = None, out_dir: str = ".") -> tuple[str, str, str, dict]:
    """GM, WM and CSF probabilities (0..1) on the common grid.

    From the ``--derivatives`` probseg maps (resampled trilinearly, identity transform: they are in the
    T1w's space) when all three are given, else dipy's HMRF on the common-grid T1w.

    Returns:
        (GM path, WM path, CSF path, provenance); each ``(X, Y, Z)`` float32, 0 outside the mask.
    """
    from bssfp2dt.preprocessing import resampling, t1w as t1w_steps

    timer = _Timer("tissue_maps")
    shape, grid_affine = _grid(t1w_grid)
    mask = _mask_on_grid(mask_grid)
    priors = {"GM": gm, "WM": wm, "CSF": csf}
    if all(priors.values()):
        maps = {}
        for label, path in priors.items():
            data, affine = _load(path)
            maps[label] = np.clip(resampling.resample(np.asarray(data, dtype=np.float64), affine, shape,
                                                      grid_affine), 0.0, 1.0) * mask
        method = "derivatives probseg " + ", ".join(Path(p).name for p in priors.values())
    else:
        if any(priors.values()):
            logger.warning("only some tissue maps given in --derivatives; estimating all three with HMRF")
        t1w, _ = _load(t1w_grid)
        probabilities = t1w_steps.tissue_probability_maps(np.asarray(t1w, dtype=np.float64), mask)
        maps = {label: probabilities[..., t1w_steps.TISSUES.index(label)] for label in priors}
        method = "HMRF (dipy TissueClassifierHMRF, beta 0.1)"
    paths = [_save(maps[label], grid_affine, out_dir, f"{label.lower()}_probseg.nii.gz") for label in priors]
    return paths[0], paths[1], paths[2], timer.done({"method": method})


# --------------------------------------------------------------------------- bSSFP
def prepare_bssfp(magnitude: str, phase: str, phase_units: str, settings: Mapping[str, Any],
                  out_dir: str = ".", cycle_order: Sequence[int] | None = None) -> tuple[str, str, dict]:
    """Cycles sorted by phase increment -> phase rescale -> complex -> per-cycle global phase removal ->
    Gibbs (complex), native grid.

    ``cycle_order``: the stored volumes in ascending phase-increment order
    (:func:`bssfp2dt.preprocessing.bssfp.cycle_order` of the sidecar's ``PhaseIncrements``); None: as stored.

    Returns:
        (complex64 ``(X, Y, Z, C)`` path, mean-magnitude ``(X, Y, Z)`` path (the registration image),
        provenance with the removed global phases in radians).
    """
    from bssfp2dt.preprocessing import bssfp

    timer = _Timer("prepare_bssfp")
    options = PreprocSettings.from_dict(settings)
    magnitude_data, affine = _load(magnitude)
    magnitude_data = np.maximum(magnitude_data, 0)  # the few negative values input checks allowed become 0
    phase_data, _ = _load(phase)
    reordered = cycle_order is not None and list(cycle_order) != list(range(magnitude_data.shape[-1]))
    if reordered:  # the network's channels follow the increments, not the storage order
        magnitude_data, phase_data = magnitude_data[..., list(cycle_order)], phase_data[..., list(cycle_order)]
    signal = bssfp.to_complex(magnitude_data, bssfp.rescale_phase(phase_data, phase_units))
    phases = bssfp.global_phases(signal)
    signal = signal * np.exp(-1j * phases)
    if options.gibbs:
        signal = bssfp.remove_gibbs(signal, mode="complex", num_processes=options.omp_nthreads or 1,
                                    method=options.unringing)
    complex_path = _save(signal, affine, out_dir, "bssfp_complex.nii.gz", dtype=np.complex64)
    reference_path = _save(np.abs(signal).mean(axis=-1), affine, out_dir, "bssfp_mean_magnitude.nii.gz")
    record = {"phase_units": phase_units, "global_phases_rad": phases.tolist(),
              "gibbs": _gibbs_record(options, "complex: real and imaginary parts")}
    if reordered:  # recorded only when it happened, so the records of ordered series stay as they were
        record["cycle_order"] = [int(index) for index in cycle_order]
    return complex_path, reference_path, timer.done(record)


def _gibbs_record(options: PreprocSettings, what: str) -> str:
    from bssfp2dt.preprocessing.unringing import DESCRIPTIONS

    return f"{what}, {DESCRIPTIONS[options.unringing]}" if options.gibbs else "skipped: disabled"


def register_to_t1w(t1w: str, moving: str, settings: Mapping[str, Any], what: str,
                    out_dir: str = ".") -> tuple[str, dict]:
    """Rigid mutual-information registration of ``moving`` (bSSFP mean magnitude, DWI mean b0) to the T1w.

    Starts from the identity: every session is in the same scanner coordinates and heads move by a few
    mm and degrees, whereas a centre-of-mass start is pulled off by noisy backgrounds and receive-field
    shading. The metric uses the whole field of view: restricting dipy's dense MI to a head mask made
    it diverge on simulated data (tens of degrees), the full field of view converged (0.3 deg).

    Returns:
        (JSON path holding ``transform``: 4x4 T1w world -> moving world (mm), with its angles and
        translation, provenance).
    """
    from bssfp2dt.preprocessing import registration

    timer = _Timer(f"register_{what}_to_t1w")
    options = PreprocSettings.from_dict(settings)
    static, static_affine = _load(t1w)
    if options.registration.backend == "ants":
        static, static_affine = registration_image(static, static_affine, options.voxel_mm)
    moving_data, moving_affine = _load(moving)
    transform = registration.register(np.asarray(static, dtype=np.float64), static_affine,
                                      np.asarray(moving_data, dtype=np.float64), moving_affine, "rigid",
                                      settings=options.registration, initial=np.eye(4))
    angles, translation = registration.rigid_parameters(transform)
    record = {"what": what, "direction": "T1w world -> moving world (mm)", "transform": transform.tolist(),
              "rotation_deg": angles.tolist(), "translation_mm": translation.tolist(),
              "metric": "mutual information", "backend": _backend_name(options.registration.backend),
              "settings": asdict(options.registration)}
    path = write_json(record, _out(out_dir, f"{what}_to_t1w.json"))
    return str(path), timer.done({key: record[key] for key in ("backend", "rotation_deg", "translation_mm",
                                                                "transform")})


def registration_image(image: np.ndarray, affine: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The T1w as the registration's fixed image: Gaussian-smoothed to ``voxel_mm`` resolution (FWHM) and
    resampled onto the ``voxel_mm`` common grid (RAS, whole field of view, not masked).

    The outputs live on that 2 mm grid, so a finer fixed image costs time (the metric's cost scales with
    its voxels: 8x for 1 mm) without a better fit where it is used.
    """
    from scipy.ndimage import gaussian_filter

    from bssfp2dt.preprocessing import resampling

    image = np.asarray(image, dtype=np.float64)
    native = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    sigma_mm = np.sqrt(np.clip(voxel_mm ** 2 - native ** 2, 0.0, None)) / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    smoothed = gaussian_filter(image, sigma=sigma_mm / native) if np.any(sigma_mm > 0) else image
    shape, grid_affine = resampling.common_grid(affine, image.shape, voxel_mm)
    return resampling.resample(smoothed, affine, shape, grid_affine), grid_affine


def _backend_name(backend: str) -> str:
    return {"ants": "ANTs antsRegistration (antspyx), Mattes MI", "dipy": "dipy AffineRegistration, MI"}[backend]


def bssfp_to_grid(complex_path: str, transform_json: str, t1w_grid: str, mask_grid: str,
                  settings: Mapping[str, Any], out_dir: str = ".") -> tuple[str, dict]:
    """Resample the complex bSSFP (real and imaginary parts) onto the common grid, mask, interleave.

    Returns:
        (float32 ``(X, Y, Z, 2C)`` path, magnitude (scanner units) and phase (rad) interleaved
        m0, p0, m1, p1, ... and zero outside the brain mask; provenance). With ``single_bssfp`` every
        cycle is the first one (the single-bSSFP variant keeps the 24-channel contract).
    """
    from bssfp2dt.preprocessing import bssfp, resampling

    timer = _Timer("bssfp_to_grid")
    options = PreprocSettings.from_dict(settings)
    signal, affine = _load(complex_path)
    shape, grid_affine = _grid(t1w_grid)
    mask = _mask_on_grid(mask_grid)
    on_grid = resampling.resample(np.asarray(signal), affine, shape, grid_affine, read_transform(transform_json))
    if options.single_bssfp:
        on_grid = bssfp.single_bssfp(on_grid, on_grid.shape[-1])
    channels = bssfp.interleave_channels(np.abs(on_grid), np.angle(on_grid)) * mask[..., None]
    path = _save(channels, grid_affine, out_dir, "bssfp_channels.nii.gz")
    return path, timer.done({"variant": "single bSSFP (first cycle)" if options.single_bssfp else "phase-cycled",
                             "channels": "magnitude/phase interleaved", "interpolation": "trilinear, complex"})


# --------------------------------------------------------------------------- DWI
def preprocess_dwi(dwi: str, bval: str, bvec: str, settings: Mapping[str, Any],
                   out_dir: str = ".", reverse_pe_b0: str | None = None) -> tuple[str, str, str, str, dict]:
    """(denoise) -> (topup + eddy) -> Gibbs -> motion correction with b-vector rotation -> mask, native grid.

    Denoising (``dwidenoise``, MP-PCA) comes first, as in QSIPrep: it assumes noise that no interpolation or
    ringing removal has touched.

    topup/eddy (:mod:`bssfp2dt.preprocessing.fsl`, through fslpy) run when ``FSLDIR`` holds them and a
    reverse-PE b0 exists; eddy then also corrects head motion. Otherwise the step records
    ``"skipped: <why>"`` (e.g. ``"skipped: FSL not found (FSLDIR is not set)"``).

    Returns:
        (corrected DWI float32 ``(X, Y, Z, N)`` path, rotated ``.bvec`` path (3 rows, voxel axes),
        uint8 mask path, mean-b0 path, provenance).
    """
    from bssfp2dt.preprocessing import dwi as dwi_steps
    from bssfp2dt.preprocessing.registration import rotation_angle_deg

    timer = _Timer("preprocess_dwi")
    options = PreprocSettings.from_dict(settings)
    data, affine = _load(dwi)
    data = np.asarray(data, dtype=np.float64)
    bvals, bvecs = dwi_steps.read_bvals_bvecs(bval, bvec)
    provenance: dict[str, Any] = {}
    eddy_done = False
    from bssfp2dt.preprocessing import fsl

    if options.denoise != "none":
        mask = dwi_steps.brain_mask(data, bvals) if options.denoise == "mppca" else None
        data = dwi_steps.denoise(data, bvals, options.denoise, mask=mask, threads=options.omp_nthreads)
    provenance["denoise"] = dwi_steps.DENOISE_DESCRIPTIONS.get(options.denoise, "skipped: not requested")
    reason = fsl.fsl_status(reverse_pe_b0)
    if reason is None:
        if options.denoise != "none":  # eddy reads a file: hand it the denoised series
            dwi = _save(data, affine, out_dir, "dwi_denoised.nii.gz")
        corrected = fsl.topup_eddy(dwi, bval, bvec, reverse_pe_b0, out_dir)
        data = np.asarray(_load(str(corrected.dwi))[0], dtype=np.float64)
        bvals, bvecs = dwi_steps.read_bvals_bvecs(bval, corrected.bvec)
        provenance["topup_eddy"], eddy_done = corrected.record, True
    else:
        provenance["topup_eddy"] = f"skipped: {reason}"
    if options.gibbs:
        data = dwi_steps.remove_gibbs(data, num_processes=options.omp_nthreads, method=options.unringing)
    provenance["gibbs"] = _gibbs_record(options, "every volume")
    mask = dwi_steps.brain_mask(data, bvals)
    if options.motion_correction and eddy_done:
        provenance["motion_correction"] = "done by eddy"
    elif options.motion_correction:
        corrected = dwi_steps.motion_correct(data, affine, bvals, bvecs, mask=mask,
                                             settings=options.motion_registration, n_procs=_nprocs())
        data, bvecs = corrected.dwi, corrected.bvecs
        rotations = [rotation_angle_deg(transform) for transform in corrected.transforms]
        provenance["motion_correction"] = {"backend": _backend_name(options.motion_registration.backend),
                                           "max_rotation_deg": max(rotations),
                                           "max_translation_mm": float(np.abs(corrected.transforms[:, :3, 3]).max())}
        mask = dwi_steps.brain_mask(data, bvals)
    else:
        provenance["motion_correction"] = "skipped: disabled"
    dwi_path = _save(data, affine, out_dir, "dwi_preproc.nii.gz")
    bvec_path = write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in bvecs.T) + "\n",
                           _out(out_dir, "dwi_preproc.bvec"))
    mask_path = _save(mask, affine, out_dir, "dwi_mask.nii.gz", dtype=np.uint8)
    b0_path = _save(dwi_steps.mean_b0(data, bvals), affine, out_dir, "dwi_mean_b0.nii.gz")
    return dwi_path, str(bvec_path), mask_path, b0_path, timer.done(provenance)


def fit_dwi_tensor(dwi: str, bval: str, bvec: str, mask: str, out_dir: str = ".") -> tuple[str, dict]:
    """WLS tensor fit (:func:`bssfp2dt.dti.fit.fit_tensor`) in the DWI's voxel axes.

    Returns:
        (float32 ``(X, Y, Z, 6)`` BEP016 tensor path, mm^2/s, components along the voxel axes, provenance).
    """
    from bssfp2dt.dti.fit import fit_tensor
    from bssfp2dt.preprocessing import dwi as dwi_steps

    timer = _Timer("fit_dwi_tensor")
    data, affine = _load(dwi)
    bvals, bvecs = dwi_steps.read_bvals_bvecs(bval, bvec)
    mask_data, _ = _load(mask)
    tensor, _ = fit_tensor(np.asarray(data, dtype=np.float64), bvals, bvecs, mask=np.asarray(mask_data) > 0)
    path = _save(tensor, affine, out_dir, "tensor_voxel_axes.nii.gz")
    return path, timer.done({"method": "WLS (bssfp2dt.dti.fit)", "reference": "DWI voxel axes"})


def tensor_to_grid(tensor: str, transform_json: str, t1w_grid: str, mask_grid: str,
                   out_dir: str = ".") -> tuple[str, dict]:
    """Tensor resampled onto the common grid and reoriented into its (RAS = xyz) axes, masked.

    Returns:
        (float32 ``(X, Y, Z, 6)`` BEP016 path, mm^2/s, xyz frame, provenance).
    """
    from bssfp2dt.preprocessing import resampling

    timer = _Timer("tensor_to_grid")
    data, affine = _load(tensor)
    shape, grid_affine = _grid(t1w_grid)
    mask = _mask_on_grid(mask_grid)
    on_grid = resampling.resample_tensor(np.asarray(data, dtype=np.float64), affine, shape, grid_affine,
                                         read_transform(transform_json)) * mask[..., None]
    path = _save(on_grid, grid_affine, out_dir, "tensor_grid.nii.gz")
    return path, timer.done({"interpolation": "trilinear components", "reorientation": "finite strain",
                             "reference": "xyz"})


# --------------------------------------------------------------------------- summary
def collect_session(subject: str, session: str | None, outputs: Mapping[str, str | None],
                    provenance: list, inputs: list, out_dir: str = ".") -> str:
    """Write the session summary JSON: raw input paths (the T1w first), output paths (``None`` for absent
    modalities) and every step's record.

    Returns:
        the JSON path.
    """
    record = {"subject": subject, "session": session, "normalised": False, "inputs": [str(path) for path in inputs],
              "outputs": {key: value for key, value in outputs.items()},
              "units": {"bssfp": "interleaved magnitude (scanner units) / phase (rad)", "t1w": "scanner units",
                        "tensor": "mm^2/s, BEP016 D11 D12 D13 D22 D23 D33, xyz", "tissue": "probability 0..1"},
              "steps": [step for step in provenance if step]}
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_preproc.json"
    return str(write_json(record, _out(out_dir, name)))


def check_settings(settings: PreprocSettings) -> None:
    """Raise :class:`UsageError` for values the steps cannot use."""
    from bssfp2dt.preprocessing.dwi import DENOISE_METHODS

    if settings.voxel_mm <= 0:
        raise UsageError(f"preprocessing voxel size must be positive, got {settings.voxel_mm} mm")
    if settings.unringing not in ("mrdegibbs", "dipy"):
        raise UsageError(f"Gibbs removal back end {settings.unringing!r} unknown: use mrdegibbs or dipy")
    if settings.denoise not in DENOISE_METHODS:
        raise UsageError(f"DWI denoising {settings.denoise!r} unknown: use one of {', '.join(DENOISE_METHODS)}")
