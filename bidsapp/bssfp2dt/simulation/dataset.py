"""Write simulated subjects as a raw BIDS dataset, with the ground truth in ``derivatives/bssfp2dt-truth``.

Layout (bids-conventions.md section 2): per subject, session k holds the pc-bSSFP (magnitude and phase,
4D with 12 phase cycles) if k <= bssfp_sessions, the DWI (+ .bval/.bvec, optional reverse-PE b0 in
fmap/) if k <= dwi_sessions; the T1w (MP2RAGE UNI) is in session 1. The dataset is built in a
temporary sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bssfp2dt import __version__
from bssfp2dt.dti.fit import fit_tensor
from bssfp2dt.dti.maps import tensor_maps
from bssfp2dt.io.derivatives import sidecar_path
from bssfp2dt.io.naming import bids_path
from bssfp2dt.io.nifti import save_nifti, write_json, write_text
from bssfp2dt.simulation.anatomy import MNI_LICENCE, Anatomy, make_anatomy
from bssfp2dt.simulation.geometry import ImageGrid, axis_aligned_grid
from bssfp2dt.simulation.imaging import (ScanTissue, dwi_noiseless, dwi_with_noise, image_bssfp, image_t1w,
                                         sample_tissue, scatter_to_grid, tensor_in_voxel_axes)
from bssfp2dt.simulation.subject import REGIMES, Protocol, ScanPlan, SubjectParameters, sample_subject

LOGGER = logging.getLogger(__name__)
BIDS_VERSION = "1.10.0"
TRUTH_FOLDER = Path("derivatives") / "bssfp2dt-truth"
# Between general white matter's coherence (0.2) and the least coherent tract's (0.5): the tract mask.
TRACT_COHERENCE = 0.35


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. ``phantom_scale`` sizes the procedural anatomy; ``voxel_scale`` multiplies
    every voxel size (coarse grids for quick tests); ``margin_mm`` pads the field of view."""

    n_subjects: int = 1
    bssfp_sessions: int = 3
    dwi_sessions: int = 4
    seed: int = 0
    regime: str = "realistic"
    anatomy: str = "mni"
    phantom_scale: float = 1.0
    voxel_scale: float = 1.0
    margin_mm: float = 10.0
    phase_units: str = "rad"
    phase_cycle_sign: int = 1
    random_fibres: bool = False
    reverse_pe: bool = True
    dwi_directions: tuple[int, int] = (30, 64)

    def protocol(self) -> Protocol:
        base = Protocol(phase_units=self.phase_units, phase_cycle_sign=self.phase_cycle_sign,
                        dwi_directions=self.dwi_directions)
        return base.with_voxel_scale(self.voxel_scale)


def simulate_dataset(output_dir: Path | str, config: SimulationConfig, overwrite: bool = False,
                     progress: bool = True, timings: dict | None = None) -> Path:
    """Simulate ``config.n_subjects`` subjects into ``output_dir`` (created; must be empty unless
    ``overwrite``). Returns the dataset path. Same config and seed -> byte-identical files.
    ``timings``, when given, receives seconds per subject and scan (``{"01": {"t1w-ses1": ...}}``)."""
    output_dir = Path(output_dir).resolve()
    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_dataset(staging, config, progress, {} if timings is None else timings)
        if output_dir.exists():
            if not overwrite:
                raise FileExistsError(output_dir)
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _write_dataset(root: Path, config: SimulationConfig, progress: bool, timings: dict) -> None:
    protocol = config.protocol()
    regime = REGIMES[config.regime]
    seed_sequence = np.random.SeedSequence(config.seed)
    fibre_rng = np.random.default_rng(seed_sequence.spawn(1)[0]) if config.random_fibres else None
    anatomy = make_anatomy(config.anatomy, scale=config.phantom_scale, randomise_fibres=fibre_rng)
    subject_seeds = seed_sequence.spawn(config.n_subjects)
    _write_dataset_files(root, config, anatomy)
    rows = []
    scans_per_subject = 1 + max(config.bssfp_sessions, 0) + max(config.dwi_sessions, 0)
    bar = tqdm(total=config.n_subjects * scans_per_subject, desc="simulating", unit="scan", disable=not progress)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nifti-writer")
    for number, subject_seed in enumerate(subject_seeds, start=1):
        label = f"{number:02d}"
        rng = np.random.default_rng(subject_seed)
        centre = (anatomy.extent[0] + anatomy.extent[1]) / 2.0
        subject = sample_subject(rng, label, regime, protocol, config.bssfp_sessions, config.dwi_sessions,
                                 centre, reverse_pe=config.reverse_pe)
        subject_writer = SubjectWriter(root, subject, anatomy, protocol, config, rng, bar, writer)
        subject_writer.write()
        timings[label] = subject_writer.timings
        rows.append(f"sub-{label}\t{subject.regime}\t{subject.orientation_gain:.3f}\t"
                    f"{subject.base_pose.rotation_deg[0]:.2f}")
    bar.close()
    writer.shutdown()
    write_text("participant_id\tregime\torientation_gain\thead_pitch_deg\n" + "\n".join(rows) + "\n",
               root / "participants.tsv")


class SubjectWriter:
    """Images one subject scan by scan and writes the raw files and the truth."""

    def __init__(self, root: Path, subject: SubjectParameters, anatomy: Anatomy, protocol: Protocol,
                 config: SimulationConfig, rng: np.random.Generator, bar: tqdm, writer: ThreadPoolExecutor):
        self.root, self.truth_root = root, root / TRUTH_FOLDER
        self._writer, self._pending = writer, []
        self.subject, self.anatomy, self.protocol, self.config = subject, anatomy, protocol, config
        self.rng, self.bar = rng, bar
        self.fov = self._field_of_view()
        self.timings: dict[str, float] = {}

    def _save(self, *args, **kwargs) -> None:
        """Compress and write an image on the writer thread (zlib releases the GIL), so imaging
        the next scan overlaps with compressing this one."""
        self._pending.append(self._writer.submit(save_nifti, *args, **kwargs))

    def write(self) -> None:
        """Image and write every scan and the truth; returns when all files are on disk."""
        try:
            self._write_all()
        finally:
            for future in self._pending:
                future.result()

    def _write_all(self) -> None:
        for scan in self.subject.scans:
            started = time.perf_counter()
            getattr(self, f"_write_{scan.modality}")(scan)
            self.timings[f"{scan.modality}-ses{scan.session}"] = round(time.perf_counter() - started, 3)
            self.bar.update(1)
        started = time.perf_counter()
        self._write_t1w_space_truth()
        self.timings["truth-T1w-space"] = round(time.perf_counter() - started, 3)
        LOGGER.debug("sub-%s timings (s): %s", self.subject.label, self.timings)
        write_json({"bssfp2dt_version": __version__, "seed": self.config.seed,
                    "anatomy": self.anatomy.description(), "protocol": _protocol_dict(self.protocol),
                    "subject": self.subject.to_dict(), "field_of_view_mm": [v.tolist() for v in self.fov]},
                   self.truth_root / f"sub-{self.subject.label}" / f"sub-{self.subject.label}_simulation.json")

    # -- geometry ---------------------------------------------------------------------------------
    def _field_of_view(self) -> tuple[np.ndarray, np.ndarray]:
        """Scanner-frame box (lo, hi) mm holding the brain at the base pose, plus a margin."""
        warp = self.subject.warp
        brain = self.anatomy.brain_points()
        head = np.linalg.solve(warp.linear, (brain - warp.offset).T).T
        scanner = head @ self.subject.base_pose.rotation.T + np.asarray(self.subject.base_pose.translation_mm)
        # the smooth displacement (<= 5 mm) and the per-scan jitter (<= 3 deg, 3 mm) stay inside the margin
        margin = self.config.margin_mm
        return scanner.min(axis=0) - margin, scanner.max(axis=0) + margin

    def _grid(self, voxel_mm: float, raw: bool = True) -> ImageGrid:
        # raw scans are stored LAS like DICOM converters write them; truth maps RAS (voxel axes = xyz)
        return axis_aligned_grid(*self.fov, voxel_mm, flip_x=raw)

    def _path(self, root: Path, datatype: str | None, suffix: str, extension: str = ".nii.gz", **entities) -> Path:
        return bids_path(root, datatype, suffix, extension, subject=self.subject.label, **entities)

    # -- scans ------------------------------------------------------------------------------------
    def _write_pcbssfp(self, scan: ScanPlan) -> None:
        p = self.protocol
        grid = self._grid(p.bssfp_voxel_mm)
        tissue = sample_tissue(self.anatomy, self.subject, scan.pose, grid, with_fibres=True)
        noisy, _, b0_map = image_bssfp(self.subject, scan, tissue, grid, p, self.rng)
        sidecar = {"RepetitionTime": p.bssfp_tr, "EchoTime": p.bssfp_te, "FlipAngle": p.bssfp_flip_deg,
                   "MagneticFieldStrength": p.field_strength_t, "MRAcquisitionType": "3D",
                   "PulseSequenceType": "balanced steady-state free precession (phase-cycled)",
                   "PhaseIncrements": p.phase_increments_deg.tolist(), "Manufacturer": "bssfp2dt-simulate"}
        entities = dict(session=scan.session, acquisition="pcbssfp")
        magnitude = self._path(self.root, "anat", "T2w", part="mag", **entities)
        self._save(np.abs(noisy), grid.affine, magnitude, dtype=np.uint16)
        write_json(sidecar, sidecar_path(magnitude))
        phase_path = self._path(self.root, "anat", "T2w", part="phase", **entities)
        phase = np.angle(noisy)
        if p.phase_units == "arbitrary":
            self._save(np.floor((phase + np.pi) / (2 * np.pi) * 4096) % 4096, grid.affine, phase_path, dtype=np.uint16)
        else:
            self._save(phase, grid.affine, phase_path, dtype=np.float32)
        write_json(sidecar | {"Units": p.phase_units}, sidecar_path(phase_path))
        b0_path = self._path(self.truth_root, "fmap", "fieldmap", acquisition="pcbssfp", description="truth",
                             session=scan.session)
        self._save(b0_map, grid.affine, b0_path, dtype=np.float32)
        write_json({"Units": "Hz", "Description": "off-resonance used to simulate the pc-bSSFP of this session",
                    "Sources": [_bids_uri(magnitude, self.root)]}, sidecar_path(b0_path))

    def _write_dwi(self, scan: ScanPlan) -> None:
        p = self.protocol
        grid = self._grid(p.dwi_voxel_mm)
        tissue = sample_tissue(self.anatomy, self.subject, scan.pose, grid, with_fibres=True)
        noiseless = dwi_noiseless(self.subject, scan, tissue, p)
        image = dwi_with_noise(noiseless, self.subject, scan, tissue, grid, p, self.rng)
        dwi_path = self._path(self.root, "dwi", "dwi", session=scan.session)
        self._save(image, grid.affine, dwi_path, dtype=np.uint16)
        bvecs_voxel = np.asarray(scan.bvecs_scanner) @ grid.axes_in_world  # BIDS: bvecs in voxel axes
        write_text(" ".join(f"{b:g}" for b in scan.bvals) + "\n",
                   dwi_path.with_name(dwi_path.name.replace(".nii.gz", ".bval")))
        write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs_voxel.T) + "\n",
                   dwi_path.with_name(dwi_path.name.replace(".nii.gz", ".bvec")))
        readout = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": p.dwi_total_readout_time,
                   "EchoTime": p.dwi_te, "RepetitionTime": p.dwi_tr, "MagneticFieldStrength": p.field_strength_t,
                   "Manufacturer": "bssfp2dt-simulate"}
        write_json(readout, sidecar_path(dwi_path))
        if scan.reverse_pe_b0:
            epi_path = self._path(self.root, "fmap", "epi", session=scan.session, direction="PA")
            # same anatomy and fresh noise: EPI distortion is not simulated
            b0 = int(np.argmin(scan.bvals))
            reverse_b0 = dwi_with_noise(noiseless[:, b0:b0 + 1], self.subject, scan, tissue, grid, p, self.rng)
            self._save(reverse_b0, grid.affine, epi_path, dtype=np.uint16)
            write_json(readout | {"PhaseEncodingDirection": "j", "IntendedFor": [_bids_uri(dwi_path, self.root)]},
                       sidecar_path(epi_path))
        self._write_dwi_truth(scan, tissue, grid, noiseless)

    def _write_dwi_truth(self, scan: ScanPlan, tissue: ScanTissue, grid: ImageGrid, noiseless: np.ndarray) -> None:
        """Per-session truth on the DWI grid, tensors in its voxel axes (as a fit of the raw DWI gives)."""
        exact = tensor_in_voxel_axes(tissue.tensor, grid)
        bvecs_voxel = np.asarray(scan.bvecs_scanner) @ grid.axes_in_world
        fitted, _ = fit_tensor(noiseless, np.asarray(scan.bvals), bvecs_voxel)
        source = self._path(self.root, "dwi", "dwi", session=scan.session)
        for description, tensor in (("truth", exact), ("noiselessfit", fitted)):
            self._write_tensor_maps(tensor, tissue, grid, description, source, session=scan.session)

    def _write_t1w(self, scan: ScanPlan) -> None:
        grid = self._grid(self.protocol.t1w_voxel_mm)
        tissue = sample_tissue(self.anatomy, self.subject, scan.pose, grid, with_fibres=False)
        path = self._path(self.root, "anat", "T1w", session=scan.session)
        self._save(image_t1w(self.subject, scan, tissue, grid, self.rng), grid.affine, path, dtype=np.uint16)
        write_json({"MagneticFieldStrength": self.protocol.field_strength_t, "RepetitionTime": 5.0,
                    "PulseSequenceType": "MP2RAGE (UNI image)", "Manufacturer": "bssfp2dt-simulate"},
                   sidecar_path(path))

    # -- truth in T1w space -------------------------------------------------------------------------
    def _write_t1w_space_truth(self) -> None:
        """Truth on the common grid: RAS, T1w head position, ``truth_voxel_mm`` (2 mm), scanner xyz axes."""
        t1w_scan = next(scan for scan in self.subject.scans if scan.modality == "t1w")
        grid = self._grid(self.protocol.truth_voxel_mm, raw=False)
        tissue = sample_tissue(self.anatomy, self.subject, t1w_scan.pose, grid, with_fibres=True)
        entities = dict(space="T1w")
        source = self._path(self.root, "anat", "T1w", session=t1w_scan.session)
        for c, label in enumerate(("GM", "WM", "CSF")):
            path = self._path(self.truth_root, "anat", "probseg", label=label, **entities)
            self._save(scatter_to_grid(tissue.fractions[:, c], tissue, grid), grid.affine, path, dtype=np.float32)
            write_json({"Sources": [_bids_uri(source, self.root)]}, sidecar_path(path))
        mask_path = self._path(self.truth_root, "anat", "mask", description="brain", **entities)
        self._save(scatter_to_grid(tissue.fractions.sum(axis=1) >= 0.5, tissue, grid), grid.affine, mask_path,
                   dtype=np.uint8)
        write_json({"Type": "Brain", "Sources": [_bids_uri(source, self.root)]}, sidecar_path(mask_path))
        tracts_path = self._path(self.truth_root, "anat", "mask", description="tracts", **entities)
        self._save(scatter_to_grid(tissue.coherence > TRACT_COHERENCE, tissue, grid), grid.affine, tracts_path,
                   dtype=np.uint8)
        write_json({"Type": "ROI", "Description": "the major tracts' boxes (coherent fibres, one direction per tract; "
                    f"simulation.fibres), where the smoothed tract coherence exceeds {TRACT_COHERENCE}",
                    "Sources": [_bids_uri(source, self.root)]}, sidecar_path(tracts_path))
        self._write_tensor_maps(tissue.tensor, tissue, grid, "truth", source, **entities)
        dwi_scan = next((scan for scan in self.subject.scans if scan.modality == "dwi"), None)
        if dwi_scan is not None:
            noiseless = dwi_noiseless(self.subject, dwi_scan, tissue, self.protocol)
            fitted, _ = fit_tensor(noiseless, np.asarray(dwi_scan.bvals),
                                       np.asarray(dwi_scan.bvecs_scanner) @ grid.axes_in_world)
            self._write_tensor_maps(fitted, tissue, grid, "noiselessfit", source, **entities)
        self.bar.update(0)

    def _write_tensor_maps(self, tensor: np.ndarray, tissue: ScanTissue, grid: ImageGrid, description: str,
                           source: Path, **entities) -> None:
        """Tensor (BEP016 order, mm^2/s), FA and MD maps of one tensor field."""
        maps = tensor_maps(tensor, dtype=np.float32)
        fa, md = maps["fa"], maps["md"]
        common = dict(description=description, model="tensor", **entities)
        sources = [_bids_uri(source, self.root)]
        tensor_path = self._path(self.truth_root, "dwi", "dwimap", param="diffusivity", **common)
        self._save(scatter_to_grid(tensor, tissue, grid), grid.affine, tensor_path, dtype=np.float32)
        frame = "xyz" if entities.get("space") == "T1w" else "ijk"
        write_json({"Units": "mm^2/s", "Sources": sources, "SkullStripped": True,
                    "Description": _TENSOR_DESCRIPTIONS[description],
                    "OrientationEncoding": {"Type": "tensor", "TensorRank": 2, "EncodingAxis": 3, "Reference": frame},
                    "ComponentOrder": ["D11", "D12", "D13", "D22", "D23", "D33"]}, sidecar_path(tensor_path))
        for name, values, units in (("fa", fa, "arbitrary"), ("md", md, "mm^2/s")):
            path = self._path(self.truth_root, "dwi", "dwimap", param=name, **common)
            self._save(scatter_to_grid(values, tissue, grid), grid.affine, path, dtype=np.float32)
            write_json({"Units": units, "Sources": sources, "SkullStripped": True}, sidecar_path(path))


_TENSOR_DESCRIPTIONS = {
    "truth": "exact input tensor field: fraction-weighted mean of the tissue tensors",
    "noiselessfit": "tensor fitted (weighted least squares) to the noiseless partial-volume DWI, "
                    "what a perfect DTI fit would see",
}


def _bids_uri(path: Path, root: Path) -> str:
    return "bids::" + path.relative_to(root).as_posix()


def _protocol_dict(protocol: Protocol) -> dict:
    from dataclasses import asdict
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(protocol).items()}


def _write_dataset_files(root: Path, config: SimulationConfig, anatomy: Anatomy) -> None:
    generated_by = [{"Name": "bssfp2dt-simulate", "Version": __version__,
                     "Description": f"seed {config.seed}, regime {config.regime}, anatomy {config.anatomy}"}]
    write_json({"Name": "bssfp2dt simulated pc-bSSFP / DWI / T1w dataset", "BIDSVersion": BIDS_VERSION,
                "DatasetType": "raw", "License": "CC0-1.0", "Authors": ["bssfp2dt-simulate"],
                "GeneratedBy": generated_by}, root / "dataset_description.json")
    write_json({"participant_id": {"Description": "simulated subject"},
                "regime": {"Description": "simulation regime (realistic or easy)"},
                "orientation_gain": {"Description": "scale of the fibre-orientation frequency shifts (1 = physical)"},
                "head_pitch_deg": {"Description": "head tilt about the left-right axis relative to B0",
                                   "Units": "deg"}},
               root / "participants.json")
    readme = _README.format(version=__version__, config=config)
    if anatomy.name == "mni":
        readme += "\n## Template licence\n\n" + MNI_LICENCE + "\n"
    write_text(readme, root / "README")
    truth = root / TRUTH_FOLDER
    write_json({"Name": "bssfp2dt simulation ground truth", "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "bssfp2dt", "Version": __version__,
                                 "Description": "bssfp2dt-simulate ground truth"}],
                "SourceDatasets": [{"URL": "bids::"}]}, truth / "dataset_description.json")
    write_text("*_dwimap.*\n*_simulation.json\n", truth / ".bidsignore")


_README = """# Simulated pc-bSSFP / DWI / T1w dataset

Written by bssfp2dt-simulate {version} ({config.n_subjects} subjects, {config.bssfp_sessions} pc-bSSFP and
{config.dwi_sessions} DWI sessions each, seed {config.seed}, regime {config.regime}, anatomy {config.anatomy}).

Every image is simulated from a known tensor field: phase-cycled bSSFP (12 cycles, complex, three-pool
white matter whose frequency shifts depend on the fibre angle to B0), DWI at b = 1000 s/mm^2 with Rician
noise, and an MP2RAGE-like T1w. The ground truth (tensor, FA, MD, tissue probabilities, B0 maps and the
sampled parameters of each subject) is in derivatives/bssfp2dt-truth.
These images are simulated: they contain no data of any person.
"""
