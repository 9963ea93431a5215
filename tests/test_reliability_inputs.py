"""Failure modes of the input side that used to escape as internal errors (or wrong messages).

Each case breaks one thing in a fresh tiny dataset and runs ``bssfp2dt.cli.run.main``: the exit code
is the BIDS execution-spec one, stderr is exactly one ``bssfp2dt: error:`` line naming the file or
flag, there is no traceback and nothing is written to output_dir or the work dir. Before the fixes,
these cases ended as "internal error" (exit 1: pybids' JSON/IntendedFor failures, float() of a
sidecar string, numpy on string increments, an unknown filter entity) or were accepted silently (a
multi-volume T1w, 2D or empty images, singular affines, NaN b-values).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli import run as cli_run
from bssfp2dt.errors import EXIT_MISSING_INPUT, EXIT_USAGE

SKIP = "--skip-bids-validation"
Builder = Callable[[Path], tuple[list, str]]


def dataset(tmp: Path) -> Path:
    return fx.make_bids_dataset(tmp / "bids", sessions=(None,))


def argv(root: Path, tmp: Path, *extra) -> list:
    return [root, tmp / "out", "participant", "-w", tmp / "work", SKIP, *extra]


def magnitude_sidecar(root: Path) -> Path:
    return fx.sidecar(fx.bssfp_paths(root, "01", None)[0])


# --------------------------------------------------------------------------- sidecars
def sidecar_not_json(tmp):
    root = dataset(tmp)
    magnitude_sidecar(root).write_text('{"RepetitionTime": 0.005,')
    return argv(root, tmp), f"{magnitude_sidecar(root)} is not valid JSON"


def sidecar_empty(tmp):
    root = dataset(tmp)
    fx.sidecar(fx.t1w_path(root, "01", None)).write_text("")
    return argv(root, tmp), f"{fx.sidecar(fx.t1w_path(root, '01', None))} is not valid JSON"


def sidecar_is_a_list(tmp):
    root = dataset(tmp)
    magnitude_sidecar(root).write_text("[0.005, 0.0025]")
    return argv(root, tmp), f"{magnitude_sidecar(root)} holds a JSON list"


def top_level_sidecar_broken(tmp):
    root = dataset(tmp)
    (root / "T1w.json").write_text("{")
    return argv(root, tmp), f"{root / 'T1w.json'} is not valid JSON"


def intended_for_not_paths(tmp):
    root = dataset(tmp)
    fmap = root / "sub-01" / "fmap" / "sub-01_dir-PA_epi.json"
    fmap.write_text(json.dumps({"PhaseEncodingDirection": "j", "IntendedFor": 3}))
    return argv(root, tmp), f"{fmap}: IntendedFor must be a path or a list of paths"


def repetition_time_text(tmp):
    root = dataset(tmp)
    meta = json.loads(magnitude_sidecar(root).read_text())
    magnitude_sidecar(root).write_text(json.dumps({**meta, "RepetitionTime": "5ms"}))
    magnitude = fx.bssfp_paths(root, "01", None)[0]
    return argv(root, tmp), f"the sidecar of {magnitude} gives RepetitionTime = '5ms', not a number"


def increments_text(tmp):
    root = dataset(tmp)
    meta = json.loads(magnitude_sidecar(root).read_text())
    magnitude_sidecar(root).write_text(json.dumps({**meta, "PhaseIncrements": ["0deg"] * 12}))
    return argv(root, tmp), "PhaseIncrements are not all numbers"


def phase_encoding_unknown(tmp):
    root = dataset(tmp)
    dwi = fx.dwi_path(root, "01", None)
    meta = json.loads(fx.sidecar(dwi).read_text())
    fx.sidecar(dwi).write_text(json.dumps({**meta, "PhaseEncodingDirection": "AP"}))
    return argv(root, tmp), f"the sidecar of {dwi} gives PhaseEncodingDirection = 'AP'"


# --------------------------------------------------------------------------- images
def t1w_with_two_volumes(tmp):
    root = dataset(tmp)
    t1w = fx.t1w_path(root, "01", None)
    fx.write_nifti(t1w, np.ones(fx.SHAPE + (2,), dtype=np.float32))
    return argv(root, tmp), f"T1w {t1w} holds 2 volumes"


def two_dimensional_t1w(tmp):
    root = dataset(tmp)
    t1w = fx.t1w_path(root, "01", None)
    fx.write_nifti(t1w, np.ones((8, 8), dtype=np.float32))
    return argv(root, tmp), f"{t1w} has shape (8, 8)"


def empty_dimension(tmp):
    root = dataset(tmp)
    dwi = fx.dwi_path(root, "01", None)
    fx.write_nifti(dwi, np.ones((8, 0, 8, 7), dtype=np.float32))
    return argv(root, tmp), f"{dwi} has shape (8, 0, 8, 7)"


def singular_affine(tmp):
    root = dataset(tmp)
    t1w = fx.t1w_path(root, "01", None)
    header = nib.Nifti1Header()
    header.set_data_shape(fx.SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(np.diag([2.0, 2.0, 0.0, 1.0]), code=1)  # a zero column: no voxel-to-world inverse
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.ones(fx.SHAPE, dtype=np.float32), None, header=header), t1w)
    return argv(root, tmp), f"{t1w} has a non-finite or singular voxel-to-world affine"


def phase_data_corrupt(tmp):
    """Valid header and gzip size trailer, broken deflate stream: only reading the voxels finds it."""
    root = fx.make_bids_dataset(tmp / "bids", sessions=(None,), phase_units=None)
    _, phase = fx.bssfp_paths(root, "01", None)
    packed = bytearray(phase.read_bytes())
    middle = len(packed) // 2
    packed[middle:middle + 64] = b"\xff" * 64  # an invalid deflate stream (zeros can still decode)
    phase.write_bytes(bytes(packed))
    return argv(root, tmp), f"bSSFP phase {phase}: its voxel data cannot be read"


def bval_not_finite(tmp):
    root = dataset(tmp)
    bval = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bval")
    bval.write_text("0 1000 nan 1000 1000 1000 1000\n")
    return argv(root, tmp), f"{bval} holds negative or non-numeric b-values"


def bval_negative(tmp):
    root = dataset(tmp)
    bval = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bval")
    bval.write_text("0 1000 -1000 1000 1000 1000 1000\n")
    return argv(root, tmp), f"{bval} holds negative or non-numeric b-values"


def bvec_not_finite(tmp):
    root = dataset(tmp)
    bvec = fx.dwi_path(root, "01", None).with_name("sub-01_dwi.bvec")
    rows = bvec.read_text().splitlines()
    bvec.write_text("\n".join([rows[0].replace("1.0000", "inf", 1)] + rows[1:]) + "\n")
    return argv(root, tmp), f"{bvec} holds non-numeric entries"


def no_dwi_for_dwi_modality(tmp):
    root = fx.make_bids_dataset(tmp / "bids", sessions=("1", "2"), dwi=False)
    return argv(root, tmp, "--input-modality", "dwi-tensor"), "sub-01 has no DWI"


# --------------------------------------------------------------------------- filter file
def filter_unknown_entity(tmp):
    root = dataset(tmp)
    (tmp / "filter.json").write_text(json.dumps({"t1w": {"acqusition": "mprage"}}))
    return argv(root, tmp, "--bids-filter-file", tmp / "filter.json"), \
        f"--bids-filter-file {tmp / 'filter.json'}: t1w.acqusition is not a BIDS entity"


CASES: dict[str, tuple[Builder, int]] = {
    "sidecar-not-json": (sidecar_not_json, EXIT_MISSING_INPUT),
    "sidecar-empty": (sidecar_empty, EXIT_MISSING_INPUT),
    "sidecar-is-a-list": (sidecar_is_a_list, EXIT_MISSING_INPUT),
    "top-level-sidecar-broken": (top_level_sidecar_broken, EXIT_MISSING_INPUT),
    "intended-for-not-paths": (intended_for_not_paths, EXIT_MISSING_INPUT),
    "repetition-time-text": (repetition_time_text, EXIT_MISSING_INPUT),
    "increments-text": (increments_text, EXIT_MISSING_INPUT),
    "phase-encoding-unknown": (phase_encoding_unknown, EXIT_MISSING_INPUT),
    "t1w-two-volumes": (t1w_with_two_volumes, EXIT_MISSING_INPUT),
    "t1w-2d": (two_dimensional_t1w, EXIT_MISSING_INPUT),
    "empty-dimension": (empty_dimension, EXIT_MISSING_INPUT),
    "singular-affine": (singular_affine, EXIT_MISSING_INPUT),
    "phase-data-corrupt": (phase_data_corrupt, EXIT_MISSING_INPUT),
    "bval-not-finite": (bval_not_finite, EXIT_MISSING_INPUT),
    "bval-negative": (bval_negative, EXIT_MISSING_INPUT),
    "bvec-not-finite": (bvec_not_finite, EXIT_MISSING_INPUT),
    "no-dwi-for-dwi-modality": (no_dwi_for_dwi_modality, EXIT_MISSING_INPUT),
    "filter-unknown-entity": (filter_unknown_entity, EXIT_USAGE),
}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_input_failure_is_one_line_with_its_exit_code(case, tmp_path, capsys):
    build, expected_code = CASES[case]
    arguments, fragment = build(tmp_path)
    code = cli_run.main([str(a) for a in arguments])
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("bssfp2dt: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert captured.out == ""
    assert tree(tmp_path / "out") == [] and not (tmp_path / "work").exists()


def test_hidden_sidecars_are_not_checked(tmp_path, capsys, monkeypatch):
    """pybids skips dot-folders, so a broken JSON there must not stop the run."""
    root = dataset(tmp_path)
    hidden = root / "sub-01" / ".cache" / "broken.json"
    hidden.parent.mkdir()
    hidden.write_text("{")
    code = cli_run.main([str(a) for a in argv(root, tmp_path, "--dry-run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(fx.t1w_path(root, "01", None)) in captured.out

