"""Non-learned predictors of the tensor, measured with the same evaluation as the network.

- tissue mean: per hard tissue label (CSF, GM, WM), the mean DWI tensor of the training subjects: what a
  network that learned nothing but the tissue classes would predict;
- anatomy: in white matter a cylinder along the axis in which the white-matter probability map varies
  least (smallest eigenvector of its structure tensor), with the training subjects' median WM FA and MD;
  the tissue mean elsewhere. On real data it tells how much a network adds beyond the shape of the anatomy.

Arrays: tissue probabilities (X, Y, Z) in [0, 1]; tensors (X, Y, Z, 6) BEP016 in mm^2/s.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from bssfp2dt.dti.eigen import eigh_tensor
from bssfp2dt.dti.logeuclid import tensor_from_eigen

TISSUES = ("CSF", "GM", "WM")
GRADIENT_SIGMA_MM = 1.0  # pre-smoothing of the WM map before its gradient
STRUCTURE_SIGMA_MM = 3.0  # integration scale of the structure tensor
WM_THRESHOLD = 0.5  # WM probability above which the anatomy cylinder replaces the tissue mean


def hard_labels(probabilities: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Index into TISSUES of the most probable tissue (X, Y, Z) from (X, Y, Z, 3) probabilities; -1 outside."""
    labels = np.argmax(probabilities, axis=-1)
    labels[~np.asarray(mask, dtype=bool)] = -1
    return labels


def tissue_mean_prediction(means: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 6): ``means[label]`` (means: (3, 6) mm^2/s per TISSUES entry) inside the brain, 0 outside."""
    return np.where((labels >= 0)[..., None], means[np.clip(labels, 0, None)], 0.0)


def cylinder_eigenvalues(fa: float, md: float) -> tuple[float, float]:
    """(axial, radial) diffusivities of the cylindrical tensor with this FA and MD (mm^2/s)."""
    fa = float(np.clip(fa, 0.0, 0.999))
    spread = md * fa * np.sqrt(3.0 / (9.0 - 6.0 * fa * fa))
    return md + 2.0 * spread, md - spread


def least_varying_axis(white_matter: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Unit vectors (X, Y, Z, 3): smallest eigenvector of the structure tensor of the WM probability map."""
    smoothed = ndimage.gaussian_filter(np.asarray(white_matter, dtype=np.float64), GRADIENT_SIGMA_MM / voxel_mm)
    gradient = np.stack(np.gradient(smoothed), axis=-1)
    products = np.stack([gradient[..., i] * gradient[..., j]
                         for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))], axis=-1)
    structure = ndimage.gaussian_filter(products, (STRUCTURE_SIGMA_MM / voxel_mm,) * 3 + (0,))
    return eigh_tensor(structure)[1][..., :, 2]


def anatomy_prediction(probabilities: np.ndarray, mask: np.ndarray, voxel_mm: float, means: np.ndarray,
                       wm_fa: float, wm_md: float) -> np.ndarray:
    """The anatomy predictor (X, Y, Z, 6) in mm^2/s; ``probabilities`` (X, Y, Z, 3) in TISSUES order."""
    labels = hard_labels(probabilities, mask)
    prediction = tissue_mean_prediction(means, labels)
    axial, radial = cylinder_eigenvalues(wm_fa, wm_md)
    axis = least_varying_axis(probabilities[..., 2], voxel_mm)
    helper = np.where(np.abs(axis[..., :1]) < 0.9, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    second = np.cross(axis, helper)
    second /= np.maximum(np.linalg.norm(second, axis=-1, keepdims=True), 1e-12)
    third = np.cross(axis, second)
    vectors = np.stack([axis, second, third], axis=-1)
    values = np.broadcast_to(np.array([axial, radial, radial]), axis.shape)
    cylinder = tensor_from_eigen(values, vectors)
    use = (probabilities[..., 2] > WM_THRESHOLD) & np.asarray(mask, dtype=bool)
    prediction[use] = cylinder[use]
    return prediction
