"""Simulator speed: one full-size DOVE-like subject (3 pc-bSSFP + 4 DWI sessions + T1w, MNI anatomy) and a
tiny test subject, wall-clock and CPU time, with the time per scan.

Run: .venv/bin/python benchmarks/bench_simulate.py
"""
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset


def _run(name, config):
    timings = {}
    with tempfile.TemporaryDirectory() as folder:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        simulate_dataset(Path(folder) / "bids", config, progress=False, timings=timings)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2 ** 20
    print(f"{name:<34} wall {wall:7.1f} s   cpu {cpu:7.1f} s   {size:7.0f} MiB written")
    for label, per_scan in timings.items():
        print("    sub-" + label + ": " + ", ".join(f"{k} {v:.1f}" for k, v in per_scan.items()))
    return wall


def main():
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    _run("tiny subject (1+1 sessions)", SimulationConfig(bssfp_sessions=1, dwi_sessions=1, anatomy="procedural",
                                                          phantom_scale=0.3, margin_mm=4.0, dwi_directions=(30, 30)))
    _run("tiny subject (3+4 sessions)", SimulationConfig(anatomy="procedural", phantom_scale=0.3, margin_mm=4.0,
                                                          dwi_directions=(30, 30)))
    _run("full-size DOVE-like subject (3+4)", SimulationConfig())
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")


if __name__ == "__main__":
    main()
