"""Data errors met while a subject runs: one line, the right exit code, and the optional DWI never costs the map.

One tiny simulated subject and a tiny untrained generator are shared; each test copies the dataset,
breaks one thing that passes discovery and runs the participant level through the CLI (Gibbs removal
and DWI motion correction off: ~15-25 s a run on the shared 2-core machine).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import tiny_config, tiny_pcbssfp_model

from bssfp2dt.cli.run import main
from bssfp2dt.errors import EXIT_MISSING_INPUT
from bssfp2dt.io import derivatives
from bssfp2dt.simulation.dataset import simulate_dataset

FAST = ("--unringing-method", "none", "--hmc-model", "none")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    model, _ = tiny_pcbssfp_model(bids_dir, root / "tiny.pt")
    return bids_dir, model, root / "work"  # one work dir: the steps of unchanged inputs are cached


def copy_dataset(source, tmp_path: Path) -> Path:
    bids_dir = tmp_path / "bids"
    shutil.copytree(source[0], bids_dir, ignore=shutil.ignore_patterns("derivatives"))
    return bids_dir


def run_cli(bids_dir: Path, tmp_path: Path, source, capsys, *extra: str, work: Path | None = None) -> tuple[int, str]:
    code = main([str(bids_dir), str(tmp_path / "out"), "participant", "--model", str(source[1]), "-w",
                 str(work or source[2]), "--patch-size", "32", "--nprocs", "1", "--omp-nthreads", "1",
                 "--skip-bids-validation", "--device", "cpu", *FAST, *extra])
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bssfp2dt: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0][len("bssfp2dt: error: "):]


def anat(bids_dir: Path, pattern: str) -> Path:
    return next(bids_dir.glob(f"sub-01/ses-1/anat/*{pattern}"))


def test_a_node_level_data_error_is_one_line_with_exit_66(source, tmp_path, capsys):
    """A T1w with signal in one voxel passes the content checks but leaves an empty brain mask."""
    bids_dir = copy_dataset(source, tmp_path)
    t1w = anat(bids_dir, "_T1w.nii.gz")
    image = nib.load(t1w)
    data = np.zeros(image.shape, np.float32)
    data[5, 5, 5] = 100.0
    nib.save(nib.Nifti1Image(data, image.affine, image.header), t1w)
    code, err = run_cli(bids_dir, tmp_path, source, capsys)
    assert code == EXIT_MISSING_INPUT
    message = error_line(err)
    assert message.startswith(f"T1w {t1w}: the brain mask is empty: cannot segment tissues (preprocessing step "
                              "tissue_0; traceback in ")
    assert message.endswith("); check or replace this image")
    crash = Path(message.split("traceback in ")[1].split(")")[0])
    assert "Traceback" in crash.read_text() and "nipype" not in err


def test_no_overlap_after_registration_stops_the_subject(source, tmp_path, capsys):
    bids_dir = copy_dataset(source, tmp_path)
    for part in ("mag", "phase"):
        path = anat(bids_dir, f"part-{part}_T2w.nii.gz")
        image = nib.load(path)
        affine = image.affine.copy()
        affine[:3, 3] += 400.0  # 40 cm away: nothing of it lies in the T1w field of view
        moved = nib.Nifti1Image(np.asarray(image.dataobj), affine, image.header)
        moved.set_sform(affine)
        moved.set_qform(affine)
        nib.save(moved, path)
    code, err = run_cli(bids_dir, tmp_path, source, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"bSSFP magnitude {anat(bids_dir, 'part-mag_T2w.nii.gz')} covers 0 % of the T1w "
                               "brain mask after registration (at least 50 % needed): the images do not overlap; "
                               "check that both come from the same subject and session")
    assert not list((tmp_path / "out").rglob("*_dwimap.nii.gz"))


def assert_prediction_without_evaluation(out: Path) -> None:
    paths = derivatives.tensor_map_paths("01", "1", "pc-bssfp", out)
    for path in paths.all():
        assert path.is_file(), path
    fa = np.asarray(nib.load(paths.fa).dataobj)
    assert np.all(np.isfinite(fa)) and np.count_nonzero(fa) > 0
    assert not list(out.rglob("*_errors.tsv"))
    assert (out / "sub-01.html").is_file()  # every subject gets its report, with or without evaluation


def test_a_dwi_without_diffusion_weighting_still_gives_the_prediction(source, tmp_path, capsys):
    bids_dir = copy_dataset(source, tmp_path)
    dwi = next(bids_dir.glob("sub-01/ses-*/dwi/*_dwi.nii.gz"))
    bval = dwi.with_name(dwi.name.replace(".nii.gz", ".bval"))
    bval.write_text(" ".join("0" for _ in bval.read_text().split()) + "\n")
    code, err = run_cli(bids_dir, tmp_path, source, capsys)
    assert code == 0, err
    assert (f"DWI {dwi}: every volume is b = 0, so it cannot give a tensor; the prediction is still made, its "
            "evaluation is skipped") in err
    assert_prediction_without_evaluation(tmp_path / "out")


def test_a_dwi_that_misses_the_t1w_still_gives_the_prediction(source, tmp_path, capsys):
    bids_dir = copy_dataset(source, tmp_path)
    for path in bids_dir.glob("sub-01/ses-1/*/*_dwi.nii.gz"):
        image = nib.load(path)
        affine = image.affine.copy()
        affine[:3, 3] += 400.0
        moved = nib.Nifti1Image(np.asarray(image.dataobj), affine, image.header)
        moved.set_sform(affine)
        moved.set_qform(affine)
        nib.save(moved, path)
    code, err = run_cli(bids_dir, tmp_path, source, capsys)
    assert code == 0, err
    assert ("sub-01: the DWI of ses-1 covers 0 % of the T1w brain mask after registration (at least 50 % needed); "
            "the prediction is kept, its evaluation against this DWI is skipped") in err
    assert_prediction_without_evaluation(tmp_path / "out")


def test_a_dwi_failing_inside_preprocessing_still_gives_the_prediction(source, tmp_path, capsys, monkeypatch):
    """A DWI node error (here the tensor fit, made to fail) drops the DWI branch, not the subject."""
    from bssfp2dt.preprocessing import steps

    def failing_fit(*args, **kwargs):
        raise ValueError("the b-values/b-vectors do not determine a tensor (design matrix rank < 7)")

    monkeypatch.setattr(steps, "fit_dwi_tensor", failing_fit)  # the Linear plugin runs nodes in this process
    bids_dir = copy_dataset(source, tmp_path)
    code, err = run_cli(bids_dir, tmp_path, source, capsys, work=tmp_path / "work")  # no cached tensor fit
    assert code == 0, err
    assert ("sub-01: the DWI cannot give a tensor (dwi_tensor_ses1: the b-values/b-vectors do not determine a "
            "tensor (design matrix rank < 7)); the prediction is still made, its evaluation is skipped") in err
    assert "Traceback" not in err
    assert_prediction_without_evaluation(tmp_path / "out")
    provenance = json.loads(next((tmp_path / "work").rglob("collect_ses1/*_preproc.json")).read_text())
    assert provenance["outputs"]["tensor"] is None


# --------------------------------------------------------------------------- units (no pipeline run)
def test_exit_status_of_the_subjects_failures():
    from bssfp2dt.errors import Bssfp2dtError, InputOutputError, MissingInputError
    from bssfp2dt.pipeline.outcome import exit_status

    assert exit_status({}) == 0
    assert exit_status({"01": MissingInputError("x"), "02": KeyError("bug")}) == 1
    with pytest.raises(MissingInputError) as one:
        exit_status({"01": MissingInputError("T1w a.nii.gz: empty")})
    assert one.value.message == "T1w a.nii.gz: empty"
    with pytest.raises(Bssfp2dtError) as both:
        exit_status({"01": MissingInputError("first"), "02": MissingInputError("second")})
    assert both.value.exit_code == 66 and both.value.message == "2 subjects failed (sub-01, sub-02); the first: first"
    with pytest.raises(Bssfp2dtError) as mixed:
        exit_status({f"{n:02d}": MissingInputError("a") if n else InputOutputError("b") for n in range(12)})
    assert mixed.value.exit_code == 1
    assert mixed.value.message.startswith("12 subjects failed (sub-00, sub-01, ") and "... and 2 more)" in \
        mixed.value.message


def test_a_crash_file_is_read_back_to_node_and_exception(tmp_path):
    from bssfp2dt.preprocessing.node_errors import read_crash_file

    crash = tmp_path / "crash-20260101-000000-u-tissue_0-x.txt"
    crash.write_text("Node: preproc_sub_01.tissue_0\nWorking directory: /w\n\nTraceback (most recent call last):\n"
                     "nipype.pipeline.engine.nodes.NodeExecutionError: Exception raised while executing Node.\n"
                     "\tTraceback (most recent call last):\n\t  File \"t1w.py\", line 1\n"
                     "\tbssfp2dt.errors.UsageError: the brain mask is empty: cannot segment tissues\n")
    failure = read_crash_file(crash)
    assert (failure.node, failure.short_type, failure.message) == ("tissue_0", "UsageError",
                                                                    "the brain mask is empty: cannot segment tissues")
    crash.write_text("garbled")
    assert read_crash_file(crash) is None


# --------------------------------------------------------------------------- runs that meet each other
HOLD_LOCK = """
import sys, time
from pathlib import Path
from bssfp2dt.io.workdir_lock import work_dir_lock
with work_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(work: Path):
    """Another process holding the work dir's lock (as a running bssfp2dt participant run does)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(work)], stdout=subprocess.PIPE, env=env, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_locked_work_dir_stops_before_writing(tmp_path, capsys):
    import frontdoor_fixtures as fx

    from bssfp2dt.errors import EXIT_CANNOT_CREATE_OUTPUT

    bids_dir = fx.make_bids_dataset(tmp_path / "bids", sessions=(None,))
    work = tmp_path / "work"
    holder = hold_lock(work)
    try:
        code = main([str(bids_dir), str(tmp_path / "out"), "participant", "-w", str(work), "--skip-bids-validation"])
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_CANNOT_CREATE_OUTPUT
    assert error_line(err) == (f"work dir {work} is in use by process {holder.pid} (another bssfp2dt run); wait for "
                               "it to finish or give this run another -w")
    assert not (tmp_path / "out").exists()


def test_the_lock_dies_with_its_process_and_excludes_a_second_holder(tmp_path):
    import os

    from bssfp2dt.errors import OutputError
    from bssfp2dt.io.workdir_lock import work_dir_lock

    holder = hold_lock(tmp_path)
    holder.kill()  # a killed run: its lock file stays, its lock does not
    holder.wait()
    with work_dir_lock(tmp_path) as path:
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError) as second:
            with work_dir_lock(tmp_path):
                pass
        assert f"is in use by process {os.getpid()} " in second.value.message


def test_group_names_a_subject_whose_participant_run_was_killed(source, tmp_path, capsys, monkeypatch):
    from bssfp2dt.pipeline import participant
    from bssfp2dt.pipeline.completion import read_status

    bids_dir = copy_dataset(source, tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run stops here, after the maps, before the evaluation
    monkeypatch.setattr(participant, "evaluate_subject", killed)
    code, err = run_cli(bids_dir, tmp_path, source, capsys)
    assert code == 130
    out = tmp_path / "out"
    assert derivatives.tensor_map_paths("01", "1", "pc-bssfp", out).diffusivity.is_file()
    status = read_status(out, "01")
    assert status["complete"] is False
    code = main([str(bids_dir), str(out), "group", "--skip-bids-validation"])
    assert code == EXIT_MISSING_INPUT
    assert error_line(capsys.readouterr().err) == (
        f"1 subject(s) incomplete (sub-01; sub-01: its participant run {status['run_uuid']} did not finish: it was "
        "interrupted (killed or out of time) before all outputs were written); finish with `bssfp2dt "
        f"{bids_dir} {out} participant --participant-label 01` (the same -w reuses the finished steps), or leave "
        "them out with --participant-label, then rerun the group level")
    monkeypatch.undo()
    code, err = run_cli(bids_dir, tmp_path, source, capsys)  # finishing it, as the message says
    assert code == 0, err
    status = read_status(out, "01")
    fa = derivatives.tensor_map_paths("01", "1", "pc-bssfp", out).fa
    assert status["complete"] is True and fa.relative_to(out).as_posix() in status["outputs"]
    assert main([str(bids_dir), str(out), "group", "--skip-bids-validation"]) == 0
