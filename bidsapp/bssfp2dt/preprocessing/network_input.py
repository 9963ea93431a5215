"""The network's input channels from a preprocessed image: the one function training and inference share.

``pc-bssfp``: 24 interleaved magnitude/phase channels, each group scaled by the fitted ranges to [0, 1];
``bssfp``: the first phase cycle repeated 12 times (same 24-channel contract); ``t1w``: the scaled T1w
replicated to 6 channels; ``dwi-tensor``: the tensor in the normalisation's coordinates (6).
"""
from __future__ import annotations

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import UsageError
from bssfp2dt.preprocessing import normalization as norm
from bssfp2dt.preprocessing.bssfp import deinterleave_channels, interleave_channels, single_bssfp
from bssfp2dt.preprocessing.t1w import prepare_t1w


def network_channels(volume: np.ndarray, modality: str, normalization: norm.Normalization,
                     mask: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) float32 network input, zero outside ``mask`` (X, Y, Z) bool.

    ``volume``: the session's preprocessed image of ``modality`` on the common grid: bSSFP (X, Y, Z, 24)
    interleaved magnitude (scanner units) / phase (rad), T1w (X, Y, Z) or tensor (X, Y, Z, 6) mm^2/s.
    """
    spec = modalities.BY_NAME.get(modality)
    if spec is None:
        raise UsageError(f"--input-modality {modality!r} has no network input")
    volume = np.asarray(volume, dtype=np.float32)
    if spec.source == "bssfp":
        magnitude, phase = deinterleave_channels(volume)
        if spec.single_cycle:  # idempotent when preprocessing already wrote the single variant
            magnitude, phase = single_bssfp(magnitude), single_bssfp(phase)
        channels = interleave_channels(*norm.normalize_bssfp(magnitude, phase, normalization, mask))
    elif spec.source == "t1w":
        channels = prepare_t1w(volume, mask, normalization)
    elif spec.source == "tensor":
        channels = norm.normalize_tensor(volume, normalization, mask)
    else:  # a new record in bssfp2dt.modalities whose source has no channel builder yet
        raise UsageError(f"--input-modality {modality!r} has no network input")
    return np.ascontiguousarray(np.moveaxis(channels, -1, 0), dtype=np.float32)
