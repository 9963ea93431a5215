"""Signal equations: pc-bSSFP (single pool and the hollow-cylinder white-matter model), DWI, MP2RAGE.

Conventions (see docs/simulator.md): times in seconds, frequencies in Hz, angles in radians, b in s/mm^2,
diffusivities in mm^2/s. A positive off-resonance ``df`` multiplies the transverse magnetisation by
exp(+i 2 pi df t); RF pulse n is applied about the axis n * dphi; the receiver is phase-locked to the RF.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GYROMAGNETIC_HZ_PER_T = 42.577478e6  # 1H, Hz/T


def bssfp_steady_state(t1, t2, tr, te, flip, df, phase_increments, m0=1.0, phi0=0.0, dtype=np.float64):
    """Closed-form bSSFP steady state (Freeman-Hill / Ernst-Anderson) for a set of phase cycles.

    Parameters are broadcast against each other; ``phase_increments`` (K,) in rad is appended as the
    last axis. t1, t2, tr, te in s; flip in rad; df off-resonance in Hz; phi0 transmit/receive phase
    in rad. Returns complex transverse magnetisation of shape broadcast(...) + (K,), computed in
    ``dtype`` (float32 halves the time of whole-brain images). The TE factor uses the physical df only,
    never the phase increment.
    """
    t1, t2, flip, df, m0, phi0 = (np.asarray(v, dtype=dtype)[..., None] for v in (t1, t2, flip, df, m0, phi0))
    dphi = np.asarray(phase_increments, dtype=dtype)
    tr, te = dtype(tr), dtype(te)
    e1 = np.exp(-tr / t1)
    e2 = np.exp(-tr / t2)
    psi = 2.0 * np.pi * df * tr - dphi
    cos_a = np.cos(flip)
    denominator_const = 1.0 - e1 * cos_a - e2 ** 2 * (e1 - cos_a)
    numerator = -1j * m0 * (1.0 - e1) * np.sin(flip) * (1.0 - e2 * np.exp(-1j * psi))
    denominator = denominator_const - e2 * (1.0 - e1) * (1.0 + cos_a) * np.cos(psi)
    te_factor = np.exp(1j * (2.0 * np.pi * df * te + phi0) - te / t2)
    return numerator / denominator * te_factor


@dataclass(frozen=True)
class FibreModel:
    """Hollow-cylinder white-matter model (Wharton & Bowtell 2013): susceptibilities in ppm (SI)."""

    chi_isotropic_ppm: float = -0.1
    chi_anisotropic_ppm: float = -0.1
    exchange_ppm: float = 0.02
    g_ratio: float = 0.8
    myelin_proton_density: float = 0.5

    def frequency_shifts(self, sin2_theta, field_strength_t: float, orientation_gain=1.0):
        """Mean frequency (Hz) of the myelin and intra-axonal pools for sin^2 of the fibre-to-B0 angle.

        Returns (df_myelin, df_axon), each broadcast(sin2_theta, orientation_gain). The extra-axonal
        pool has zero mean shift. ``orientation_gain`` scales both shifts (1 = physical).
        """
        f0 = GYROMAGNETIC_HZ_PER_T * field_strength_t
        g = self.g_ratio
        log_inv_g = np.log(1.0 / g)
        c1 = 0.25 - 1.5 * g ** 2 / (1.0 - g ** 2) * log_inv_g
        chi_i = self.chi_isotropic_ppm * 1e-6
        chi_a = self.chi_anisotropic_ppm * 1e-6
        sin2 = np.asarray(sin2_theta, dtype=np.float64)
        df_myelin = f0 * (chi_i / 2 * (2.0 / 3.0 - sin2) + chi_a / 2 * (c1 * sin2 - 1.0 / 3.0)
                          + self.exchange_ppm * 1e-6)
        df_axon = f0 * 0.75 * chi_a * sin2 * log_inv_g
        return df_myelin * orientation_gain, df_axon * orientation_gain

    def pool_fractions(self, fibre_volume_fraction):
        """Signal weights (myelin, axon, extra-axonal) for a fibre volume fraction (FVF, 0..1)."""
        fvf = np.asarray(fibre_volume_fraction, dtype=np.float64)
        g2 = self.g_ratio ** 2
        return self.myelin_proton_density * fvf * (1.0 - g2), fvf * g2, 1.0 - fvf


@dataclass(frozen=True)
class PoolRelaxation:
    """Relaxation times (s) of the white-matter water pools."""

    t1_myelin: float = 0.300
    t2_myelin: float = 0.015
    t1_intra_extra: float = 1.000
    t2_axon: float = 0.075
    t2_extra: float = 0.060


def white_matter_bssfp(sin2_theta, fibre_volume_fraction, df_b0, tr, te, flip, phase_increments,
                       field_strength_t, phi0=0.0, fibre_model=FibreModel(), relaxation=PoolRelaxation(),
                       orientation_gain=1.0, dtype=np.float64):
    """Three-pool white-matter bSSFP signal (myelin, intra-axonal, extra-axonal water).

    Voxel arrays (N,) broadcast together; returns complex (N, K). Proton densities are relative to
    free water (the extra-axonal pool has density 1).
    """
    df_myelin, df_axon = fibre_model.frequency_shifts(sin2_theta, field_strength_t, orientation_gain)
    w_myelin, w_axon, w_extra = fibre_model.pool_fractions(fibre_volume_fraction)
    r = relaxation
    common = dict(tr=tr, te=te, flip=flip, phase_increments=phase_increments, phi0=phi0, dtype=dtype)
    signal = w_myelin[..., None] * bssfp_steady_state(r.t1_myelin, r.t2_myelin, df=df_b0 + df_myelin, **common)
    signal += w_axon[..., None] * bssfp_steady_state(r.t1_intra_extra, r.t2_axon, df=df_b0 + df_axon, **common)
    signal += w_extra[..., None] * bssfp_steady_state(r.t1_intra_extra, r.t2_extra, df=df_b0, **common)
    return signal


def rician(signal, sigma, rng: np.random.Generator):
    """|S + sigma (n1 + i n2)| with independent standard normal n1, n2; float32 (...)."""
    real = signal + sigma * rng.standard_normal(np.shape(signal), dtype=np.float32)
    imag = sigma * rng.standard_normal(np.shape(signal), dtype=np.float32)
    return np.hypot(real, imag)


def complex_noise(shape, sigma, rng: np.random.Generator):
    """Circular complex Gaussian noise with standard deviation ``sigma`` per real/imaginary part (complex64)."""
    noise = rng.standard_normal(shape + (2,), dtype=np.float32) * np.float32(sigma)
    return noise.view(np.complex64)[..., 0]


def cylindrical_eigenvalues(md, fa):
    """Eigenvalues (l1, l2 = l3) of a cylindrically symmetric tensor with mean diffusivity ``md`` and FA.

    delta = MD FA / sqrt(3 - 2 FA^2); l1 = MD + 2 delta; l2 = l3 = MD - delta. Returns (l1, l2).
    """
    md = np.asarray(md, dtype=np.float64)
    fa = np.clip(np.asarray(fa, dtype=np.float64), 0.0, 0.99)
    delta = md * fa / np.sqrt(3.0 - 2.0 * fa ** 2)
    return md + 2.0 * delta, md - delta


def cylindrical_tensor(md, fa, v1):
    """BEP016 tensor (..., 6) = l2 I + (l1 - l2) v1 v1^T for unit v1 (..., 3)."""
    l1, l2 = cylindrical_eigenvalues(md, fa)
    v = np.asarray(v1, dtype=np.float64)
    dl = (l1 - l2)[..., None]
    outer = np.stack([v[..., 0] * v[..., 0], v[..., 0] * v[..., 1], v[..., 0] * v[..., 2],
                      v[..., 1] * v[..., 1], v[..., 1] * v[..., 2], v[..., 2] * v[..., 2]], axis=-1)
    iso = np.zeros(outer.shape)
    iso[..., [0, 3, 5]] = 1.0
    return l2[..., None] * iso + dl * outer


@dataclass(frozen=True)
class Mp2rageProtocol:
    """MP2RAGE timing (Marques et al. 2010). Times in s, flips in degrees."""

    tr: float = 5.0
    ti1: float = 0.7
    ti2: float = 2.5
    flip1_deg: float = 4.0
    flip2_deg: float = 5.0
    readout_tr: float = 0.0072
    readouts_per_block: int = 160
    inversion_efficiency: float = 0.96


def mp2rage_inversions(t1, b1=1.0, protocol: Mp2rageProtocol = Mp2rageProtocol()):
    """Longitudinal-steady-state MP2RAGE signals (INV1, INV2) per unit proton density.

    Every segment of one MP2RAGE repetition (inversion, free relaxation, a train of n small-flip
    readouts) maps Mz affinely (Mz -> a Mz + b), so the steady state is b_total / (1 - a_total).
    The signal of a block is sin(flip) times Mz before the centre readout of that block.
    t1 (s) and b1 (relative transmit field) broadcast; returns two float64 arrays of that shape.
    """
    p = protocol
    t1 = np.asarray(t1, dtype=np.float64)
    n = p.readouts_per_block
    half = n // 2
    block = n * p.readout_tr
    gaps = (p.ti1 - half * p.readout_tr, p.ti2 - p.ti1 - block, p.tr - p.ti2 - (n - half) * p.readout_tr)
    if min(gaps) <= 0:
        raise ValueError("MP2RAGE timing leaves no room for the readout blocks")
    flips = (np.deg2rad(p.flip1_deg) * b1, np.deg2rad(p.flip2_deg) * b1)
    e_ro = np.exp(-p.readout_tr / t1)

    def relax(duration):
        e = np.exp(-duration / t1)
        return e, 1.0 - e

    def pulses(flip, count):
        q = np.cos(flip) * e_ro
        qn = q ** count
        return qn, (1.0 - e_ro) * (1.0 - qn) / (1.0 - q)

    def compose(first, second):  # apply first, then second
        return second[0] * first[0], second[0] * first[1] + second[1]

    # Segments from just before the inversion to the centre of block 1, then to the centre of block 2,
    # then to the end of the repetition.
    inversion = (-p.inversion_efficiency * np.ones_like(t1), np.zeros_like(t1))
    to_centre1 = compose(inversion, compose(relax(gaps[0]), pulses(flips[0], half)))
    to_centre2 = compose(pulses(flips[0], n - half), compose(relax(gaps[1]), pulses(flips[1], half)))
    to_end = compose(pulses(flips[1], n - half), relax(gaps[2]))
    whole = compose(compose(to_centre1, to_centre2), to_end)
    mz_start = whole[1] / (1.0 - whole[0])
    mz_centre1 = to_centre1[0] * mz_start + to_centre1[1]
    mz_centre2 = to_centre2[0] * mz_centre1 + to_centre2[1]
    return np.sin(flips[0]) * mz_centre1, np.sin(flips[1]) * mz_centre2


def mp2rage_uni(inv1, inv2, beta=0.0):
    """Uniform image UNI = (Re(S1 conj S2) - beta) / (|S1|^2 + |S2|^2 + 2 beta), in [-0.5, 0.5].

    ``beta`` > 0 is the regularisation (O'Brien et al. 2014) that darkens the noisy background.
    """
    numerator = np.real(inv1 * np.conj(inv2)) - beta
    return numerator / (np.abs(inv1) ** 2 + np.abs(inv2) ** 2 + 2.0 * beta)
