"""Whole-volume prediction with MONAI's sliding window (Gaussian blending of overlapping patches)."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from bssfp2dt.inference.device import is_cuda

logger = logging.getLogger(__name__)


def predict_volume(predictor: Callable[[torch.Tensor], torch.Tensor], volume: np.ndarray, *,
                   patch_size: int = 64, overlap: float = 0.5, batch_size: int = 1,
                   device: torch.device = torch.device("cpu"), mask: np.ndarray | None = None,
                   out_channels: int | None = None, progress: bool = False) -> np.ndarray:
    """Predict a whole volume patch by patch.

    ``volume`` (C, X, Y, Z) float32 (normalised network input); ``predictor`` maps a batch of patches
    (B, C, P, P, P) to (B, C_out, P, P, P). Patches of edge ``patch_size`` overlap by ``overlap`` (0..1)
    and are blended with Gaussian weights; the volume is zero-padded where smaller than a patch.
    ``batch_size`` patches run at once. On CUDA the predictor runs under bf16 autocast with
    channels-last memory. Returns (C_out, X, Y, Z) float32, zero outside ``mask`` (X, Y, Z) when given.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    inputs = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].to(device)
    if is_cuda(device):
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda(device) else nullcontext()

    def run(patches: torch.Tensor) -> torch.Tensor:
        return predictor(patches).float()

    with torch.inference_mode(), autocast:
        output = sliding_window_inference(inputs, roi_size=(patch_size,) * 3, sw_batch_size=batch_size,
                                          predictor=run, overlap=overlap, mode="gaussian", padding_mode="constant",
                                          cval=0.0, progress=progress)
    result = output[0].float().cpu().numpy()
    if out_channels is not None and result.shape[0] != out_channels:
        raise ValueError(f"the network returned {result.shape[0]} channels, expected {out_channels}")
    if mask is not None:
        result *= np.asarray(mask, dtype=bool)[None]
    return result
