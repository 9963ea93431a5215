"""Anisotropy calibration of a trained log-Euclidean generator.

A regression network that is unsure of a fibre's axis hedges between the candidate axes, and the average of
differently oriented cylinders is flatter than any of them: the eigenvectors it predicts are the best it can
do, but its FA is shrunk (measured on held-out simulated subjects: predicted / true FA 0.71 for pc-bSSFP,
0.83 for T1w). After training, one gain per input head rescales the trace-free part of the output so that the
median white-matter anisotropy on the training volumes matches the targets'; the eigenvectors and the MD are
unchanged (``models.generator.scale_anisotropy``). The gain lives in the weights (the head's
``anisotropy_gain`` buffer), so every consumer of the checkpoint gets the calibrated output.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from bssfp2dt.inference.predict import predict_whole
from bssfp2dt.models.generator import PATCH_MULTIPLE
from bssfp2dt.training.losses import deviatoric_norm

logger = logging.getLogger(__name__)

WHITE_MATTER_PROBABILITY = 0.8  # white matter for the calibration: the same threshold as validation
GAIN_LIMITS = (0.5, 3.0)  # a gain outside these means a broken model or data, not a hedge: refuse it


def median_anisotropy_ratio(target: np.ndarray, prediction: np.ndarray) -> float:
    """Median deviatoric norm of ``target`` over that of ``prediction`` (log-tensors (N, 6)); 1 when either is
    empty or the prediction is isotropic."""
    if target.shape[0] == 0:
        return 1.0
    norms = [float(np.median(deviatoric_norm(torch.from_numpy(values))[:, 0].numpy()))
             for values in (target, prediction)]
    return norms[0] / norms[1] if norms[1] > 1e-6 else 1.0


def white_matter_log_tensors(generator, modality: str,
                             volume: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(target, prediction) log-tensors (N, 6) float64 at the white-matter voxels (mask and p_WM > 0.8) of one
    whole ``volume`` (dict of (C, X, Y, Z) tensors ``input``, ``target``, ``mask``, ``wm``)."""
    output = predict_whole(lambda x: generator(x, modality), volume["input"].numpy(), multiple=PATCH_MULTIPLE)
    region = ((volume["mask"][0] > 0) & (volume["wm"][0] > WHITE_MATTER_PROBABILITY)).numpy()
    return volume["target"].numpy()[:, region].T.astype(np.float64), output[:, region].T.astype(np.float64)


def calibrate_anisotropy(generator, modality: str, volumes: Sequence[dict[str, torch.Tensor]]) -> float:
    """Multiply ``generator.heads[modality].anisotropy_gain`` by the median white-matter anisotropy ratio of
    target to prediction on ``volumes`` (whole training volumes); return the factor applied (1.0: nothing
    to calibrate on, or a factor outside ``GAIN_LIMITS``, which is logged and not applied)."""
    usable = [volume for volume in volumes if "wm" in volume]
    if not usable:
        logger.info("anisotropy calibration skipped: no white-matter map in the training volumes")
        return 1.0
    was_training = generator.training
    generator.eval()
    pairs = [white_matter_log_tensors(generator, modality, volume) for volume in usable]
    generator.train(was_training)
    factor = median_anisotropy_ratio(np.concatenate([target for target, _ in pairs]),
                                     np.concatenate([prediction for _, prediction in pairs]))
    if not GAIN_LIMITS[0] <= factor <= GAIN_LIMITS[1]:
        logger.warning("anisotropy calibration factor %.2f is outside %s: not applied", factor, GAIN_LIMITS)
        return 1.0
    head = generator.heads[modality]
    with torch.no_grad():
        head.anisotropy_gain.mul_(factor)
    logger.info("anisotropy of the %s output scaled x%.3f to the training targets' white-matter median (%d volumes)",
                modality, factor, len(usable))
    return factor
