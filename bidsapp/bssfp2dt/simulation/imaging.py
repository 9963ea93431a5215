"""Deterministic imaging of a sampled subject: tissue at each voxel of a scan, then the signals.

Everything here is a pure function of :class:`SubjectParameters`, the anatomy and the grid, except
the noise, which is drawn from the generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bssfp2dt.simulation.anatomy import Anatomy
from bssfp2dt.simulation.geometry import ImageGrid, RigidPose
from bssfp2dt.dti.eigen import bep016_to_matrix, matrix_to_bep016
from bssfp2dt.dti.fit import dwi_signal
from bssfp2dt.simulation.signal import (bssfp_steady_state, complex_noise, cylindrical_tensor, mp2rage_inversions,
                                        mp2rage_uni, rician, white_matter_bssfp)
from bssfp2dt.simulation.subject import Protocol, ScanPlan, SubjectParameters

GM, WM, CSF = 0, 1, 2
BRAIN_FRACTION_MIN = 1e-3
WARP_PAD_MM = 6.0  # > the largest smooth displacement (5 mm)


@dataclass
class ScanTissue:
    """Tissue inside the brain for one scan: flat voxel indices (M,) into the grid, scanner points
    (M, 3) mm, template points (M, 3) mm, fractions (M, 3) GM/WM/CSF and, when fibres were sampled,
    per-tissue tensors (3, M, 6) in the scanner frame (mm^2/s), the WM FA (M,), V1 (M, 3) and the tract
    coherence (M,) in [0, 1] (``simulation.fibres``: 0.2 in general white matter, 0.5-1 in the tracts)."""

    index: np.ndarray
    scanner_points: np.ndarray
    template_points: np.ndarray
    fractions: np.ndarray
    tissue_tensors: np.ndarray | None = None
    fa_wm: np.ndarray | None = None
    v1_scanner: np.ndarray | None = None
    coherence: np.ndarray | None = None

    @property
    def tensor(self) -> np.ndarray:
        """Fraction-weighted mean tensor (M, 6): the exact ground-truth field."""
        weights = self.fractions / self.fractions.sum(axis=1, keepdims=True)
        return np.einsum("mc,cmk->mk", weights, self.tissue_tensors)


def sample_tissue(anatomy: Anatomy, subject: SubjectParameters, pose: RigidPose, grid: ImageGrid,
                  with_fibres: bool) -> ScanTissue:
    """Where the anatomy falls on ``grid`` for a head at ``pose``; fibres (tensors) on request."""
    # voxel -> scanner -> head -> template is affine but for the smooth displacement (<= 5 mm), so
    # the affine part alone finds the voxels near the brain; all per-voxel work happens only there.
    warp_linear = np.eye(4)
    warp_linear[:3, :3], warp_linear[:3, 3] = subject.warp.linear, subject.warp.offset
    template_from_voxel = warp_linear @ np.linalg.inv(pose.matrix) @ grid.affine
    near = np.flatnonzero(anatomy.near_brain_on_grid(template_from_voxel, grid.shape, pad_mm=WARP_PAD_MM))
    index = np.stack(np.unravel_index(near, grid.shape), axis=1).astype(np.float64)
    scanner = index @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    head = pose.head_points(scanner)
    template = subject.warp.to_template(head)
    fractions = anatomy.fractions(template)
    inside = np.flatnonzero(fractions.sum(axis=1) > BRAIN_FRACTION_MIN)
    tissue = ScanTissue(near[inside], scanner[inside], template[inside], fractions[inside])
    if with_fibres:
        _add_tensors(tissue, anatomy, subject, pose, head[inside])
    return tissue


def _add_tensors(tissue: ScanTissue, anatomy: Anatomy, subject: SubjectParameters, pose: RigidPose,
                 head_points: np.ndarray) -> None:
    fibres = anatomy.fibres(tissue.template_points)
    # A template direction v maps to the head as J^-1 v (J = d template / d head): directions are
    # carried by the warp, which keeps the principal direction through the deformation.
    v_head = np.linalg.solve(subject.warp.jacobian(head_points), fibres.v1[..., None])[..., 0]
    v_head /= np.linalg.norm(v_head, axis=1, keepdims=True)
    v_scanner = v_head @ pose.rotation.T
    t = subject.tissues
    fa_wm = (t.fa_wm_general + (t.fa_wm_coherent - t.fa_wm_general) * fibres.coherence) \
        * (0.6 + 0.4 * fibres.aligned_share)
    m = len(tissue.index)
    tensors = np.empty((3, m, 6))
    tensors[WM] = cylindrical_tensor(np.full(m, t.md["WM"]), fa_wm, v_scanner)
    tensors[GM] = cylindrical_tensor(np.full(m, t.md["GM"]), np.full(m, t.fa_gm), v_scanner)
    tensors[CSF] = cylindrical_tensor(np.full(m, t.md["CSF"]), np.zeros(m), v_scanner)
    tissue.tissue_tensors, tissue.fa_wm, tissue.v1_scanner = tensors, fa_wm, v_scanner
    tissue.coherence = fibres.coherence


def b0_field_hz(subject: SubjectParameters, scan: ScanPlan, tissue: ScanTissue) -> np.ndarray:
    """Off-resonance (M,) Hz: anatomical susceptibility sources (template frame) + the scan's shim residual."""
    field = scan.b0_shim(tissue.scanner_points).astype(np.float64)
    for source in subject.b0_sources:
        d2 = np.sum((tissue.template_points - np.asarray(source.centre)) ** 2, axis=1)
        field += source.amplitude_hz * np.exp(-d2 / (2.0 * source.width_mm ** 2))
    return field


def scatter_to_grid(values: np.ndarray, tissue: ScanTissue, grid: ImageGrid, dtype=np.float32) -> np.ndarray:
    """Put per-voxel values (M, ...) back on the grid (X, Y, Z, ...), zero elsewhere."""
    out = np.zeros((grid.n_voxels,) + values.shape[1:], dtype=dtype)
    out[tissue.index] = values
    return out.reshape(tuple(grid.shape) + values.shape[1:])


def image_bssfp(subject: SubjectParameters, scan: ScanPlan, tissue: ScanTissue, grid: ImageGrid,
                protocol: Protocol, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Complex pc-bSSFP (X, Y, Z, K) complex64 with noise, and the B0 map (X, Y, Z) Hz used.

    Also returns the noiseless complex image. White matter uses the three-pool hollow-cylinder model
    with the fibre angle to B0 (scanner z); GM and CSF are single pools.
    """
    p, t = protocol, subject.tissues
    dphi = protocol.phase_cycle_sign * 2.0 * np.pi * np.arange(p.n_phase_cycles) / p.n_phase_cycles
    df = b0_field_hz(subject, scan, tissue)
    flip = np.deg2rad(p.bssfp_flip_deg) * subject.b1(tissue.scanner_points).astype(np.float64)
    phi0 = scan.phi0(tissue.scanner_points).astype(np.float64)
    common = dict(tr=p.bssfp_tr, te=p.bssfp_te, flip=flip, df=df, phase_increments=dphi, phi0=phi0, dtype=np.float32)
    f = tissue.fractions
    signal = (f[:, GM] * t.proton_density["GM"])[:, None] * bssfp_steady_state(t.t1["GM"], t.t2["GM"], **common)
    signal += (f[:, CSF] * t.proton_density["CSF"])[:, None] * bssfp_steady_state(t.t1["CSF"], t.t2["CSF"], **common)
    sin2 = 1.0 - tissue.v1_scanner[:, 2] ** 2
    wm = white_matter_bssfp(sin2, 0.4 + 0.4 * tissue.fa_wm, df, p.bssfp_tr, p.bssfp_te, flip, dphi,
                            p.field_strength_t, phi0, subject.fibre_model, subject.pool_relaxation,
                            subject.orientation_gain, dtype=np.float32)
    signal += f[:, WM, None] * wm
    signal *= (SCANNER_SCALE_BSSFP * scan.receive(tissue.scanner_points))[:, None]
    clean = scatter_to_grid(signal.astype(np.complex64), tissue, grid, np.complex64)
    wm_voxels = f[:, WM] > 0.9
    reference = np.abs(signal[wm_voxels]).mean() if wm_voxels.any() else np.abs(signal).mean()
    noisy = clean + complex_noise(clean.shape, reference / scan.snr, rng)
    return noisy, clean, scatter_to_grid(df.astype(np.float32), tissue, grid)


SCANNER_SCALE_BSSFP = 12000.0  # brings the magnitude to the range of DOVE's stored values (max ~2300)
SCANNER_SCALE_DWI = 1500.0
T1W_MAX_INTEGER = 4095


def dwi_noiseless(subject: SubjectParameters, scan: ScanPlan, tissue: ScanTissue, protocol: Protocol,
                  bvals=None, bvecs=None) -> np.ndarray:
    """Noiseless DWI of the brain voxels, (M, N) in scanner units.

    Partial volume mixes the compartments' signals: S = sum_c f_c S0_c exp(-b g^T D_c g), with
    S0_c = PD_c exp(-TE/T2_c) (1 - exp(-TR/T1_c)), times the receive field. ``bvals``/``bvecs``
    (scanner frame) default to the scan's scheme.
    """
    t, p = subject.tissues, protocol
    bvals = np.asarray(scan.bvals if bvals is None else bvals)
    bvecs = np.asarray(scan.bvecs_scanner if bvecs is None else bvecs)
    total = np.zeros((len(tissue.index), len(bvals)))
    for c, name in ((GM, "GM"), (WM, "WM"), (CSF, "CSF")):
        total += dwi_signal(tissue.tissue_tensors[c], tissue.fractions[:, c] * _dwi_s0(t, p, name), bvals, bvecs)
    total *= (SCANNER_SCALE_DWI * scan.receive(tissue.scanner_points))[:, None]
    return total


def _dwi_s0(tissues, protocol: Protocol, name: str) -> float:
    return tissues.proton_density[name] * np.exp(-protocol.dwi_te / tissues.t2[name]) \
        * (1 - np.exp(-protocol.dwi_tr / tissues.t1[name]))


def dwi_with_noise(noiseless: np.ndarray, subject: SubjectParameters, scan: ScanPlan, tissue: ScanTissue,
                   grid: ImageGrid, protocol: Protocol, rng: np.random.Generator) -> np.ndarray:
    """Put noiseless brain signals (M, N) on the grid and add Rician noise everywhere: (X, Y, Z, N)
    float32, sigma = white-matter b0 signal / SNR."""
    sigma = SCANNER_SCALE_DWI * _dwi_s0(subject.tissues, protocol, "WM") / scan.snr
    return rician(scatter_to_grid(noiseless.astype(np.float32), tissue, grid), sigma, rng)


def image_t1w(subject: SubjectParameters, scan: ScanPlan, tissue: ScanTissue, grid: ImageGrid,
              rng: np.random.Generator) -> np.ndarray:
    """MP2RAGE-like UNI image (X, Y, Z) as scanner integers 0..4095 (float32).

    INV1 and INV2 are mixed over tissues (PD x fraction x receive field), complex noise is added to
    each, and they are combined with the background-suppressing regularisation of O'Brien et al.
    """
    t = subject.tissues
    b1 = subject.b1(tissue.scanner_points).astype(np.float64)
    inv1 = np.zeros(len(tissue.index))
    inv2 = np.zeros(len(tissue.index))
    for c, name in ((GM, "GM"), (WM, "WM"), (CSF, "CSF")):
        s1, s2 = mp2rage_inversions(np.full(len(b1), t.t1[name]), b1)
        weight = tissue.fractions[:, c] * t.proton_density[name]
        inv1 += weight * s1
        inv2 += weight * s2
    receive = scan.receive(tissue.scanner_points)
    inv1, inv2 = inv1 * receive, inv2 * receive
    _, wm_inv2 = mp2rage_inversions(np.array([t.t1["WM"]]))
    sigma = float(wm_inv2[0] * t.proton_density["WM"]) / scan.snr
    noisy1 = scatter_to_grid(inv1.astype(np.float32), tissue, grid) + complex_noise(tuple(grid.shape), sigma, rng)
    noisy2 = scatter_to_grid(inv2.astype(np.float32), tissue, grid) + complex_noise(tuple(grid.shape), sigma, rng)
    uni = mp2rage_uni(noisy1, noisy2, beta=50.0 * sigma ** 2)
    return ((uni + 0.5) * T1W_MAX_INTEGER).astype(np.float32)


def tensor_in_voxel_axes(tensors6: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Express scanner-frame tensors (..., 6) in the grid's voxel axes (A^T D A, A = unit axes)."""
    axes = grid.axes_in_world
    return matrix_to_bep016(np.einsum("ji,...jk,kl->...il", axes, bep016_to_matrix(tensors6), axes))
