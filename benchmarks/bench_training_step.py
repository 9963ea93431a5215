"""Benchmark one generator + discriminator training step on CPU (time per step and peak RSS) per model size.

Each size runs in its own child process so its peak RSS is its own. Perceptual loss disabled (no weights file);
input pc-bSSFP (24 channels), direct stage, AdamW. The first step (warm-up: allocation, oneDNN kernel choice)
is reported separately from the mean of the following ones. Ratios are against the ``small`` size measured
in the same run.

Usage: .venv/bin/python benchmarks/bench_training_step.py [--sizes small reference] [--patch 64] [--steps 3]
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


def machine(threads: int | None) -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return (f"{platform.machine()} {model}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} "
            f"with {threads or torch.get_num_threads()} intra-op threads, Python {platform.python_version()}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_one(size: str, patch: int, steps: int, threads: int | None) -> dict:
    import torch

    from bssfp2dt.models.generator import build_generator, count_parameters
    from bssfp2dt.training.module import Bssfp2dtGAN

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = Bssfp2dtGAN(build_generator(size, ["pc-bssfp"]), "direct", "pc-bssfp").train()
    generator_optimiser, discriminator_optimiser = module.configure_optimizers()
    batch = {"input": torch.rand(1, 24, patch, patch, patch), "target": torch.rand(1, 6, patch, patch, patch)}
    rss_before = peak_rss_mib()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        module.gan_step(batch, generator_optimiser, discriminator_optimiser, lambda loss: loss.backward())
        durations.append(time.perf_counter() - start)
    return {"size": size, "patch": patch, "generator_parameters": count_parameters(module.generator),
            "discriminator_parameters": count_parameters(module.discriminator), "first_step_s": durations[0],
            "later_steps_mean_s": sum(durations[1:]) / max(len(durations) - 1, 1), "steps": steps,
            "peak_rss_before_step_mib": rss_before, "peak_rss_mib": peak_rss_mib()}


def bench_ssim(patch: int, threads: int | None, repeats: int = 2) -> dict:
    """Forward + backward of the SSIM term on (1, 6, patch^3): MONAI's full-kernel SSIMLoss (the reference)
    against the separable ``ssim_3d`` the loss uses; best of ``repeats``."""
    import torch
    from monai.losses import SSIMLoss

    from bssfp2dt.training.losses import ssim_3d

    if threads:
        torch.set_num_threads(threads)
    target = torch.rand(1, 6, patch, patch, patch)
    monai_loss = SSIMLoss(spatial_dims=3, data_range=1.0)
    timings = {}
    candidates = [("monai", lambda p: monai_loss(p, target)), ("separable", lambda p: 1 - ssim_3d(p, target).mean())]
    for name, function in candidates:
        best = float("inf")
        for _ in range(repeats):
            prediction = torch.rand(1, 6, patch, patch, patch, requires_grad=True)
            start = time.perf_counter()
            function(prediction).backward()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "reference"])
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side in voxels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3, help="steps per size (>= 2: the first is warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ssim":
        print(json.dumps(bench_ssim(args.patch, args.threads)))
        return
    if args.child:
        print(json.dumps(run_one(args.child, args.patch, args.steps, args.threads)))
        return

    print(f"machine: {machine(args.threads)}")
    print(f"one G+D step, batch 1, patch {args.patch}^3, {args.steps} steps per size")
    results = {}
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", size, "--patch", str(args.patch), "--steps", str(args.steps)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[size] = result = json.loads(output.strip().splitlines()[-1])
        print(f"{size:>10}: G {result['generator_parameters'] / 1e6:6.2f} M + D "
              f"{result['discriminator_parameters'] / 1e6:5.2f} M parameters; first step "
              f"{result['first_step_s']:7.2f} s, later steps {result['later_steps_mean_s']:7.2f} s; peak RSS "
              f"{result['peak_rss_mib']:7.0f} MiB (model only: {result['peak_rss_before_step_mib']:.0f} MiB)")
    command = [sys.executable, __file__, "--child", "ssim", "--patch", str(args.patch)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    ssim = json.loads(output.strip().splitlines()[-1])
    print(f"SSIM term fwd+bwd (1, 6, {args.patch}^3): MONAI SSIMLoss {ssim['monai']:.2f} s, separable ssim_3d "
          f"{ssim['separable']:.3f} s ({ssim['monai'] / ssim['separable']:.0f}x faster)")
    if "small" in results:
        base = results["small"]["later_steps_mean_s"]
        for size, result in results.items():
            print(f"{size:>10}: {result['later_steps_mean_s'] / base:6.1f} x the small model's step time")


if __name__ == "__main__":
    main()
