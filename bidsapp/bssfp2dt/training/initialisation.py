"""Data-driven start of a fresh generator with structure-tensor features: the anatomy guess, by least squares.

A CPU budget buys a few thousand small steps, too few for a UNet to discover from raw intensities that
white-matter fibres mostly run along the axis in which the tissue varies least. Two closed-form fits on the
training volumes give the network that guess at step 0, and training then spends its steps on what the
guess misses (tract context, the subject's MD):

1. contrast maps: the head's small contrast network (3x3x3 conv, tanh, 1x1x1 conv) is fitted (Adam on the
   3x3x3 neighbourhoods of brain voxels, mean squared error) so that its maps approximate s (2 p - 1) of the
   white-matter probability p through tanh, map k with a softer s than map k - 1, so the structure tensors
   see the white-matter boundary instead of a random mix of channels;
2. shortcut: the zero-initialised 1x1x1 map from the structure features to the output is fitted (weighted
   least squares, white matter x3 as in the loss, ridge 1e-3) to the training targets minus their mean;
3. with phase-cycle profile features (pc-bSSFP), the head's small per-voxel map from the standardised profile
   to the output is fitted (full-batch Adam, weighted squared error) to what the linear shortcut leaves;
4. the backbone's last convolution starts at zero weights (its bias holds the mean target), so the first
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

from bssfp2dt.training.calibration import median_anisotropy_ratio

logger = logging.getLogger(__name__)

MAX_VOXELS = 200_000  # per fit: a seeded subsample of the brain voxels keeps the normal equations small
RIDGE = 1e-3
CONTRAST_SHRINK = 0.9  # targets 0.9 (2 p - 1), inside tanh's range
CONTRAST_VOXELS = 40_000  # neighbourhoods in the contrast network's fit
CONTRAST_STEPS = 400
CONTRAST_RATE = 3e-3
IDENTITY6 = np.array([1.0, 0, 0, 1, 0, 1])
VOXEL_MAP_VOXELS = 60_000  # voxels in the per-voxel profile map's fit
VOXEL_MAP_STEPS = 600
VOXEL_MAP_RATE = 3e-3


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


def _neighbourhoods(volume: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """(N, C, 3, 3, 3) neighbourhoods of the flat voxel ``index`` (N,) of ``volume`` (C, X, Y, Z), replicate
    borders (as the contrast network's padding)."""
    padded = torch.nn.functional.pad(volume[None], (1, 1, 1, 1, 1, 1), mode="replicate")[0]
    x, y, z = np.unravel_index(index, volume.shape[1:])
    offsets = np.arange(3)
    grid = np.ix_(np.arange(len(index)), offsets, offsets, offsets)
    return padded[:, x[grid[0]] + grid[1], y[grid[0]] + grid[2], z[grid[0]] + grid[3]].movedim(0, 1)


def _fit_contrast(structure, volumes, chosen, rng: np.random.Generator, seed: int) -> None:
    """Fit ``structure.contrast`` (3x3x3 conv, tanh, 1x1x1 conv) so that tanh of its maps follows the scaled
    white-matter probability at a subsample of the ``chosen`` voxels (full-batch Adam, CONTRAST_STEPS)."""
    share = min(1.0, CONTRAST_VOXELS / max(1, sum(len(index) for index in chosen)))
    picked = [rng.choice(index, size=max(1, int(len(index) * share)), replace=False) for index in chosen]
    inputs = torch.cat([_neighbourhoods(v["input"].float(), i) for v, i in zip(volumes, picked)])
    white = torch.cat([v["wm"].float().reshape(-1)[torch.from_numpy(i)] for v, i in zip(volumes, picked)])
    shrink = torch.tensor(CONTRAST_SHRINK / (1.0 + np.arange(structure.maps)), dtype=torch.float32)
    wanted = shrink[None] * (2.0 * white.clamp(0, 1) - 1.0)[:, None]
    first, last = structure.contrast[0], structure.contrast[2]
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(structure.contrast.parameters(), lr=CONTRAST_RATE)
    flat_inputs = inputs.reshape(len(inputs), -1)
    for _ in range(CONTRAST_STEPS):
        hidden = torch.tanh(flat_inputs @ first.weight.reshape(first.out_channels, -1).T + first.bias)
        loss = ((torch.tanh(hidden @ last.weight.reshape(last.out_channels, -1).T + last.bias) - wanted) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    explained = 1.0 - loss.item() / float(wanted.var(dim=0).mean())
    logger.info("contrast maps fitted to the white-matter probability on %d voxels: %.0f%% of its variance "
                "explained", len(inputs), 100 * explained)


def _calibrate_anisotropy(solution: np.ndarray, design: np.ndarray, target: np.ndarray,
                          white: np.ndarray) -> np.ndarray:
    """Scale the trace-free part of the shortcut's map (``solution`` (F + 1, 6)) so that the median anisotropy
    of mean + shortcut in white matter (p > 0.8) matches the targets': least squares under an uncertain axis
    shrinks anisotropy (measured: predicted / true FA 0.55), the direction it points in is kept."""
    region = white > 0.8
    if region.sum() < 10:
        return solution
    fitted = design[region] @ solution[:-1] + solution[-1] + target.mean(axis=0)
    factor = median_anisotropy_ratio(target[region], fitted)
    trace_part = (solution[:, [0, 3, 5]].sum(axis=1, keepdims=True) / 3.0) * IDENTITY6
    logger.info("shortcut anisotropy scaled x%.2f to the training targets' white-matter median", factor)
    return trace_part + factor * (solution - trace_part)


def initialise_structure_head(generator, modality: str, volumes: Sequence[dict[str, torch.Tensor]],
                              white_matter_weight: float = 3.0, seed: int = 0, azimuth_free: bool = False) -> bool:
    """Fit ``generator.heads[modality]``'s contrast maps and shortcut on training ``volumes``; True if done.

    ``volumes``: dicts of (C, X, Y, Z) tensors ``input``, ``target`` (network coordinates), ``mask`` and ``wm``.
    ``azimuth_free``: fit the targets the azimuth-free loss compares with (``losses.canonical_azimuth``).
    """
    head = generator.heads[modality]
    if head.shortcut is None or not volumes or any("wm" not in volume for volume in volumes):
        return False
    if azimuth_free:
        from bssfp2dt.training.losses import canonical_azimuth

        volumes = [{**volume, "target": canonical_azimuth(volume["target"][None])[0]} for volume in volumes]
    rng = np.random.default_rng(seed)
    chosen = _voxels(volumes, rng)
    flat = lambda tensor, index: tensor.reshape(tensor.shape[0], -1)[:, index].T.numpy().astype(np.float64)  # noqa: E731
    white = np.concatenate([flat(v["wm"], i) for v, i in zip(volumes, chosen)])[:, 0]
    if head.structure is not None:
        _fit_contrast(head.structure, volumes, chosen, rng, seed)
    with torch.no_grad():
        inputs = [v["input"][None].float() for v in volumes]
        features = [head.shortcut_inputs(x, head.auxiliary_features(x))[0] for x in inputs]
    design = np.concatenate([flat(f, i) for f, i in zip(features, chosen)])
    target = np.concatenate([flat(v["target"], i) for v, i in zip(volumes, chosen)])
    weights = 1.0 + (white_matter_weight - 1.0) * np.clip(white, 0, 1)
    solution = _least_squares(design, target - target.mean(axis=0), weights)
    solution = _calibrate_anisotropy(solution, design, target, white)
    with torch.no_grad():
        head.shortcut.weight.copy_(torch.from_numpy(solution[:-1].T).reshape_as(head.shortcut.weight))
        head.shortcut.bias.copy_(torch.from_numpy(solution[-1]))
        generator.backbone.final_conv.weight.zero_()
    fitted = design @ solution[:-1] + solution[-1]
    if head.voxel_map is not None:
        fitted = fitted + _fit_voxel_map(head, design, target - target.mean(axis=0) - fitted, weights, seed)
    explained = 1.0 - np.average(((target - target.mean(0)) - fitted) ** 2, weights=weights, axis=0).sum() / max(
        np.average((target - target.mean(0)) ** 2, weights=weights, axis=0).sum(), 1e-12)
    logger.info("structure head of %s fitted on %d voxels of %d volume(s): the shortcut explains %.0f%% of the "
                "weighted target variance", modality, design.shape[0], len(volumes), 100 * explained)
    return True


def _fit_voxel_map(head, design: np.ndarray, residual: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """Fit the head's per-voxel profile map to what the linear shortcut leaves (``residual`` (N, 6)) on the
    profile part of ``design`` (N, F): standardisation from these voxels, then full-batch Adam on the weighted
    squared error (VOXEL_MAP_STEPS, cosine rate). Returns the map's fitted values (N, 6)."""
    profile = head.profile_shape(design)
    mean, scale = profile.mean(axis=0), profile.std(axis=0) + 1e-6
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(profile), size=min(len(profile), VOXEL_MAP_VOXELS), replace=False)
    inputs = torch.from_numpy(((profile[picked] - mean) / scale).astype(np.float32))
    wanted = torch.from_numpy(residual[picked].astype(np.float32))
    weight = torch.from_numpy((weights[picked] / weights[picked].mean()).astype(np.float32))[:, None]
    optimiser = torch.optim.Adam(head.voxel_map.parameters(), lr=VOXEL_MAP_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, VOXEL_MAP_STEPS)

    def forward(x: torch.Tensor) -> torch.Tensor:  # voxels (N, F) through the 1x1x1 map as a (1, F, N, 1, 1) image
        return head.voxel_map(x.T[None, :, :, None, None])[0, :, :, 0, 0].T

    for _ in range(VOXEL_MAP_STEPS):
        loss = (weight * (forward(inputs) - wanted) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        head.profile_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        head.profile_scale.copy_(torch.from_numpy(scale.astype(np.float32)))
        head.profile_bounded.fill_(True)
        fitted = forward(torch.from_numpy(((profile - mean) / scale).astype(np.float32))).numpy().astype(np.float64)
    before = float(np.average((residual ** 2).sum(axis=1), weights=weights))
    after = float(np.average(((residual - fitted) ** 2).sum(axis=1), weights=weights))
    logger.info("per-voxel profile map fitted on %d voxels: %.0f%% of what the linear shortcut leaves explained",
                len(picked), 100 * (1.0 - after / max(before, 1e-12)))
    return fitted
