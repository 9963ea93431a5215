"""Every failure a user can cause: exit code, one stderr line naming the file, no traceback, nothing written.

Each case builds a fresh tiny dataset, breaks one thing and runs ``bssfp2dt.cli.run.main``. Only the
invalid-BIDS case runs the validator; the others pass ``--skip-bids-validation`` so that bssfp2dt's
own checks (not the validator's) are what is tested.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli import run as cli_run
from bssfp2dt.config import load_toml
from bssfp2dt.errors import (EXIT_FAILURE, EXIT_BAD_LEVEL, EXIT_CANNOT_CREATE_OUTPUT, EXIT_INVALID_BIDS,
                             EXIT_MISSING_INPUT, EXIT_NO_FILES_SELECTED, EXIT_USAGE)
from bssfp2dt.io.derivatives import run_config_path

SKIP = "--skip-bids-validation"


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_run.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Each builder gets tmp_path, makes a dataset, breaks it and returns (argv, fragment the message must hold).
Builder = Callable[[Path], tuple[list, str]]


def dataset(tmp: Path, **kwargs) -> Path:
    return fx.make_bids_dataset(tmp / "bids", **{"sessions": (None,), **kwargs})


def _argv(root: Path, tmp: Path, *extra) -> list:
    return [root, tmp / "out", "participant", "-w", tmp / "work", *extra]


def not_a_directory(tmp):
    (tmp / "bids").write_text("a file")
    return _argv(tmp / "bids", tmp, SKIP), f"{tmp / 'bids'} is not a directory"


def missing_bids_dir(tmp):
    return _argv(tmp / "nowhere", tmp, SKIP), f"{tmp / 'nowhere'} does not exist"


def no_description(tmp):
    root = dataset(tmp)
    (root / "dataset_description.json").unlink()
    return _argv(root, tmp, SKIP), "dataset_description.json"


def invalid_bids(tmp):
    root = dataset(tmp)
    bvec = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bvec")
    bvec.unlink()
    return _argv(root, tmp), "sub-01_dwi.nii.gz fails BIDS validation: DWI_MISSING_BVEC"


def unknown_participant(tmp):
    root = dataset(tmp)
    return _argv(root, tmp, SKIP, "--participant-label", "01", "sub-05"), "sub-05"


def unknown_session(tmp):
    root = fx.make_bids_dataset(tmp / "bids", sessions=("1",))
    return _argv(root, tmp, SKIP, "--session-label", "7"), "ses-7"


def filter_not_json(tmp):
    root = dataset(tmp)
    (tmp / "filter.json").write_text("{'t1w': }")
    return _argv(root, tmp, SKIP, "--bids-filter-file", tmp / "filter.json"), str(tmp / "filter.json")


def filter_matches_nothing(tmp):
    root = dataset(tmp)
    (tmp / "filter.json").write_text(json.dumps({"t1w": {"acquisition": "mp2rage"}}))
    return _argv(root, tmp, SKIP, "--bids-filter-file", tmp / "filter.json"), "'t1w' query selects no file"


def magnitude_without_phase(tmp):
    root = dataset(tmp)
    magnitude, phase = fx.bssfp_paths(root, "01", None)
    phase.unlink()
    return _argv(root, tmp, SKIP), f"{magnitude} has no phase"


def different_grids(tmp):
    root = dataset(tmp)
    magnitude, phase = fx.bssfp_paths(root, "01", None)
    fx.write_nifti(phase, np.zeros((8, 8, 6, 12), dtype=np.float32))
    return _argv(root, tmp, SKIP), f"{magnitude} and phase {phase} are on different grids"


def shifted_grid(tmp):
    root = dataset(tmp)
    magnitude, phase = fx.bssfp_paths(root, "01", None)
    shifted = fx.AFFINE.copy()
    shifted[0, 3] += 1.0  # same shape, 1 mm shift
    fx.write_nifti(phase, np.zeros(fx.SHAPE + (12,), dtype=np.float32), shifted)
    return _argv(root, tmp, SKIP), (f"{magnitude} and phase {phase} are on different grids "
                                    "(affines differ by up to 1 mm)")


def eight_cycles(tmp):
    root = tmp / "bids"
    fx.write_description(root)
    fx.write_bssfp(root, "01", None, np.random.default_rng(0), n_cycles=8,
                   increments=[45.0 * k for k in range(8)])
    fx.write_t1w(root, "01", None, np.random.default_rng(1))
    return _argv(root, tmp, SKIP), "has 8 volume(s); 12 phase cycles"


def increments_disagree(tmp):
    root = tmp / "bids"
    fx.write_description(root)
    magnitude, _ = fx.write_bssfp(root, "01", None, np.random.default_rng(0), increments=[0.0, 90.0, 180.0, 270.0])
    fx.write_t1w(root, "01", None, np.random.default_rng(1))
    return _argv(root, tmp, SKIP), "lists 4 PhaseIncrements but the series has 12 volumes"


def phase_units_unknown(tmp):
    root = dataset(tmp, phase_units=None)
    _, phase = fx.bssfp_paths(root, "01", None)
    fx.write_nifti(phase, np.random.default_rng(0).uniform(0, 10, fx.SHAPE + (12,)).astype(np.float32))
    return _argv(root, tmp, SKIP), f"{phase}: cannot tell the units"


def phase_units_wrong(tmp):
    root = dataset(tmp, phase_units="degrees")
    return _argv(root, tmp, SKIP), "Units 'degrees'"


def corrupt_gzip(tmp):
    root = dataset(tmp)
    t1w = fx.t1w_path(root, "01", None)
    t1w.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    return _argv(root, tmp, SKIP), f"{t1w} is not a readable NIfTI"


def truncated_gzip(tmp):
    root = dataset(tmp)
    dwi = fx.dwi_path(root, "01", None)
    dwi.write_bytes(gzip.compress(gzip.decompress(dwi.read_bytes())[:-500]))
    return _argv(root, tmp, SKIP), f"{dwi} is truncated"


def dwi_without_bvec(tmp):
    root = dataset(tmp)
    fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bvec").unlink()
    return _argv(root, tmp, SKIP), "has no .bvec file"


def dwi_without_bval(tmp):
    root = dataset(tmp)
    fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bval").unlink()
    return _argv(root, tmp, SKIP), "has no .bval file"


def bval_count_mismatch(tmp):
    root = dataset(tmp)
    bval = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bval")
    bval.write_text("0 1000 1000\n")
    return _argv(root, tmp, SKIP), f"7 volumes but {bval} lists 3 b-values"


def bvec_count_mismatch(tmp):
    root = dataset(tmp)
    bvec = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bvec")
    bvec.write_text("1 0\n0 1\n0 0\n")
    return _argv(root, tmp, SKIP), f"{bvec} holds a 3x2 table"


def subject_without_bssfp(tmp):
    root = fx.make_bids_dataset(tmp / "bids", subjects=("01", "02"), sessions=(None,))
    for path in fx.bssfp_paths(root, "02", None):
        path.unlink()
    return _argv(root, tmp, SKIP), "sub-02 has no pc-bSSFP"


def subject_without_t1w(tmp):
    root = dataset(tmp)
    fx.t1w_path(root, "01", None).unlink()
    return _argv(root, tmp, SKIP, "--input-modality", "t1w"), "sub-01 has no T1w"


def output_is_bids_dir(tmp):
    root = dataset(tmp)
    return [root, root, "participant", SKIP], "is bids_dir"


def output_inside_bids_dir(tmp):
    root = dataset(tmp)
    return [root, root / "sub-01" / "out", "participant", SKIP], "inside bids_dir"


def output_under_a_file(tmp):
    root = dataset(tmp)
    (tmp / "occupied").write_text("a file where a folder is needed")
    return [root, tmp / "occupied" / "out", "participant", SKIP], f"{tmp / 'occupied'} is not a directory"


def bad_level(tmp):
    root = dataset(tmp)
    return [root, tmp / "out", "subject", SKIP], "'subject'"


def group_without_results(tmp):
    root = dataset(tmp)
    return [root, tmp / "out", "group", SKIP], "no participant results"


CASES = {
    "not-a-directory": (not_a_directory, EXIT_MISSING_INPUT),
    "missing-bids-dir": (missing_bids_dir, EXIT_MISSING_INPUT),
    "no-dataset-description": (no_description, EXIT_INVALID_BIDS),
    "invalid-bids": (invalid_bids, EXIT_INVALID_BIDS),
    "unknown-participant": (unknown_participant, EXIT_NO_FILES_SELECTED),
    "unknown-session": (unknown_session, EXIT_NO_FILES_SELECTED),
    "filter-not-json": (filter_not_json, EXIT_USAGE),
    "filter-matches-nothing": (filter_matches_nothing, EXIT_NO_FILES_SELECTED),
    "magnitude-without-phase": (magnitude_without_phase, EXIT_MISSING_INPUT),
    "different-grid-shapes": (different_grids, EXIT_MISSING_INPUT),
    "shifted-grid": (shifted_grid, EXIT_MISSING_INPUT),
    "eight-cycles": (eight_cycles, EXIT_MISSING_INPUT),
    "increments-disagree": (increments_disagree, EXIT_MISSING_INPUT),
    "phase-units-unknown": (phase_units_unknown, EXIT_MISSING_INPUT),
    "phase-units-wrong": (phase_units_wrong, EXIT_MISSING_INPUT),
    "corrupt-gzip": (corrupt_gzip, EXIT_MISSING_INPUT),
    "truncated-gzip": (truncated_gzip, EXIT_MISSING_INPUT),
    "dwi-without-bvec": (dwi_without_bvec, EXIT_MISSING_INPUT),
    "dwi-without-bval": (dwi_without_bval, EXIT_MISSING_INPUT),
    "bval-count-mismatch": (bval_count_mismatch, EXIT_MISSING_INPUT),
    "bvec-count-mismatch": (bvec_count_mismatch, EXIT_MISSING_INPUT),
    "subject-without-bssfp": (subject_without_bssfp, EXIT_MISSING_INPUT),
    "subject-without-t1w": (subject_without_t1w, EXIT_MISSING_INPUT),
    "output-is-bids-dir": (output_is_bids_dir, EXIT_USAGE),
    "output-inside-bids-dir": (output_inside_bids_dir, EXIT_USAGE),
    "output-not-writable": (output_under_a_file, EXIT_CANNOT_CREATE_OUTPUT),
    "bad-analysis-level": (bad_level, EXIT_BAD_LEVEL),
    "group-without-results": (group_without_results, EXIT_MISSING_INPUT),
}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, capsys):
    build, expected_code = CASES[case]
    argv, fragment = build(tmp_path)
    output_dir = Path(argv[1])
    before = tree(output_dir)
    code, out, err = run_main(argv, capsys)
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bssfp2dt: error: ") and fragment in lines[0]
    assert "Traceback" not in err and out == ""
    assert tree(output_dir) == before  # nothing written (output_dir usually does not exist at all)
    assert not (tmp_path / "work").exists()


def test_traceback_only_with_vv(tmp_path, capsys):
    argv, _ = magnitude_without_phase(tmp_path)
    code, _, err = run_main(argv + ["-vv"], capsys)
    assert code == EXIT_MISSING_INPUT and "Traceback" in err


# --------------------------------------------------------------------------- the good paths
def test_dry_run_prints_inputs_and_writes_nothing(tmp_path, capsys):
    root = fx.make_bids_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("1", "2"))
    code, out, err = run_main(_argv(root, tmp_path, "--dry-run"), capsys)  # with the validator
    assert code == 0, err
    for subject in ("01", "02"):
        for session in ("1", "2"):
            assert f"sub-{subject} ses-{session}" in out
            for path in (*fx.bssfp_paths(root, subject, session), fx.dwi_path(root, subject, session)):
                assert str(path) in out
        assert str(fx.t1w_path(root, subject, "1")) in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_checks_pass_then_missing_pipeline_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli_run.PIPELINES, "participant", ("bssfp2dt.pipeline.absent_for_tests", "run"))
    root = dataset(tmp_path)
    code, _, err = run_main(_argv(root, tmp_path, SKIP), capsys)
    assert code == EXIT_FAILURE
    assert "has no participant pipeline" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_t1w_modality_accepts_subjects_without_bssfp(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli_run.PIPELINES, "participant", ("frontdoor_fixtures", "record_plan"))
    fx.RECORDED_PLANS.clear()
    root = dataset(tmp_path)
    for path in fx.bssfp_paths(root, "01", None):
        path.unlink()
    code, _, err = run_main(_argv(root, tmp_path, SKIP, "--input-modality", "t1w"), capsys)
    assert code == 0, err
    (plan,) = fx.RECORDED_PLANS
    assert plan.subjects[0].sessions[0].bssfp is None
    assert plan.subjects[0].sessions[0].t1w.image == fx.t1w_path(root, "01", None)


def test_dispatch_writes_dataset_and_per_subject_toml(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli_run.PIPELINES, "participant", ("frontdoor_fixtures", "record_plan"))
    fx.RECORDED_PLANS.clear()
    root = fx.make_bids_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("1",))
    code, _, err = run_main(_argv(root, tmp_path, SKIP, "--participant-label", "02", "01", "--mem", "2G"), capsys)
    assert code == 0, err
    (plan,) = fx.RECORDED_PLANS
    config = plan.config
    assert [s.subject for s in plan.subjects] == ["02", "01"]
    output = tmp_path / "out"
    assert json.loads((output / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert (output / ".bidsignore").is_file()
    for label in ("01", "02"):
        saved = run_config_path(output, label, config.run.run_uuid)
        assert saved.parent.parent.name == "log" and saved.parent.parent.parent.name == f"sub-{label}"
        assert load_toml(saved) == config.for_subject(label)
    assert config.resources.mem_mb == 2048


def test_group_dispatch_receives_participant_results(tmp_path, capsys, monkeypatch):
    from bssfp2dt.io.derivatives import initialise_dataset, tensor_map_paths, write_tensor_outputs

    monkeypatch.setitem(cli_run.PIPELINES, "group", ("frontdoor_fixtures", "record_plan"))
    fx.RECORDED_PLANS.clear()
    root = dataset(tmp_path)
    output = tmp_path / "out"
    initialise_dataset(output, root)
    paths = tensor_map_paths("01", None, "pc-bssfp", output)
    write_tensor_outputs(paths, {"diffusivity": np.zeros(fx.SHAPE + (6,))}, fx.AFFINE, [], "bids:raw:x", "pc-bssfp")
    code, _, err = run_main([root, output, "group", SKIP, "-w", tmp_path / "work"], capsys)
    assert code == 0, err
    (plan,) = fx.RECORDED_PLANS
    assert dict(plan.participant_results) == {"01": (paths.diffusivity,)}
    assert load_toml(run_config_path(output, None, plan.config.run.run_uuid)) == plan.config
