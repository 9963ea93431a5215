"""Speed of ``bssfp2dt.dti.maps.tensor_maps`` against dipy and against a per-voxel numpy loop.

A 2 mm brain-sized volume (96 x 114 x 96) with an ellipsoid brain mask of ~200k voxels holds
synthetic tensors: a random orientation and random eigenvalues per voxel for white matter
(l1 1.2-1.9e-3, l2 0.3-0.7e-3, l3 0.2-0.6e-3 mm^2/s), grey matter (0.7-1.0e-3 each) and CSF
(2.8-3.2e-3 each), plus a little symmetric noise as a fit would leave (so no voxel is exactly
isotropic or cylindrical). Every method produces the same full-volume maps (FA, MD, AD, RD, colour-FA;
ours also V1, inclination, azimuth):

- ours: ``tensor_maps(tensor6, mask)`` (float64 maps).
- dipy: BEP016 -> 3x3 matrices of the mask voxels, ``decompose_tensor``, ``fractional_anisotropy``,
  ``mean_diffusivity``, ``axial_diffusivity``, ``radial_diffusivity``, ``color_fa``, scattered into
  full volumes (what ``TensorModel.fit(mask=...)`` + ``TensorFit`` properties do).
- loop: ``numpy.linalg.eigh`` and the same formulas voxel by voxel in Python, timed on a subset of
  voxels and extrapolated linearly to the whole mask.

Run: ``.venv/bin/python benchmarks/bench_dti_maps.py [--loop-voxels 5000] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from dipy.reconst import dti as dipy_dti

from bssfp2dt.dti.eigen import bep016_to_matrix, matrix_to_bep016
from bssfp2dt.dti.maps import tensor_maps

SHAPE = (96, 114, 96)
SEMI_AXES = (34.0, 42.0, 34.0)  # voxels; 4/3 pi abc ~ 203k voxels


def brain_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z, 6) BEP016 tensors in mm^2/s and the (X, Y, Z) bool ellipsoid mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"), axis=-1)
    radius = np.sqrt(((grid / np.asarray(SEMI_AXES)) ** 2).sum(-1))
    mask = radius <= 1.0
    n = int(mask.sum())
    tissue = rng.choice(3, size=n, p=[0.45, 0.4, 0.15])  # WM, GM, CSF
    low = np.array([[1.2e-3, 0.3e-3, 0.2e-3], [0.7e-3] * 3, [2.8e-3] * 3])
    high = np.array([[1.9e-3, 0.7e-3, 0.6e-3], [1.0e-3] * 3, [3.2e-3] * 3])
    evals = rng.uniform(low[tissue], high[tissue])
    rotations, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    matrices = rotations @ (evals[:, :, None] * np.swapaxes(rotations, 1, 2))
    noise = rng.normal(scale=2e-5, size=(n, 6))
    tensor6 = np.zeros(SHAPE + (6,))
    tensor6[mask] = matrix_to_bep016(matrices) + noise
    return tensor6, mask


def dipy_maps(tensor6: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The same maps with dipy's functions on the mask voxels, scattered into full volumes."""
    evals, evecs = dipy_dti.decompose_tensor(bep016_to_matrix(tensor6[mask]))
    fa = dipy_dti.fractional_anisotropy(evals)
    values = {"fa": fa, "md": dipy_dti.mean_diffusivity(evals), "ad": dipy_dti.axial_diffusivity(evals),
              "rd": dipy_dti.radial_diffusivity(evals), "rgb": dipy_dti.color_fa(fa, evecs)}
    maps = {}
    for name, inside in values.items():
        maps[name] = np.zeros(mask.shape + inside.shape[1:])
        maps[name][mask] = inside
    return maps


def loop_maps(matrices: np.ndarray) -> np.ndarray:
    """FA, MD, AD, RD, colour-FA per voxel with numpy.linalg.eigh: (V, 3, 3) -> (V, 7)."""
    out = np.empty((matrices.shape[0], 7))
    for voxel, matrix in enumerate(matrices):
        evals, evecs = np.linalg.eigh(matrix)
        evals = np.maximum(evals[::-1], 0.0)
        mean = evals.mean()
        norm_sq = (evals * evals).sum()
        fa = np.sqrt(1.5 * ((evals - mean) ** 2).sum() / norm_sq) if norm_sq > 0 else 0.0
        out[voxel, :4] = fa, mean, evals[0], 0.5 * (evals[1] + evals[2])
        out[voxel, 4:] = np.abs(evecs[:, 2]) * min(max(fa, 0.0), 1.0)
    return out


def machine_description() -> str:
    """Architecture, CPU model (``platform.processor()``, else /proc/cpuinfo), core count, numpy version."""
    model = platform.processor()
    if not model:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            model = "unknown CPU"
    return f"{platform.machine()} {model}, {os.cpu_count()} logical cores, numpy {np.__version__}"


def best_time(function, repeats: int) -> float:
    """Shortest wall time (s) of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop-voxels", type=int, default=5000, help="voxels timed in the per-voxel loop")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method; the best is kept")
    args = parser.parse_args()

    tensor6, mask = brain_phantom()
    n_mask = int(mask.sum())
    ours = tensor_maps(tensor6, mask)
    reference = dipy_maps(tensor6, mask)
    worst = max(float(np.abs(ours[name] - reference[name]).max()) / scale
                for name, scale in (("fa", 1.0), ("md", 3e-3), ("ad", 3e-3), ("rd", 3e-3), ("rgb", 1.0)))

    t_ours = best_time(lambda: tensor_maps(tensor6, mask), args.repeats)
    t_dipy = best_time(lambda: dipy_maps(tensor6, mask), args.repeats)
    subset = bep016_to_matrix(tensor6[mask][:args.loop_voxels])
    t_loop = best_time(lambda: loop_maps(subset), args.repeats) * n_mask / subset.shape[0]

    print(f"machine: {machine_description()}")
    print(f"volume {SHAPE}, {n_mask} mask voxels; max |ours - dipy| (FA, RGB; diffusivities / 3e-3) = {worst:.1e}")
    print(f"{'method':<42}{'time (s)':>10}{'ours faster by':>16}")
    print(f"{'ours: tensor_maps (closed form)':<42}{t_ours:>10.3f}{1.0:>15.1f}x")
    print(f"{'dipy: decompose_tensor + FA/MD/AD/RD/RGB':<42}{t_dipy:>10.3f}{t_dipy / t_ours:>15.1f}x")
    print(f"{'loop: numpy.linalg.eigh per voxel *':<42}{t_loop:>10.3f}{t_loop / t_ours:>15.1f}x")
    print(f"* timed on {subset.shape[0]} voxels and extrapolated to {n_mask}")


if __name__ == "__main__":
    main()
