"""The modality benchmark (benchmarks/bench_modalities.py) in its tiny mode: both settings are simulated and
preprocessed, the four input modalities trained a few steps and evaluated on held-out subjects against the
simulator's truth, next to the DWI-fit and random-axis references."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_modalities import (ANGLE_METRICS, METRICS, REFERENCES, SETTINGS,  # noqa: E402
                              modality_names)

# The tiny phantom's CSF lies outside the pipeline's brain mask (its T1w-based mask keeps the brain tissue), so
# its CSF row is empty there; white and grey matter must have every number.
FILLED_TISSUES = ("GM", "WM")


@pytest.mark.slow
def test_modalities_benchmark_runs_in_tiny_mode(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_modalities.py"), "--tiny",
                                "--work", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = tmp_path / "results"
    for setting in SETTINGS:
        assert (results / f"modalities_{setting}.png").stat().st_size > 0
        table = (results / f"modalities_{setting}.md").read_text()
        result = json.loads((results / f"modalities_{setting}.json").read_text())
        assert list(result["results"]) == list(modality_names())
        columns = {**result["results"], **{name: result["references"][name] for name in REFERENCES}}
        for name, values in columns.items():
            expected = ANGLE_METRICS if name in ("random-axes", "b0-only-axes") else METRICS
            assert set(expected) <= set(values), name
            for metric in expected:
                for tissue in FILLED_TISSUES:
                    value = values[metric][tissue]
                    assert math.isfinite(value) and value >= 0.0, (setting, name, metric, tissue, value)
                    if metric in ANGLE_METRICS:
                        assert value <= 180.0
        assert all(steps == 3 for steps in result["steps"].values())
        # the physics-only reference knows each axis' angle to B0 exactly
        assert result["references"]["b0-only-axes"]["b0_inclination"]["WM"] == pytest.approx(0.0, abs=1e-6)
        assert result["references"]["random-axes"]["b0_inclination"]["WM"] > 15.0
        assert all(angle < 10.0 for angle in result["b0_angle_to_grid_z_deg"].values())
        assert "| inclination to B0 (axis) | WM |" in table
        # the azimuth about B0 is asked of the DT autoencoder only in the random-fibre setting
        expected_recipes = {m: "log-euclidean" if setting == "realistic" else "log-euclidean-azimuth-free"
                            for m in modality_names()}
        expected_recipes["dwi-tensor"] = "log-euclidean-input-shortcut"
        assert result["training"]["recipes"] == expected_recipes
        # the autoencoder starts as the identity: a few steps leave it near its own input, the DWI fit
        dt, fit = result["results"]["dwi-tensor"], result["references"]["dwi-fit"]
        assert dt["v1angle"]["WM"] < fit["v1angle"]["WM"] + 2.0
        assert dt["md"]["WM"] < 1.5 * fit["md"]["WM"] + 0.005 and dt["fa"]["WM"] < 1.5 * fit["fa"]["WM"] + 0.02


def test_orientation_probe_finds_the_angle_to_b0_in_simulated_voxels(tmp_path):
    """Tiny mode of benchmarks/bench_orientation_probe.py: in the easy regime the noiseless pc-bSSFP profile
    of one white-matter voxel tells the fibre's angle to B0 far better than a constant does."""
    out = tmp_path / "probe.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_orientation_probe.py"), "--tiny",
                                "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    easy = json.loads(out.read_text())["simulator"]["easy"]["noiseless"]["cycle invariants"]
    best = min(easy["ridge (quadratic)"], easy["gradient boosting"])
    assert best < easy["constant (training median)"] - 8.0
    assert easy["gradient boosting (axis dyadic)"] < easy["constant (training median)"] - 8.0
    assert 15.0 < easy["random axes"] < 35.0
    assert "| simulator voxels | easy, noiseless | cycle invariants |" in out.with_suffix(".md").read_text()


def test_keep_from_adds_the_modalities_an_earlier_run_of_the_same_data_trained(tmp_path):
    import bench_modalities as bench

    def run(modalities, minutes=15.0):
        return {"setting": "realistic", "simulation": {"regime": "realistic", "train_seed": 1},
                "training": {"minutes": minutes, "seed": 1, "recipes": {m: "log-euclidean" for m in modalities}},
                "results": {m: {"md": {"WM": 0.01 * k}} for k, m in enumerate(modalities)},
                "steps": {m: 10 for m in modalities}, "train_minutes": {m: 15.0 for m in modalities}}

    (tmp_path / "modalities_realistic.json").write_text(json.dumps(run(["pc-bssfp", "t1w", "dwi-tensor"])))
    result = run(["dwi-tensor"])
    result["results"]["dwi-tensor"]["md"]["WM"] = 0.5
    bench.keep_earlier(result, tmp_path)
    assert list(result["results"]) == ["dwi-tensor", "pc-bssfp", "t1w"]  # the table's order
    assert result["results"]["dwi-tensor"]["md"]["WM"] == 0.5  # what was trained now wins
    assert result["results"]["t1w"]["md"]["WM"] == 0.01
    assert set(result["kept_from_earlier_run"]) == {"pc-bssfp", "t1w"}
    assert "(`--keep-from`): pc-bSSFP, T1w." in bench.kept_note(result)
    with pytest.raises(SystemExit, match="other training settings"):
        bench.keep_earlier(run(["dwi-tensor"], minutes=25.0), tmp_path)


def test_the_axis_dyadic_gives_back_the_angle_to_b0():
    from bench_orientation_probe import axis_dyadic, dyadic_inclination, inclination_deg

    cos2 = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(dyadic_inclination(axis_dyadic(cos2)), inclination_deg(cos2), atol=1e-6)
    # the mean dyadic of two axes 20 deg apart points between them
    pair = axis_dyadic(np.cos(np.radians([30.0, 50.0])) ** 2).mean(axis=0, keepdims=True)
    np.testing.assert_allclose(dyadic_inclination(pair), [40.0], atol=1e-6)
