"""The figures of ``benchmarks/gpu_check.sh``: whole-volume inference and one training step per model size.

For each size: the generator (pc-bSSFP head) in eval mode predicts one DOVE-size input (24 x 96 x 112 x 96,
the 2 mm grid padded to multiples of 16) as one whole-volume pass (:func:`bssfp2dt.inference.predict.predict_whole`)
and with 64^3 sliding windows (overlap 0.5, batch 4), bf16 autocast on CUDA: best of 3 after one warm-up, peak
GPU memory; then one generator + discriminator training step (64^3 patch, batch 1, AdamW) with its peak
memory. Writes ``figures.json`` and prints a table. ``--quick`` (the CPU path) uses the tiny size and a
32^3 input so it checks the script in seconds.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(function, device, repeats: int) -> float:
    import torch

    function()  # warm-up: cuDNN autotuning, lazy allocations
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def inference(size: str, shape: tuple[int, int, int], patch: int, device, repeats: int) -> dict:
    import numpy as np
    import torch

    from bssfp2dt.inference.predict import extent_dependent_layers, predict_volume, predict_whole
    from bssfp2dt.models.generator import build_generator, count_parameters

    torch.manual_seed(0)
    generator = build_generator(size, ["pc-bssfp"]).to(device).eval()
    volume = np.random.default_rng(0).random((24,) + shape, dtype=np.float32)

    def predictor(x):
        return generator(x, "pc-bssfp")

    record = {"size": size, "parameters": count_parameters(generator), "input": "24x" + "x".join(map(str, shape)),
              "extent_dependent_layers": len(extent_dependent_layers(generator))}
    reset_peak(device)
    record["whole_s"] = timed(lambda: predict_whole(predictor, volume, multiple=16, device=device, out_channels=6),
                              device, repeats)
    record["whole_peak_mib"] = peak_bytes(device) / 2 ** 20
    reset_peak(device)
    record["windows_s"] = timed(lambda: predict_volume(predictor, volume, patch_size=patch, overlap=0.5, batch_size=4,
                                                       device=device, out_channels=6), device, repeats)
    record["windows_peak_mib"] = peak_bytes(device) / 2 ** 20
    record["whole_vs_windows"] = record["windows_s"] / record["whole_s"]
    return record


def training_step(size: str, patch: int, device) -> dict:
    import torch

    from bssfp2dt.models.generator import build_generator
    from bssfp2dt.training.module import Bssfp2dtGAN

    torch.manual_seed(0)
    module = Bssfp2dtGAN(build_generator(size, ["pc-bssfp"]), "direct", "pc-bssfp").to(device).train()
    generator_optimiser, discriminator_optimiser = module.configure_optimizers()
    batch = {"input": torch.rand(1, 24, patch, patch, patch, device=device),
             "target": torch.rand(1, 6, patch, patch, patch, device=device)}

    def step():
        module.gan_step(batch, generator_optimiser, discriminator_optimiser, lambda loss: loss.backward())

    reset_peak(device)
    seconds = timed(step, device, 2)
    return {"size": size, "patch": patch, "step_s": seconds, "step_peak_mib": peak_bytes(device) / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny model, 32^3 input (checks the script on a CPU)")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device)
    sizes = ["tiny"] if args.quick else ["small", "reference"]
    shape, patch = ((32, 32, 32), 32) if args.quick else ((96, 112, 96), 64)
    repeats = 1 if args.quick else 3
    figures = {"machine": f"{platform.node()} {platform.machine()}", "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "autocast": "bf16" if device.type == "cuda" else "float32", "inference": [], "training": []}
    for size in sizes:
        figures["inference"].append(inference(size, shape, patch, device, repeats))
        print(json.dumps(figures["inference"][-1]), flush=True)
        figures["training"].append(training_step(size, patch if not args.quick else 32, device))
        print(json.dumps(figures["training"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\n{figures['device']} ({figures['autocast']})")
    print(f"{'size':<10}{'whole s':>9}{'MiB':>8}{'windows s':>11}{'MiB':>8}{'train step s':>14}{'MiB':>8}")
    for run, step in zip(figures["inference"], figures["training"]):
        print(f"{run['size']:<10}{run['whole_s']:>9.2f}{run['whole_peak_mib']:>8.0f}{run['windows_s']:>11.2f}"
              f"{run['windows_peak_mib']:>8.0f}{step['step_s']:>14.2f}{step['step_peak_mib']:>8.0f}")


if __name__ == "__main__":
    main()
