"""Whole-image similarity of a predicted tensor and the reference: PSNR, SSIM (MONAI, 3D) and FID.

All three work on the *normalised* tensor, as the network sees it: diagonal (D11, D22, D33) and
off-diagonal (D12, D13, D23) elements each min-max scaled to [0, 1] (the reference method's tensor
normalisation, ``bssfp2dt.preprocessing.normalization``), with the ranges of the model when given, else
fitted on the reference tensor inside the mask; the prediction is scaled with the same ranges, not clipped.

- PSNR = 10 log10(1 / MSE) dB, MSE over the mask voxels and the 6 channels (data range 1); MONAI ``PSNRMetric``.
- SSIM: MONAI's 3D SSIM map (Gaussian window 11 voxels, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid
  convolution), averaged over the 6 channels and over the window centres inside the mask; volumes zero
  outside the mask. Not computed (None, with a reason) if the volume is smaller than the window.
- FID: Frechet distance between Gaussians fitted to MedicalNet ResNet-10 (MONAI ``resnet10``, MedicalNet
  layout, weights from a local file) layer-4 features of prediction and reference. Each tensor channel is
  z-scored inside the mask and fed as a one-channel volume; every position of the feature map of every
  channel is one 512-dimensional sample. So a per-volume FID compares feature statistics within one
  subject (comparable across runs on the same grid, not with 2D-image FIDs). Not computed without a
  weights file. The matrix square root uses the symmetric form tr sqrt(S1^1/2 S2 S1^1/2), which stays real
  and finite for the rank-deficient covariances of few samples.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class ImageMetrics:
    """PSNR (dB), SSIM (unitless, <= 1) and FID (unitless); None where not computed, with the reason."""

    psnr: float | None
    ssim: float | None
    fid: float | None
    not_computed: dict[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, float | None]:
        """``{"psnr": ..., "ssim": ..., "fid": ...}``."""
        return {"psnr": self.psnr, "ssim": self.ssim, "fid": self.fid}


def normalised_tensors(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                       normalization=None) -> tuple[np.ndarray, np.ndarray]:
    """Both tensors (X, Y, Z, 6, mm^2/s) scaled to the network's [0, 1] range; float64, zero outside ``mask``.

    ``normalization``: a :class:`bssfp2dt.preprocessing.normalization.Normalization` with the tensor ranges
    (the model's); None fits them on the reference inside the mask.
    """
    from bssfp2dt.preprocessing.normalization import DIAGONAL, OFF_DIAGONAL, apply_range, fit_normalization

    mask = np.asarray(mask, dtype=bool)
    if normalization is None:
        normalization = fit_normalization(tensors=[reference], masks=[mask])
    scaled = []
    for name, tensor in (("prediction", predicted), ("reference", reference)):
        tensor = np.nan_to_num(np.asarray(tensor, dtype=np.float64))
        out = np.zeros(tensor.shape)
        for channels, value_range in ((DIAGONAL, normalization.require("tensor_diagonal")),
                                      (OFF_DIAGONAL, normalization.require("tensor_offdiagonal"))):
            out[..., list(channels)] = apply_range(tensor[..., list(channels)], value_range, mask, clip=False,
                                                   warn_fraction=1.0, name=name, dtype=np.float64)
        scaled.append(out)
    return scaled[0], scaled[1]


def psnr(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float | None:
    """PSNR in dB of normalised volumes (X, Y, Z, C) over the mask voxels; None when they are identical."""
    import torch
    from monai.metrics import PSNRMetric

    mask = np.asarray(mask, dtype=bool)
    prediction = torch.as_tensor(np.asarray(predicted, dtype=np.float64)[mask].reshape(1, 1, -1))
    target = torch.as_tensor(np.asarray(reference, dtype=np.float64)[mask].reshape(1, 1, -1))
    value = float(PSNRMetric(max_val=data_range)(prediction, target).item())
    return value if math.isfinite(value) else None


def ssim(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float | None:
    """Mean 3D SSIM of normalised volumes (X, Y, Z, C) over the mask (module docstring); None if too small."""
    import torch
    from monai.metrics.regression import compute_ssim_and_cs

    mask = np.asarray(mask, dtype=bool)
    if min(mask.shape) < SSIM_WINDOW:
        return None
    # (X, Y, Z, C) -> (1, C, X, Y, Z); MONAI computes in float32.
    prediction = torch.as_tensor(np.moveaxis(np.asarray(predicted, dtype=np.float32), -1, 0)[None].copy())
    target = torch.as_tensor(np.moveaxis(np.asarray(reference, dtype=np.float32), -1, 0)[None].copy())
    ssim_map, _ = compute_ssim_and_cs(prediction, target, spatial_dims=3,
                                      kernel_size=[SSIM_WINDOW] * 3, kernel_sigma=[SSIM_SIGMA] * 3,
                                      data_range=data_range)
    half = SSIM_WINDOW // 2
    centres = mask[half:-half, half:-half, half:-half]
    if not centres.any():
        return None
    return float(ssim_map[0].mean(dim=0).numpy()[centres].mean())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two samples (N, F) and (M, F) (sample covariances, ddof 1).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a^1/2 S_b S_a^1/2); unitless, >= 0.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two samples (N >= 2, F) with the same F, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    difference = a.mean(axis=0) - b.mean(axis=0)
    return float(max(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root, 0.0))


def medicalnet_samples(volume: np.ndarray, mask: np.ndarray, network) -> np.ndarray:
    """MedicalNet layer-4 features (C * positions, 512) of a volume (X, Y, Z, C); channels z-scored in the mask."""
    import torch

    from bssfp2dt.models.medicalnet import medicalnet_features

    mask = np.asarray(mask, dtype=bool)
    channels = np.moveaxis(np.asarray(volume, dtype=np.float64), -1, 0)
    scored = np.zeros(channels.shape, dtype=np.float32)
    for index, channel in enumerate(channels):
        inside = channel[mask]
        scored[index][mask] = (inside - inside.mean()) / (inside.std() + 1e-8)
    with torch.no_grad():
        features = medicalnet_features(network, torch.from_numpy(scored[:, None]))
    return features.permute(0, 2, 3, 4, 1).reshape(-1, features.shape[1]).double().numpy()


def fid(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray, weights_path: Path | str) -> float:
    """FID of normalised volumes (X, Y, Z, 6) on MedicalNet ResNet-10 features loaded from ``weights_path``.

    Raises :class:`bssfp2dt.errors.MissingInputError` when the file is absent or not MedicalNet ResNet-10.
    """
    from bssfp2dt.errors import MissingInputError

    path = Path(weights_path).expanduser().resolve()
    if not path.is_file():
        raise MissingInputError(f"FID weights file {path} does not exist; give the local MedicalNet ResNet-10 "
                                "weights or none to skip FID")
    network = _medicalnet(str(path), path.stat().st_mtime_ns)
    return frechet_distance(medicalnet_samples(predicted, mask, network), medicalnet_samples(reference, mask, network))


@functools.lru_cache(maxsize=1)
def _medicalnet(path: str, mtime_ns: int):
    """The frozen network of one weights file, kept for the next session pair (``mtime_ns`` keys a changed file)."""
    from bssfp2dt.models.medicalnet import build_medicalnet_resnet10, load_medicalnet_weights

    return load_medicalnet_weights(build_medicalnet_resnet10(), path).eval()


def image_metrics(predicted: np.ndarray, reference: np.ndarray, mask: np.ndarray, normalization=None,
                  fid_weights: Path | str | None = None) -> ImageMetrics:
    """PSNR, SSIM and (with ``fid_weights``, a local MedicalNet ResNet-10 file) FID of two tensors.

    Parameters
    ----------
    predicted, reference : (X, Y, Z, 6) BEP016 tensors, mm^2/s.
    mask : (X, Y, Z) bool brain mask.
    normalization : the model's tensor normalisation, or None to fit it on the reference.
    fid_weights : path of the MedicalNet weights, or None (FID reported as not computed).
    """
    scaled_prediction, scaled_reference = normalised_tensors(predicted, reference, mask, normalization)
    reasons = {}
    psnr_value = psnr(scaled_prediction, scaled_reference, mask)
    if psnr_value is None:
        reasons["psnr"] = "prediction identical to the reference inside the mask (infinite PSNR)"
    ssim_value = ssim(scaled_prediction, scaled_reference, mask)
    if ssim_value is None:
        reasons["ssim"] = (f"volume or mask smaller than the {SSIM_WINDOW}-voxel SSIM window "
                           f"(shape {tuple(np.shape(mask))})")
    fid_value = None
    if fid_weights is None:
        reasons["fid"] = "no MedicalNet ResNet-10 weights file given, so FID was not computed"
    else:
        fid_value = fid(scaled_prediction, scaled_reference, mask, fid_weights)
    return ImageMetrics(psnr=psnr_value, ssim=ssim_value, fid=fid_value, not_computed=reasons)
