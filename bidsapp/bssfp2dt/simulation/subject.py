"""What differs between simulated subjects and scans, sampled from one seeded generator.

Every random choice is made here, once, into frozen dataclasses that are written to the subject's
parameters JSON; imaging (:mod:`bssfp2dt.simulation.dataset`) is then a deterministic function of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from bssfp2dt.simulation.geometry import RigidPose, SmoothWarp, sample_warp
from bssfp2dt.simulation.signal import FibreModel, PoolRelaxation


@dataclass(frozen=True)
class Regime:
    """Difficulty: how strongly fibre orientation shifts the bSSFP profile, and the noise levels.

    ``orientation_gain`` scales the myelin/axon frequency shifts (1 = physical). SNRs are per phase
    cycle relative to mean white-matter magnitude (bSSFP), of the white-matter b0 (DWI), and of the
    white-matter INV2 (T1w).
    """

    name: str
    orientation_gain: tuple[float, float]
    bssfp_snr: tuple[float, float]
    dwi_snr: tuple[float, float]
    t1w_snr: tuple[float, float]


REGIMES = {
    "realistic": Regime("realistic", (1.0, 1.0), (30.0, 60.0), (15.0, 40.0), (30.0, 60.0)),
    "easy": Regime("easy", (3.0, 5.0), (150.0, 250.0), (60.0, 80.0), (80.0, 120.0)),
}


@dataclass(frozen=True)
class Protocol:
    """Acquisition settings (DOVE-like defaults). Times in s, flips in degrees, voxels in mm."""

    field_strength_t: float = 3.0
    bssfp_tr: float = 4.8e-3
    bssfp_te: float = 2.4e-3
    bssfp_flip_deg: float = 15.0
    bssfp_voxel_mm: float = 1.4
    n_phase_cycles: int = 12
    dwi_voxel_mm: float = 2.0
    dwi_bvalue: float = 1000.0
    dwi_te: float = 0.062
    dwi_tr: float = 3.5
    dwi_total_readout_time: float = 0.05
    dwi_directions: tuple[int, int] = (30, 64)
    dwi_b0_volumes: tuple[int, int] = (2, 6)
    t1w_voxel_mm: float = 1.0
    truth_voxel_mm: float = 2.0
    phase_units: str = "rad"  # or "arbitrary": scanner integers 0..4095
    phase_cycle_sign: int = 1  # the scanner's cycling direction; -1 mirrors the profile

    def with_voxel_scale(self, scale: float) -> "Protocol":
        """All voxel sizes multiplied by ``scale`` (coarse grids for fast tests)."""
        return dataclasses.replace(
            self, bssfp_voxel_mm=self.bssfp_voxel_mm * scale, dwi_voxel_mm=self.dwi_voxel_mm * scale,
            t1w_voxel_mm=self.t1w_voxel_mm * scale, truth_voxel_mm=self.truth_voxel_mm * scale)

    @property
    def phase_increments_deg(self) -> np.ndarray:
        """Nominal increments written to the sidecar, (K,) degrees in [0, 360)."""
        return 360.0 * np.arange(self.n_phase_cycles) / self.n_phase_cycles


@dataclass(frozen=True)
class TissueProperties:
    """Relaxation (s), proton density (relative to water), and diffusion (mm^2/s) of the tissues.

    ``water_content``: per tissue, the subject's free-water factor in [-1, 1] (0: the population mean) that
    sets where its T1 and, for the most part, its MD lie in their ranges (see :func:`sample_tissues`).
    """

    water_content: dict
    t1: dict
    t2: dict
    proton_density: dict
    md: dict
    fa_gm: float
    fa_wm_coherent: float
    fa_wm_general: float


@dataclass(frozen=True)
class SmoothField:
    """c + l . r + q |r|^2 with r = (p - centre) / radius (dimensionless), p in mm."""

    constant: float
    linear: tuple[float, float, float]
    quadratic: float
    centre: tuple[float, float, float]
    radius: float = 80.0

    def __call__(self, points: np.ndarray) -> np.ndarray:
        r = (points - np.asarray(self.centre, dtype=np.float32)) / np.float32(self.radius)
        return (self.constant + r @ np.asarray(self.linear, dtype=np.float32)
                + self.quadratic * np.einsum("ni,ni->n", r, r))


@dataclass(frozen=True)
class FieldSource:
    """A Gaussian B0 inhomogeneity in template space: amplitude (Hz), centre (mm), width sigma (mm)."""

    amplitude_hz: float
    centre: tuple[float, float, float]
    width_mm: float


@dataclass(frozen=True)
class ScanPlan:
    """One acquisition: its modality, session, head pose and scan-specific fields."""

    modality: str  # "pcbssfp" | "dwi" | "t1w"
    session: str
    pose: RigidPose
    receive: SmoothField
    snr: float
    b0_shim: SmoothField | None = None  # Hz, scanner frame; bSSFP
    phi0: SmoothField | None = None  # rad, scanner frame; bSSFP
    bvals: tuple[float, ...] | None = None
    bvecs_scanner: tuple[tuple[float, float, float], ...] | None = None
    reverse_pe_b0: bool = False


@dataclass(frozen=True)
class SubjectParameters:
    """Everything that makes one simulated subject."""

    label: str
    regime: str
    orientation_gain: float
    warp: SmoothWarp
    base_pose: RigidPose
    tissues: TissueProperties
    b0_sources: tuple[FieldSource, ...]
    b1: SmoothField
    fibre_model: FibreModel
    pool_relaxation: PoolRelaxation
    scans: tuple[ScanPlan, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-ready dict (numpy arrays as lists)."""
        return _plain(dataclasses.asdict(self)) | {"warp": self.warp.to_dict()}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _pose(rng, rotation_deg, translation_mm) -> RigidPose:
    return RigidPose(tuple(float(v) for v in rng.uniform(-1, 1, 3) * rotation_deg),
                     tuple(float(v) for v in rng.uniform(-1, 1, 3) * translation_mm))


def _vary(rng, value, fraction=0.10):
    return float(value * (1.0 + rng.uniform(-fraction, fraction)))


TISSUES = ("WM", "GM", "CSF")
T1_RANGE_S = {"WM": (0.83, 1.10), "GM": (1.33, 1.82), "CSF": (4.0, 4.4)}
T2_RANGE_S = {"WM": (0.070, 0.080), "GM": (0.100, 0.110), "CSF": (1.5, 2.0)}
MD_MEAN = {"WM": 0.75e-3, "GM": 0.85e-3, "CSF": 3.0e-3}  # mm^2/s
MD_SPREAD = {"WM": 0.07, "GM": 0.07, "CSF": 0.03}  # largest relative between-subject deviation
# Share of the MD deviation that follows the water content (the rest is independent): correlation ~0.98
# between a tissue's T1 and its MD across subjects.
MD_WATER_SHARE = 0.85
POOL_T1_SPREAD = 0.10  # the white-matter pools' intra/extra-axonal T1 follows the WM water content too


def _within(low_high: tuple[float, float], position: float) -> float:
    """The value at ``position`` in [-1, 1] of the interval ``low_high`` (-1: low, 1: high)."""
    low, high = low_high
    return float(0.5 * (low + high) + 0.5 * (high - low) * position)


def sample_tissues(rng: np.random.Generator) -> TissueProperties:
    """3 T tissue values (physics.md sections 3 and 5) with between-subject variation.

    T1 and MD both rise with a tissue's free-water content (more water: longer T1, faster diffusion), so
    one factor per tissue, ``water_content`` ~ U(-1, 1), places the subject's T1 in its range and sets
    ``MD_WATER_SHARE`` of its MD deviation; the inputs (T1w, bSSFP) thereby carry the subject's MD, as
    they do in real tissue. FA scales are independent draws (bSSFP sees WM FA through the fibre volume
    fraction).
    """
    water = {tissue: float(rng.uniform(-1.0, 1.0)) for tissue in TISSUES}
    t2 = {tissue: float(rng.uniform(*T2_RANGE_S[tissue])) for tissue in TISSUES}
    md_independent = {tissue: float(rng.uniform(-1.0, 1.0)) for tissue in TISSUES}
    md = {tissue: MD_MEAN[tissue] * (1.0 + MD_SPREAD[tissue] * (MD_WATER_SHARE * water[tissue]
                                                               + (1.0 - MD_WATER_SHARE) * md_independent[tissue]))
          for tissue in TISSUES}
    return TissueProperties(
        water_content=water, t1={tissue: _within(T1_RANGE_S[tissue], water[tissue]) for tissue in TISSUES},
        t2=t2, proton_density={"WM": 0.69, "GM": 0.80, "CSF": 1.0}, md=md,
        fa_gm=rng.uniform(0.10, 0.20), fa_wm_coherent=rng.uniform(0.70, 0.85), fa_wm_general=rng.uniform(0.40, 0.50))


def sample_pool_relaxation(rng: np.random.Generator, tissues: TissueProperties) -> PoolRelaxation:
    """White-matter pool relaxation: each default varied +-10 %, the intra/extra-axonal T1 by the WM water
    content (so the bSSFP of white matter follows its MD as the T1w does)."""
    defaults = PoolRelaxation()
    varied = {name: _vary(rng, value) for name, value in dataclasses.asdict(defaults).items()
              if name != "t1_intra_extra"}
    t1_intra_extra = defaults.t1_intra_extra * (1.0 + POOL_T1_SPREAD * tissues.water_content["WM"])
    return PoolRelaxation(t1_intra_extra=t1_intra_extra, **varied)


def gradient_scheme(rng: np.random.Generator, protocol: Protocol) -> tuple[tuple[float, ...], np.ndarray]:
    """b-values (N,) and unit directions (N, 3) in the scanner frame: b0 volumes spread through the
    series and electrostatically dispersed directions (dipy ``disperse_charges``)."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    n_dirs = int(rng.integers(protocol.dwi_directions[0], protocol.dwi_directions[1] + 1))
    n_b0 = int(rng.integers(protocol.dwi_b0_volumes[0], protocol.dwi_b0_volumes[1] + 1))
    start = rng.standard_normal((n_dirs, 3))
    hemisphere, _ = disperse_charges(HemiSphere(xyz=start / np.linalg.norm(start, axis=1, keepdims=True)), 300)
    directions = hemisphere.vertices
    b0_positions = np.round(np.linspace(0, n_dirs + n_b0 - 1, n_b0)).astype(int)
    bvals = np.full(n_dirs + n_b0, protocol.dwi_bvalue)
    bvecs = np.zeros((n_dirs + n_b0, 3))
    bvals[b0_positions] = 0.0
    weighted = np.setdiff1d(np.arange(n_dirs + n_b0), b0_positions)
    bvecs[weighted] = directions
    return tuple(float(b) for b in bvals), bvecs


def sample_subject(rng: np.random.Generator, label: str, regime: Regime, protocol: Protocol,
                   bssfp_sessions: int, dwi_sessions: int, template_centre: np.ndarray,
                   reverse_pe: bool = True) -> SubjectParameters:
    """Draw a subject: warp, head tilt, tissues, fields and one plan per scan.

    Session k (1-based) holds a pc-bSSFP scan if k <= bssfp_sessions and a DWI scan if
    k <= dwi_sessions; the single T1w is in session 1. Every scan has its own head pose (a small
    rigid jitter around the subject's base pose, whose pitch is the head tilt relative to B0).
    """
    warp = sample_warp(rng, template_centre)
    pitch = rng.uniform(-15.0, 15.0)
    base = RigidPose((float(pitch), float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3))),
                     tuple(float(v) for v in rng.uniform(-5, 5, 3)))
    b0_sources = (
        FieldSource(float(rng.uniform(60, 160)), (0.0, 42.0, -24.0), float(rng.uniform(10, 16))),  # frontal sinus
        FieldSource(float(rng.uniform(40, 120)), (-38.0, 12.0, -34.0), float(rng.uniform(9, 14))),  # temporal poles
        FieldSource(float(rng.uniform(40, 120)), (38.0, 12.0, -34.0), float(rng.uniform(9, 14))),
    )
    b1 = SmoothField(float(rng.uniform(1.05, 1.15)), tuple(float(v) for v in rng.uniform(-0.04, 0.04, 3)),
                     float(rng.uniform(-0.25, -0.15)), (0.0, 0.0, 0.0))
    fibre_model = FibreModel(g_ratio=float(rng.uniform(0.75, 0.85)))
    tissues = sample_tissues(rng)
    relax = sample_pool_relaxation(rng, tissues)
    scans = []
    sessions = max(bssfp_sessions, dwi_sessions, 1)
    for k in range(1, sessions + 1):
        session = str(k)
        kinds = (["t1w"] if k == 1 else []) + (["pcbssfp"] if k <= bssfp_sessions else []) + \
                (["dwi"] if k <= dwi_sessions else [])
        for kind in kinds:
            scans.append(_sample_scan(rng, kind, session, base, regime, protocol, reverse_pe))
    return SubjectParameters(
        label=label, regime=regime.name, orientation_gain=float(rng.uniform(*regime.orientation_gain)),
        warp=warp, base_pose=base, tissues=tissues, b0_sources=b0_sources, b1=b1,
        fibre_model=fibre_model, pool_relaxation=relax, scans=tuple(scans))


def _sample_scan(rng, kind, session, base, regime, protocol, reverse_pe) -> ScanPlan:
    pose = base.compose(_pose(rng, 3.0, 3.0))
    receive = SmoothField(1.0, tuple(float(v) for v in rng.uniform(-0.1, 0.1, 3)),
                          float(rng.uniform(0.2, 0.5)), (0.0, 0.0, 0.0))
    if kind == "pcbssfp":
        shim = SmoothField(float(rng.uniform(-20, 20)), tuple(float(v) for v in rng.uniform(-10, 10, 3)),
                           float(rng.uniform(-5, 5)), (0.0, 0.0, 0.0))
        phi0 = SmoothField(float(rng.uniform(-np.pi, np.pi)), tuple(float(v) for v in rng.uniform(-0.5, 0.5, 3)),
                           float(rng.uniform(-0.3, 0.3)), (0.0, 0.0, 0.0))
        return ScanPlan(kind, session, pose, receive, float(rng.uniform(*regime.bssfp_snr)), b0_shim=shim, phi0=phi0)
    if kind == "dwi":
        bvals, bvecs = gradient_scheme(rng, protocol)
        return ScanPlan(kind, session, pose, receive, float(rng.uniform(*regime.dwi_snr)), bvals=bvals,
                        bvecs_scanner=tuple(tuple(float(c) for c in v) for v in bvecs), reverse_pe_b0=reverse_pe)
    return ScanPlan(kind, session, pose, receive, float(rng.uniform(*regime.t1w_snr)))
