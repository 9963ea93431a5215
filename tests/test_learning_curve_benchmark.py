"""The learning-curve benchmark (benchmarks/bench_learning_curve.py) in its tiny mode: it simulates and
preprocesses tiny subjects, trains the tiny model a few steps and writes its curve next to both baselines."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_learning_curve_benchmark_runs_in_tiny_mode(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_learning_curve.py"), "--tiny",
                                "--work", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    curve_dir = tmp_path / "learning-curve" / "t1w"
    assert (curve_dir / "learning_curve.png").stat().st_size > 0
    with open(curve_dir / "learning_curve.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [int(row["step"]) for row in rows] == [0, 3, 6]
    for row in rows:
        assert 0.0 <= float(row["v1_angle"]) <= 90.0
        assert float(row["fa_error"]) >= 0.0 and float(row["md_error"]) >= 0.0
        assert float(row["non_finite"]) == 0.0
