"""Phase-cycled bSSFP preprocessing steps as pure array functions.

Conventions: a phase-cycled volume is ``(X, Y, Z, C)`` with the phase cycles on the last axis
(C = 12 in the reference method); phase is in radians unless stated otherwise; magnitudes are in
scanner units (arbitrary). Nothing here reads or writes files.
"""
from __future__ import annotations

import logging

import numpy as np

from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)

#: Largest phase integer a Siemens scanner writes (12-bit: 0..4095).
SCANNER_PHASE_MAX = 4095
#: The reference method's number of phase cycles.
N_PHASE_CYCLES = 12
PHASE_UNITS = ("arbitrary", "rad")
GIBBS_MODES = ("complex", "magnitude")


def rescale_phase(phase: np.ndarray, units: str = "arbitrary",
                  max_value: int = SCANNER_PHASE_MAX) -> np.ndarray:
    """Phase image in radians in [-pi, pi).

    ``units="arbitrary"``: scanner integers 0..``max_value`` map linearly onto [-pi, pi) with
    ``phi = -pi + 2 pi q / (max_value + 1)``, so 0 -> -pi and 4095 -> pi - 2 pi / 4096 (the integer
    range is periodic: one step past 4095 would be +pi = -pi again).
    ``units="rad"``: already radians, returned as float64 unchanged (the BIDS sidecar ``Units``
    field selects this).

    Args:
        phase: any shape, scanner integers or radians.
        units: "arbitrary" (scanner integers) or "rad".
        max_value: the largest scanner integer (4095 for 12-bit phase).
    Returns:
        float64 array of the same shape, radians.
    """
    if units not in PHASE_UNITS:
        raise UsageError(f"phase units {units!r} unknown: use one of {', '.join(PHASE_UNITS)} "
                         "(the phase sidecar's 'Units' field)")
    values = np.asarray(phase, dtype=np.float64)
    if units == "rad":
        return values
    if values.size and (values.min() < 0 or values.max() > max_value):
        logger.warning("phase values outside 0..%d (found %.6g..%.6g): is 'Units' really 'arbitrary'?",
                       max_value, values.min(), values.max())
    return -np.pi + values * (2.0 * np.pi / (max_value + 1))


def to_complex(magnitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Complex signal ``magnitude * exp(i phase)``.

    Args:
        magnitude: any shape, arbitrary units.
        phase: same shape, radians.
    Returns:
        complex128 array of the same shape.
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    phase = np.asarray(phase, dtype=np.float64)
    if magnitude.shape != phase.shape:
        raise UsageError(f"magnitude {magnitude.shape} and phase {phase.shape} shapes differ: "
                         "give both parts of the same bSSFP acquisition")
    return magnitude * np.exp(1j * phase)


def global_phases(signal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Global phase of each phase cycle: ``angle(sum_x S_k(x))`` over the mask.

    Args:
        signal: complex ``(X, Y, Z, C)``.
        mask: boolean ``(X, Y, Z)`` or None (all voxels).
    Returns:
        ``(C,)`` radians in (-pi, pi].
    """
    signal = np.asarray(signal)
    if signal.ndim < 2:
        raise UsageError("bSSFP signal needs a spatial part and a last phase-cycle axis")
    voxels = signal.reshape(-1, signal.shape[-1])
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != signal.shape[:-1]:
            raise UsageError(f"mask shape {mask.shape} differs from the bSSFP grid {signal.shape[:-1]}")
        voxels = voxels[mask.reshape(-1)]
    return np.angle(voxels.sum(axis=0))


def remove_global_phase(signal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-cycle global phase removal: ``S_k <- S_k * exp(-i angle(sum_x S_k(x)))``.

    The transmit/receive phase offset differs between separately acquired cycles; removing each
    cycle's mean phase makes the cycles comparable without touching the spatial phase pattern.

    Args:
        signal: complex ``(X, Y, Z, C)``.
        mask: boolean ``(X, Y, Z)`` restricting the sum (e.g. the brain), or None.
    Returns:
        complex ``(X, Y, Z, C)``; afterwards every cycle's (masked) sum is real and >= 0.
    """
    phases = global_phases(signal, mask)
    return np.asarray(signal) * np.exp(-1j * phases)


def remove_gibbs(volume: np.ndarray, mode: str = "complex", slice_axis: int = 2,
                 n_points: int = 3, num_processes: int = 1, method: str = "dipy") -> np.ndarray:
    """Gibbs-ringing removal with the sub-voxel shift method (Kellner et al. 2016), dipy's or MRtrix3's.

    ``mode="complex"`` (default) treats the real and imaginary parts separately. Ringing comes from
    truncating k-space, a convolution with a real, symmetric kernel, so it acts on the real and
    imaginary parts independently and the correction of each part is exact within the model; the
    magnitude is a non-linear function of both, so its ringing is no longer the sinc pattern the
    method assumes (and the phase would be left untouched). ``mode="magnitude"`` corrects the
    magnitude only and keeps the phase (for magnitude-only data or a quick look).

    Args:
        volume: complex or real ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        mode: "complex" or "magnitude" (ignored for real input, which is corrected directly).
        slice_axis: the axis dipy treats as the slice direction (ringing is removed in the other two).
        n_points: dipy's neighbourhood for the local oscillation measure.
        num_processes: dipy worker processes / mrdegibbs threads (1 keeps it predictable on shared machines).
        method: "dipy" or "mrdegibbs" (:mod:`bssfp2dt.preprocessing.unringing`).
    Returns:
        array of the input's shape and kind (complex128 or float64).
    """
    if mode not in GIBBS_MODES:
        raise UsageError(f"Gibbs mode {mode!r} unknown: use one of {', '.join(GIBBS_MODES)}")
    from bssfp2dt.preprocessing.unringing import remove_gibbs_real

    def correct(part: np.ndarray) -> np.ndarray:
        return remove_gibbs_real(part, method=method, slice_axis=slice_axis, threads=num_processes,
                                 n_points=n_points)

    volume = np.asarray(volume)
    if volume.ndim not in (3, 4):
        raise UsageError(f"Gibbs removal needs a 3D or 4D volume, got shape {volume.shape}")
    if not np.iscomplexobj(volume):
        return correct(volume)
    if mode == "complex":
        # Real and imaginary parts in one call (one mrdegibbs process), stacked on the last axis.
        parts = np.concatenate([volume.real.reshape(*volume.shape[:3], -1),
                                volume.imag.reshape(*volume.shape[:3], -1)], axis=-1)
        corrected = correct(parts)
        half = corrected.shape[-1] // 2
        return (corrected[..., :half] + 1j * corrected[..., half:]).reshape(volume.shape)
    return correct(np.abs(volume)) * np.exp(1j * np.angle(volume))


def cycle_order(increments_deg) -> tuple[int, ...]:
    """The volume order that sorts the phase cycles by RF phase increment, ascending modulo 360 degrees.

    The network's channels follow the cycles in this order (0, 30, ..., 330 degrees for the packaged models),
    so a series stored in another order (the sidecar's ``PhaseIncrements`` says which) is reordered before
    anything else. Ties keep their stored order.

    Args:
        increments_deg: ``(C,)`` the increment of each stored volume, degrees.
    Returns:
        ``C`` volume indices; ``volumes[..., order]`` is the sorted series.
    """
    increments = np.mod(np.asarray(increments_deg, dtype=np.float64), 360.0)
    return tuple(int(index) for index in np.argsort(increments, kind="stable"))


def interleave_channels(magnitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Network input: magnitude and phase alternated along the last axis (m0, p0, m1, p1, ...).

    Args:
        magnitude: ``(X, Y, Z, C)``.
        phase: ``(X, Y, Z, C)``.
    Returns:
        ``(X, Y, Z, 2C)`` (24 channels for 12 cycles), the dtype numpy promotes both to.
    """
    magnitude = np.asarray(magnitude)
    phase = np.asarray(phase)
    if magnitude.shape != phase.shape:
        raise UsageError(f"magnitude {magnitude.shape} and phase {phase.shape} shapes differ")
    stacked = np.stack([magnitude, phase], axis=-1)
    return stacked.reshape(*magnitude.shape[:-1], 2 * magnitude.shape[-1])


def deinterleave_channels(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`interleave_channels`: ``(..., 2C)`` -> magnitude, phase ``(..., C)``."""
    channels = np.asarray(channels)
    if channels.shape[-1] % 2:
        raise UsageError(f"interleaved bSSFP needs an even channel count, got {channels.shape[-1]}")
    return channels[..., 0::2], channels[..., 1::2]


def single_bssfp(cycles: np.ndarray, n_cycles: int = N_PHASE_CYCLES) -> np.ndarray:
    """The single-bSSFP variant: the first phase cycle repeated ``n_cycles`` times.

    Keeps the 24-channel input contract so the same network head serves both variants.

    Args:
        cycles: ``(X, Y, Z, C)`` (magnitude, phase or complex), C >= 1.
    Returns:
        ``(X, Y, Z, n_cycles)``, every channel equal to ``cycles[..., 0]``.
    """
    cycles = np.asarray(cycles)
    return np.repeat(cycles[..., :1], n_cycles, axis=-1)
