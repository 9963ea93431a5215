#!/usr/bin/env python3
"""Whole-volume inference time and peak memory of the ``small`` and ``reference`` generators.

Input: a 2 mm brain-sized volume (96 x 114 x 96 voxels, 24 channels, uniform noise; untrained weights,
since only the timing matters), 64^3 patches, overlap 0.5, Gaussian blending (what the participant level
runs). Each configuration runs in its own process, so the peak resident memory (CPU) or the peak
allocated GPU memory belongs to that configuration alone. On CPU, a configuration whose estimated time
exceeds ``--cpu-budget`` seconds is timed on a subset of patches and extrapolated to the whole volume
(the output says so). On a CUDA GPU (when one is visible) the run uses bf16 autocast and channels-last,
after one warm-up volume.

    .venv/bin/python benchmarks/bench_inference.py [--sizes small reference] [--cpu-budget 300]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SHAPE = (96, 114, 96)
CHANNELS = 24
PATCH = 64
OVERLAP = 0.5


def windows(shape=SHAPE, patch=PATCH, overlap=OVERLAP) -> int:
    """Number of sliding-window patches MONAI visits (its dense_patch_slices rule)."""
    interval = max(int(patch * (1 - overlap)), 1)
    total = 1
    for side in shape:
        side = max(side, patch)
        total *= next(d for d in range(side) if d * interval + patch >= side) + 1
    return total


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.system()} {platform.machine()}, {cpu}, {cores} usable core(s), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), GPU: {gpu}")


def worker(size: str, device_name: str, cpu_budget: float) -> dict:
    """Time one configuration in this process; returns a JSON-able record."""
    import numpy as np
    import torch

    from bssfp2dt.inference.device import configure_cpu_threads
    from bssfp2dt.inference.predict import predict_volume
    from bssfp2dt.models.generator import build_generator, count_parameters

    configure_cpu_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    device = torch.device(device_name)
    torch.manual_seed(0)
    generator = build_generator(size, ["pc-bssfp"]).to(device).eval()
    volume = np.random.default_rng(0).random((CHANNELS,) + SHAPE, dtype=np.float32)
    record = {"size": size, "device": device_name, "parameters": count_parameters(generator),
              "patches": windows(), "input": f"{CHANNELS}x" + "x".join(map(str, SHAPE))}

    def predictor(patches):
        return generator(patches, "pc-bssfp")

    def whole_volume() -> float:
        started = time.perf_counter()
        predict_volume(predictor, volume, patch_size=PATCH, overlap=OVERLAP, device=device, out_channels=6)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    if device.type == "cuda":
        whole_volume()  # warm-up: cuDNN autotuning and lazy allocations
        torch.cuda.reset_peak_memory_stats(device)
        record["seconds"] = min(whole_volume() for _ in range(3))
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        record["method"] = "best of 3 whole volumes (bf16 autocast)"
        return record
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    patch = torch.from_numpy(volume[None, :, :PATCH, :PATCH, :PATCH].copy())
    with torch.inference_mode():
        started = time.perf_counter()
        predictor(patch)
        per_patch = time.perf_counter() - started
    estimate = per_patch * record["patches"]
    if estimate <= cpu_budget:
        record["seconds"] = whole_volume()
        record["method"] = "one whole volume"
    else:
        record["seconds"] = estimate
        record["method"] = (f"EXTRAPOLATED: one 64^3 patch took {per_patch:.1f} s, x {record['patches']} patches "
                            f"(the whole volume would exceed the {cpu_budget:.0f} s budget)")
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["rss_before_inference_mib"] = rss_before
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "reference"])
    parser.add_argument("--cpu-budget", type=float, default=300.0, help="seconds per CPU configuration")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.cpu_budget)))
        return 0
    import torch

    print(f"machine: {machine()}")
    print(f"input {CHANNELS} x {' x '.join(map(str, SHAPE))} (2 mm brain), patch {PATCH}^3, overlap {OVERLAP}, "
          f"{windows()} patches; untrained weights")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for size in args.sizes:
            completed = subprocess.run([sys.executable, __file__, "--worker", size, device, "--cpu-budget",
                                        str(args.cpu_budget)], capture_output=True, text=True, check=False)
            if completed.returncode:
                print(f"{size} on {device} failed:\n{completed.stderr[-2000:]}")
                continue
            record = json.loads(completed.stdout.strip().splitlines()[-1])
            results.append(record)
            memory = (f"peak GPU memory {record['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in record else
                      f"peak RSS {record['peak_rss_mib']:.0f} MiB ({record['rss_before_inference_mib']:.0f} MiB "
                      "before inference)")
            print(f"{size:>9} on {device}: {record['parameters'] / 1e6:.2f} M parameters, "
                  f"{record['seconds']:.1f} s per volume ({record['seconds'] / record['patches']:.2f} s per patch), "
                  f"{memory}; {record['method']}")
    by_key = {(r["size"], r["device"]): r["seconds"] for r in results}
    for device in devices:
        if ("small", device) in by_key and ("reference", device) in by_key:
            print(f"reference / small time ratio on {device}: "
                  f"{by_key[('reference', device)] / by_key[('small', device)]:.1f}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
