"""Data-driven start of a fresh generator with structure-tensor features: the anatomy guess, by least squares.

A CPU budget buys a few thousand small steps, too few for a UNet to discover from raw intensities that
white-matter fibres mostly run along the axis in which the tissue varies least. Two closed-form fits on the
training volumes give the network that guess at step 0, and training then spends its steps on what the
guess misses (tract context, the subject's MD):

1. contrast maps: the head's 1x1x1 contrast convolution is fitted (least squares, brain voxels) so that its
   maps approximate s (2 p - 1) of the white-matter probability p through tanh, map k with a softer s than map
   k - 1, so the structure tensors see the white-matter boundary instead of a random mix of channels;
2. shortcut: the zero-initialised 1x1x1 map from the structure features to the output is fitted (weighted
   least squares, white matter x3 as in the loss, ridge 1e-3) to the training targets minus their mean;
3. the backbone's last convolution starts at zero weights (its bias holds the mean target), so the first
   output is exactly mean + anatomy guess: a randomly initialised UNet adds a random tensor field of the
   same size, and measured on held-out volumes the first few hundred steps then spent their effort undoing
   it (WM V1 angle 27 -> 34 degrees while FA was learned) instead of improving on the guess.

Nothing here looks at validation or held-out data.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAX_VOXELS = 200_000  # per fit: a seeded subsample of the brain voxels keeps the normal equations small
RIDGE = 1e-3
CONTRAST_SHRINK = 0.9  # targets 0.9 (2 p - 1) keep atanh finite


def _least_squares(design: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Ridge solution (F + 1, T) of target (N, T) ~ [design (N, F), 1]; ``weights`` (N,) per voxel."""
    design = np.concatenate([design, np.ones((design.shape[0], 1))], axis=1)
    if weights is not None:
        root = np.sqrt(weights)[:, None]
        design, target = design * root, target * root
    gram = design.T @ design
    gram += RIDGE * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    return np.linalg.solve(gram, design.T @ target)


def _voxels(volumes: Sequence[dict[str, torch.Tensor]], rng: np.random.Generator):
    """Per volume: flat indices of a seeded subsample of brain voxels (at most MAX_VOXELS in all)."""
    counts = [int((volume["mask"][0] > 0).sum()) for volume in volumes]
    share = min(1.0, MAX_VOXELS / max(1, sum(counts)))
    chosen = []
    for volume, count in zip(volumes, counts):
        inside = np.flatnonzero(volume["mask"][0].numpy().reshape(-1) > 0)
        chosen.append(rng.choice(inside, size=max(1, int(count * share)), replace=False) if count else inside)
    return chosen


def initialise_structure_head(generator, modality: str, volumes: Sequence[dict[str, torch.Tensor]],
                              white_matter_weight: float = 3.0, seed: int = 0) -> bool:
    """Fit ``generator.heads[modality]``'s contrast maps and shortcut on training ``volumes``; True if done.

    ``volumes``: dicts of (C, X, Y, Z) tensors ``input``, ``target`` (network coordinates), ``mask`` and ``wm``.
    """
    head = generator.heads[modality]
    if head.structure is None or not volumes or any("wm" not in volume for volume in volumes):
        return False
    rng = np.random.default_rng(seed)
    chosen = _voxels(volumes, rng)
    flat = lambda tensor, index: tensor.reshape(tensor.shape[0], -1)[:, index].T.numpy().astype(np.float64)  # noqa: E731
    inputs = np.concatenate([flat(v["input"], i) for v, i in zip(volumes, chosen)])
    white = np.concatenate([flat(v["wm"], i) for v, i in zip(volumes, chosen)])[:, 0]
    shrink = CONTRAST_SHRINK / (1.0 + np.arange(head.structure.maps))
    wanted = np.arctanh(shrink[None] * (2.0 * np.clip(white, 0, 1) - 1.0)[:, None])
    solution = _least_squares(inputs, wanted)
    with torch.no_grad():
        head.structure.contrast.weight.copy_(torch.from_numpy(solution[:-1].T).reshape_as(head.structure.contrast.weight))
        head.structure.contrast.bias.copy_(torch.from_numpy(solution[-1]))
        features = [head.structure(v["input"][None].float())[0] for v in volumes]
    design = np.concatenate([flat(f, i) for f, i in zip(features, chosen)])
    target = np.concatenate([flat(v["target"], i) for v, i in zip(volumes, chosen)])
    weights = 1.0 + (white_matter_weight - 1.0) * np.clip(white, 0, 1)
    solution = _least_squares(design, target - target.mean(axis=0), weights)
    with torch.no_grad():
        head.shortcut.weight.copy_(torch.from_numpy(solution[:-1].T).reshape_as(head.shortcut.weight))
        head.shortcut.bias.copy_(torch.from_numpy(solution[-1]))
        generator.backbone.final_conv.weight.zero_()
    fitted = design @ solution[:-1] + solution[-1]
    explained = 1.0 - np.average(((target - target.mean(0)) - fitted) ** 2, weights=weights, axis=0).sum() / max(
        np.average((target - target.mean(0)) ** 2, weights=weights, axis=0).sum(), 1e-12)
    logger.info("structure head of %s fitted on %d voxels of %d volume(s): the shortcut explains %.0f%% of the "
                "weighted target variance", modality, design.shape[0], len(volumes), 100 * explained)
    return True
