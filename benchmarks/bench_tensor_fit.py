"""Speed of ``bssfp2dt.dti.fit.fit_tensor`` (WLS) against dipy's ``TensorModel(fit_method="WLS")``.

A 2 mm brain-sized volume (96 x 114 x 96) with an ellipsoid brain mask of ~200k voxels holds
synthetic DWI: the tensors of ``bench_dti_maps.brain_phantom``, S0 uniform in 500-1500, 65 volumes
(5 b0 + 60 directions on a Fibonacci sphere at b = 1000 s/mm^2), Rician-like noise (sigma 20).
Both methods fit the mask voxels only (``mask=``) and return full volumes, both with single-threaded
BLAS (``fit_tensor`` limits it itself; dipy is timed under the same limit). dipy computes in float32
for float32 data, hence differences ~1e-7 in the table. dipy also decomposes
every fitted tensor (part of its ``fit``), which ours leaves to ``dti.maps``; so the table also times
``fit_tensor`` followed by ``tensor_maps``.

Run: ``.venv/bin/python benchmarks/bench_tensor_fit.py [--dipy-voxels 20000]`` (dipy is timed on a
subset of the mask and extrapolated linearly, which the table says).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from threadpoolctl import threadpool_limits

from bench_dti_maps import best_time, brain_phantom, machine_description
from bssfp2dt.dti.eigen import dipy_to_bep016
from bssfp2dt.dti.fit import dwi_signal, fit_tensor
from bssfp2dt.dti.maps import tensor_maps

N_B0, N_DIRECTIONS, B_VALUE, NOISE_SIGMA = 5, 60, 1000.0, 20.0


def fibonacci_directions(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread evenly over the upper hemisphere (golden-angle spiral)."""
    index = np.arange(n) + 0.5
    z = 1.0 - index / n
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * index
    radius = np.sqrt(1.0 - z * z)
    return np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth), z], axis=1)


def phantom_dwi(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, Z, 65) float32 DWI, (65,) bvals, (65, 3) bvecs, (X, Y, Z) mask."""
    rng = np.random.default_rng(seed)
    tensor6, mask = brain_phantom(seed)
    bvals = np.concatenate([np.zeros(N_B0), np.full(N_DIRECTIONS, B_VALUE)])
    bvecs = np.concatenate([np.zeros((N_B0, 3)), fibonacci_directions(N_DIRECTIONS)])
    dwi = np.zeros(mask.shape + (bvals.size,), dtype=np.float32)
    s0 = rng.uniform(500.0, 1500.0, size=int(mask.sum()))
    clean = dwi_signal(tensor6[mask], s0, bvals, bvecs)
    noisy = np.abs(clean + rng.normal(scale=NOISE_SIGMA, size=clean.shape)
                   + 1j * rng.normal(scale=NOISE_SIGMA, size=clean.shape))
    dwi[mask] = noisy
    return dwi, bvals, bvecs, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dipy-voxels", type=int, default=20000,
                        help="mask voxels timed with dipy (extrapolated); 0 = the whole mask")
    parser.add_argument("--repeats", type=int, default=2, help="timings of ours; the best is kept")
    args = parser.parse_args()

    dwi, bvals, bvecs, mask = phantom_dwi()
    n_mask = int(mask.sum())
    model = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS")

    dipy_mask = mask.copy()
    if 0 < args.dipy_voxels < n_mask:
        dipy_mask.reshape(-1)[np.flatnonzero(mask)[args.dipy_voxels:]] = False
    n_dipy = int(dipy_mask.sum())
    with threadpool_limits(limits=1, user_api="blas"):  # as fit_tensor does: no BLAS thread contention
        start = time.perf_counter()
        dipy_fit = model.fit(dwi, mask=dipy_mask)
        t_dipy = (time.perf_counter() - start) * n_mask / n_dipy

    tensor6, _ = fit_tensor(dwi, bvals, bvecs, mask=mask)
    reference = dipy_to_bep016(dipy_fit.lower_triangular())[dipy_mask]
    relative = np.linalg.norm(tensor6[dipy_mask] - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
    t_ours = best_time(lambda: fit_tensor(dwi, bvals, bvecs, mask=mask), args.repeats)
    t_ours_maps = best_time(lambda: tensor_maps(fit_tensor(dwi, bvals, bvecs, mask=mask)[0], mask), 1)

    print(f"machine: {machine_description()}")
    print(f"DWI {dwi.shape}, {n_mask} mask voxels; median / 99th percentile relative tensor difference "
          f"ours vs dipy = {np.median(relative):.1e} / {np.percentile(relative, 99):.1e}")
    print(f"{'method':<44}{'time (s)':>10}{'ours faster by':>16}")
    print(f"{'ours: fit_tensor (WLS)':<44}{t_ours:>10.3f}{1.0:>15.1f}x")
    print(f"{'ours: fit_tensor + tensor_maps':<44}{t_ours_maps:>10.3f}{t_dipy / t_ours_maps:>15.1f}x")
    dipy_label = "dipy: TensorModel(WLS).fit" + (" *" if n_dipy < n_mask else "")
    print(f"{dipy_label:<44}{t_dipy:>10.3f}{t_dipy / t_ours:>15.1f}x")
    if n_dipy < n_mask:
        print(f"* timed on {n_dipy} voxels and extrapolated to {n_mask}")


if __name__ == "__main__":
    main()
