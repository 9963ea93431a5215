"""Step-by-step time of the preprocessing workflow on one full-size simulated subject.

Simulates (unless ``--bids-dir`` is given) ``bssfp2dt-simulate OUT --subjects 1 --bssfp-sessions 1
--dwi-sessions 1`` (MNI anatomy, 1 mm T1w, 1.4 mm pc-bSSFP, 2 mm DWI), runs
:func:`bssfp2dt.preprocessing.workflow.run_preprocessing` with the default settings (Gibbs, DWI motion
correction; ``--no-motion-correction`` / ``--no-gibbs`` to leave them out) in a fresh work directory,
prints every step's time from the provenance records, then reruns with the same work directory: the
rerun is the cached reference (it should execute nothing), measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_preprocessing.py [--work /tmp/bench_preproc] [--nprocs 1]``
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()} {platform.processor() or ''} {cores} cores available, Python {sys.version.split()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_preproc"))
    parser.add_argument("--bids-dir", type=Path, help="an existing simulated dataset (skips simulation)")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--no-motion-correction", action="store_true")
    parser.add_argument("--no-gibbs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bssfp2dt.config import (Config, ModelSettings, PathSettings, ResourceSettings, RunSettings,
                                 SelectionSettings)
    from bssfp2dt.io import bids as bids_io
    from bssfp2dt.preprocessing.pipeline import PreprocSettings
    from bssfp2dt.preprocessing.workflow import run_preprocessing
    from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset

    print(f"machine: {machine_description()} (shared with other users: timings are indicative)")
    bids_dir = args.bids_dir
    if bids_dir is None:
        bids_dir = args.work / "bids"
        if not bids_dir.exists():
            started = time.perf_counter()
            simulate_dataset(bids_dir, SimulationConfig(n_subjects=1, bssfp_sessions=1, dwi_sessions=1), progress=False)
            print(f"simulation: {time.perf_counter() - started:.1f} s")
    work = args.work / "work"
    shutil.rmtree(work, ignore_errors=True)
    config = Config(paths=PathSettings(bids_dir=bids_dir.resolve(), output_dir=args.work / "out", work_dir=work),
                    selection=SelectionSettings(analysis_level="participant",
                                                bids_queries=json.dumps(bids_io.DEFAULT_QUERIES)),
                    resources=ResourceSettings(nprocs=args.nprocs, omp_nthreads=1), run=RunSettings(run_uuid="bench"))
    inputs = bids_io.discover(config)[0]
    for session in inputs.sessions:
        print(session.describe())
    settings = PreprocSettings(gibbs=not args.no_gibbs, motion_correction=not args.no_motion_correction)
    started = time.perf_counter()
    result = run_preprocessing(config, inputs, settings)
    first = time.perf_counter() - started
    started = time.perf_counter()
    run_preprocessing(config, inputs, settings)
    cached = time.perf_counter() - started
    record = json.loads(result.sessions[0].provenance.read_text())
    print(f"\n{'step':<28}{'seconds':>10}")
    for step in record["steps"]:
        print(f"{step['step']:<28}{step['seconds']:>10.1f}")
    print(f"{'sum of steps':<28}{sum(step['seconds'] for step in record['steps']):>10.1f}")
    print(f"{'workflow wall time':<28}{first:>10.1f}")
    print(f"{'rerun (all cached)':<28}{cached:>10.1f}   ratio first/cached {first / cached:.0f}x")


if __name__ == "__main__":
    main()
