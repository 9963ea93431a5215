"""The cached preprocessing workflow: every output on the common grid, reruns execute nothing,
``--write-preproc`` derivatives, provenance, nipype configuration."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from helpers import FAST

from bssfp2dt.io.derivatives import preproc_paths, sidecar_path, tensor_map_paths
from bssfp2dt.preprocessing import steps
from bssfp2dt.preprocessing.resampling import common_grid
from bssfp2dt.preprocessing.workflow import (HASH_METHOD, build_workflow, run_preprocessing,
                                             workflow_name)


def test_every_output_is_float32_on_the_common_grid(preprocessed_run):
    bids_dir, _, inputs, result = preprocessed_run
    session = result.session("1")
    t1w = nib.load(inputs.sessions[0].t1w.image)
    shape, affine = common_grid(t1w.affine, t1w.shape, 2.0)
    expected_volumes = {"t1w": None, "gm": None, "wm": None, "csf": None, "brain_mask": None, "bssfp": 24, "tensor": 6}
    for name, volumes in expected_volumes.items():
        image = nib.load(getattr(session, name))
        assert image.shape == shape + ((volumes,) if volumes else ()), name
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert image.get_data_dtype() == (np.uint8 if name == "brain_mask" else np.float32), name
    mask = np.asarray(nib.load(session.brain_mask).dataobj) > 0
    channels = np.asarray(nib.load(session.bssfp).dataobj)
    # Interleaved m0, p0, m1, ...: magnitudes >= 0, phases within [-pi, pi], not normalised to [0, 1].
    assert channels[..., 0::2].min() >= 0 and channels[..., 0::2].max() > 10
    assert np.abs(channels[..., 1::2]).max() <= np.pi + 1e-5 and channels[..., 1::2][mask].std() > 0.01
    assert np.all(channels[~mask] == 0)
    tissues = sum(np.asarray(nib.load(getattr(session, n)).dataobj) for n in ("gm", "wm", "csf"))
    np.testing.assert_allclose(tissues[mask], 1.0, atol=1e-3)
    # Tensor diagonals of brain tissue are ~0.3e-3..3e-3 mm^2/s.
    diagonal = np.asarray(nib.load(session.tensor).dataobj)[mask][:, [0, 3, 5]]
    assert 2e-4 < np.median(diagonal) < 3.5e-3


def test_provenance_records_registrations_and_skipped_fsl(preprocessed_run):
    _, _, _, result = preprocessed_run
    record = json.loads(result.session("1").provenance.read_text())
    steps = {step["step"]: step for step in record["steps"]}
    assert set(steps) >= {"t1w_to_grid", "tissue_maps", "prepare_bssfp", "register_bssfp_to_t1w",
                          "bssfp_to_grid", "preprocess_dwi", "register_dwi_to_t1w", "tensor_to_grid"}
    assert steps["preprocess_dwi"]["topup_eddy"].startswith("skipped: FSL not found")
    assert steps["preprocess_dwi"]["motion_correction"] == "skipped: disabled"
    assert np.asarray(steps["register_bssfp_to_t1w"]["transform"]).shape == (4, 4)
    assert record["normalised"] is False


def test_rerun_with_the_same_work_dir_executes_no_node(preprocessed_run):
    _, config, inputs, first = preprocessed_run
    folder = config.paths.work_dir / workflow_name("01")
    results = sorted(folder.glob("*/result_*.pklz"))
    assert len(results) >= 12  # every node finished once
    before = {path: path.stat().st_mtime_ns for path in results}
    again = run_preprocessing(config, inputs, FAST)
    assert again == first
    assert {path: path.stat().st_mtime_ns for path in sorted(folder.glob("*/result_*.pklz"))} == before


def test_rerun_with_another_thread_count_executes_no_node(preprocessed_run):
    """--omp-nthreads changes no result, so it must not invalidate the cache."""
    import dataclasses

    _, config, inputs, first = preprocessed_run
    folder = config.paths.work_dir / workflow_name("01")
    before = {path: path.stat().st_mtime_ns for path in sorted(folder.glob("*/result_*.pklz"))}
    threaded = dataclasses.replace(FAST, omp_nthreads=FAST.omp_nthreads + 3)
    assert run_preprocessing(config, inputs, threaded) == first
    assert {path: path.stat().st_mtime_ns for path in sorted(folder.glob("*/result_*.pklz"))} == before


def test_nodes_take_the_thread_count_from_the_environment(monkeypatch):
    settings = steps.PreprocSettings(omp_nthreads=5)
    options = settings.node_options()
    assert "omp_nthreads" not in options
    monkeypatch.setenv(steps.THREADS_ENV, "5")
    assert steps.PreprocSettings.from_dict(options) == settings
    monkeypatch.delenv(steps.THREADS_ENV)
    assert steps.PreprocSettings.from_dict(options).omp_nthreads == 1


def test_write_preproc_outputs_with_sidecars(preprocessed_run):
    bids_dir, config, _, result = preprocessed_run
    session = result.session("1")
    names = preproc_paths("01", "1", config.paths.output_dir)
    standard = tensor_map_paths("01", "1", "pcbssfp", config.paths.output_dir)
    for path in (names.bssfp_magnitude, names.bssfp_phase, names.t1w, names.diffusivity, standard.gm,
                 standard.wm, standard.csf, standard.brain_mask):
        assert path.is_file() and sidecar_path(path).is_file(), path
    magnitude = np.asarray(nib.load(names.bssfp_magnitude).dataobj)
    np.testing.assert_array_equal(magnitude, np.asarray(nib.load(session.bssfp).dataobj)[..., 0::2])
    sidecar = json.loads(sidecar_path(names.diffusivity).read_text())
    assert sidecar["Units"] == "mm^2/s" and sidecar["OrientationEncoding"]["Reference"] == "xyz"
    assert sidecar["SpatialReference"].startswith("bids:raw:sub-01/ses-1/anat/") and sidecar["Sources"]
    assert (config.paths.output_dir / "sub-01" / "log" / config.run.run_uuid / session.provenance.name).is_file()


def test_workflow_configuration(preprocessed_run, tmp_path):
    _, _, inputs, _ = preprocessed_run
    workflow, collect = build_workflow(inputs, FAST, tmp_path / "work", tmp_path / "crash")
    execution = workflow.config["execution"]
    assert execution["crashdump_dir"] == str(tmp_path / "crash") and execution["hash_method"] == HASH_METHOD
    assert list(collect) == ["1"]
    assert workflow.base_dir == str(tmp_path / "work")


def test_settings_round_trip_and_checks():
    settings = steps.PreprocSettings(voxel_mm=1.5, denoise="mppca", single_bssfp=True)
    assert steps.PreprocSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(Exception, match="denois"):
        steps.check_settings(steps.PreprocSettings(denoise="bm4d"))


def test_mem_reaches_multiproc_and_nodes_carry_estimates(preprocessed_run, tmp_path):
    """--mem (MB) becomes MultiProc's memory_gb; the heavy nodes carry an estimate from their image's header."""
    from bssfp2dt.preprocessing.workflow import memory_estimate_gb, multiproc_args

    assert multiproc_args(2, None) == {"n_procs": 2, "raise_insufficient": False}
    assert multiproc_args(2, 8192)["memory_gb"] == 8.0
    _, _, inputs, _ = preprocessed_run
    session = inputs.sessions[0]
    shape = nib.load(session.bssfp.magnitude).shape
    assert memory_estimate_gb(session.bssfp.magnitude, 16, 6) == round(0.5 + np.prod(shape) * 96 / 2 ** 30, 2)
    workflow, _ = build_workflow(inputs, FAST, tmp_path / "work", tmp_path / "crash")
    estimates = {name: workflow.get_node(name).mem_gb for name in ("bssfp_prepare_ses1", "dwi_prepare_ses1",
                                                                    "t1w_mask_0")}
    assert estimates["bssfp_prepare_ses1"] > 0.5 and estimates["dwi_prepare_ses1"] > 0.5
    assert estimates["t1w_mask_0"] == 0.5
