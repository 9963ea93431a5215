"""The participant level end to end on one tiny simulated subject with a tiny untrained generator.

One module-scoped run through the CLI (``bssfp2dt bids out participant --model ...``) is shared by the
tests, plus a second run into a fresh output folder with the same work dir (reuse and determinism) and
a third with a fresh work dir too (determinism of the whole chain).
Gibbs removal and DWI motion correction are switched off (as in ``test_preproc_on_simulation``): they
take ~2 min on the shared 2-core machine and are not what is tested here.

References: the written tensor against a direct generator pass on the hand-normalised, zero-padded
volume (one sliding-window patch covers the tiny volume, so Gaussian blending is the identity); the
maps against dipy; the checkpoint's sha256 against hashlib; names against the BIDS validator and pybids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import tiny_config, tiny_pcbssfp_model

from bssfp2dt.cli.run import main
from bssfp2dt.errors import MissingInputError
from bssfp2dt.pipeline.plan import RunPlan
from bssfp2dt.config import (Config, ModelSettings, PathSettings, ResourceSettings,
                             RunSettings, SelectionSettings)
from bssfp2dt.io import bids as bids_io
from bssfp2dt.io import derivatives
from bssfp2dt.models.checkpoint import load_release_checkpoint, save_release_checkpoint
from bssfp2dt.models.generator import build_generator
from bssfp2dt.pipeline.participant import load_model, run_participant
from bssfp2dt.preprocessing import workflow
from bssfp2dt.preprocessing.normalization import Normalization, Range
from bssfp2dt.simulation.dataset import simulate_dataset

PATCH = 32  # >= every side of the tiny common grid, so one patch covers the volume
MAG_HIGH = 1.5  # x the raw magnitude maximum: the normalised magnitudes stay inside (0, 1)
DIAGONAL, OFF_DIAGONAL = (0, 3, 5), (1, 2, 4)


def fast_settings(original):
    def settings(config):
        return dataclasses.replace(original(config), gibbs=False, motion_correction=False)
    return settings


def argv(bids_dir: Path, output_dir: Path, work_dir: Path, model: Path, *extra: str) -> list[str]:
    return [str(bids_dir), str(output_dir), "participant", "--model", str(model), "-w", str(work_dir),
            "--patch-size", str(PATCH), "--nprocs", "1", "--omp-nthreads", "1", "--skip-bids-validation",
            "--device", "cpu", *extra]


def node_results(work_dir: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns
            for path in sorted((work_dir / workflow.workflow_name("01")).glob("*/result_*.pklz"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two CLI runs (fresh output folders, one work dir) of a tiny subject; their paths and exit codes."""
    root = tmp_path_factory.mktemp("participant")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    model, normalization = tiny_pcbssfp_model(bids_dir, root / "tiny.pt", MAG_HIGH)
    work = root / "work"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow, "settings_from_config", fast_settings(workflow.settings_from_config))
        first = main(argv(bids_dir, root / "out1", work, model))
        cached = node_results(work)
        second = main(argv(bids_dir, root / "out2", work, model))
        third = main(argv(bids_dir, root / "out3", root / "work3", model))  # preprocessing from scratch again
    return {"root": root, "bids": bids_dir, "model": model, "work": work, "codes": (first, second, third),
            "cached": cached, "after": node_results(work), "normalization": normalization,
            "out": root / "out1", "out2": root / "out2", "out3": root / "out3"}


def one_error_line(stderr: str) -> str:
    """The CLI's error line; fails unless there is exactly one and no traceback (log lines may precede it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("bssfp2dt: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def test_every_file_of_the_naming_table_with_model_sidecars(run):
    assert run["codes"] == (0, 0, 0)
    paths = derivatives.tensor_map_paths("01", "1", "pc-bssfp", run["out"])
    for path in paths.all():
        assert path.is_file() and derivatives.sidecar_path(path).is_file(), path
    digest = hashlib.sha256(run["model"].read_bytes()).hexdigest()
    tensor = json.loads(derivatives.sidecar_path(paths.diffusivity).read_text())
    assert tensor["Model"]["Parameters"]["ModelSha256"] == digest
    assert tensor["Model"]["Parameters"]["ModelId"] == "file:tiny.pt"
    assert tensor["Units"] == "mm^2/s" and tensor["SkullStripped"] is True
    assert tensor["OrientationEncoding"] == {"Type": "tensor", "TensorRank": 2, "EncodingAxis": 3, "Reference": "xyz"}
    assert sorted(tensor["Sources"]) == sorted(f"bids:raw:{p.relative_to(run['bids']).as_posix()}"
                                               for p in run["bids"].rglob("sub-01/ses-1/anat/*.nii.gz"))
    for path in (paths.fa, paths.md, paths.colour_fa):
        sidecar = json.loads(derivatives.sidecar_path(path).read_text())
        assert sidecar["Model"]["Parameters"]["ModelSha256"] == digest and sidecar["SkullStripped"] is True
    assert nib.load(paths.diffusivity).shape[3] == 6 and nib.load(paths.colour_fa).shape[3] == 3
    description = json.loads((run["out"] / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "bssfp2dt" and description["DatasetType"] == "derivative"
    log_dirs = list((run["out"] / "sub-01" / "log").iterdir())
    assert len(log_dirs) == 1 and "prediction" in (log_dirs[0] / "participant.log").read_text()


def test_tensor_equals_a_direct_generator_pass_on_the_normalised_input(run):
    """Independent chain: normalise by hand, interleave, zero-pad as MONAI does, one forward pass, crop,
    denormalise by hand, mask."""
    work_session = preprocessed_outputs(run)
    mask = load(work_session["brain_mask"]) > 0
    channels = load(work_session["bssfp"])
    norm = run["normalization"]
    magnitude = np.clip((channels[..., 0::2] - norm.magnitude.low) / (norm.magnitude.high - norm.magnitude.low), 0, 1)
    phase = np.clip((channels[..., 1::2] + np.pi) / (2 * np.pi), 0, 1)
    volume = np.zeros(mask.shape + (24,))
    volume[..., 0::2], volume[..., 1::2] = magnitude, phase
    volume *= mask[..., None]
    expected = direct_pass(run["model"], volume, "pc-bssfp", mask)
    written = load(derivatives.tensor_map_paths("01", "1", "pc-bssfp", run["out"]).diffusivity)
    assert np.count_nonzero(written[mask]) > 0.9 * written[mask].size
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-8)
    assert np.all(written[~mask] == 0)


def direct_pass(model: Path, volume: np.ndarray, modality: str, mask: np.ndarray) -> np.ndarray:
    """Zero-pad (X, Y, Z, C) to one PATCH^3 patch as MONAI does (half before, the rest after), run the
    generator once, crop, denormalise with the test's ranges, mask: (X, Y, Z, 6) mm^2/s."""
    pads = [((PATCH - n) // 2, PATCH - n - (PATCH - n) // 2) for n in mask.shape]
    padded = np.pad(np.moveaxis(volume, -1, 0), [(0, 0)] + pads)
    generator, _ = load_release_checkpoint(model)
    with torch.no_grad():
        output = generator(torch.from_numpy(padded[None].astype(np.float32)), modality)[0].double().numpy()
    output = output[(slice(None),) + tuple(slice(low, low + n) for (low, _), n in zip(pads, mask.shape))]
    expected = np.moveaxis(output, 0, -1).copy()
    expected[..., DIAGONAL] = expected[..., DIAGONAL] * 3e-3
    expected[..., OFF_DIAGONAL] = -1e-3 + expected[..., OFF_DIAGONAL] * 2e-3
    return expected * mask[..., None]


def preprocessed_outputs(run) -> dict:
    summary = next((run["work"] / workflow.workflow_name("01")).glob("collect_ses1/*_preproc.json"))
    return json.loads(summary.read_text())["outputs"]


def test_t1w_model_gets_the_normalised_t1w_in_six_channels(run, tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "settings_from_config", fast_settings(workflow.settings_from_config))
    outputs = preprocessed_outputs(run)
    t1w, mask = load(outputs["t1w"]), load(outputs["brain_mask"]) > 0
    high = 1.2 * t1w.max()
    normalization = dataclasses.replace(run["normalization"], t1w=Range(0.0, high))
    torch.manual_seed(1)
    model = save_release_checkpoint(tmp_path / "t1w.pt", build_generator("tiny", ["t1w"]), config={},
                                    stage="finetune", modality="t1w", normalization=normalization.to_dict())
    plan = _plan(run, tmp_path / "out", lambda inputs: inputs, False, modality="t1w", model=model)
    assert run_participant(plan) == 0
    volume = np.repeat((np.clip(t1w / high, 0, 1) * mask)[..., None], 6, axis=-1)
    written = load(derivatives.tensor_map_paths("01", "1", "t1w", tmp_path / "out").diffusivity)
    np.testing.assert_allclose(written, direct_pass(model, volume, "t1w", mask), rtol=1e-4, atol=1e-8)
    sidecar = json.loads(derivatives.sidecar_path(derivatives.tensor_map_paths("01", "1", "t1w", tmp_path / "out")
                                                  .diffusivity).read_text())
    assert sidecar["Sources"] == [f"bids:raw:{p.relative_to(run['bids']).as_posix()}"
                                  for p in run["bids"].rglob("sub-01/ses-1/anat/*_T1w.nii.gz")]


def test_maps_agree_with_dipy(run):
    from dipy.reconst.dti import axial_diffusivity, decompose_tensor, fractional_anisotropy, from_lower_triangular

    paths = derivatives.tensor_map_paths("01", "1", "pc-bssfp", run["out"])
    mask = load(paths.brain_mask) > 0
    tensor = load(paths.diffusivity)[mask]
    lower = tensor[:, [0, 1, 3, 2, 4, 5]]  # BEP016 D11 D12 D13 D22 D23 D33 -> dipy Dxx Dxy Dyy Dxz Dyz Dzz
    evals, evecs = decompose_tensor(from_lower_triangular(lower))
    np.testing.assert_allclose(load(paths.fa)[mask], fractional_anisotropy(evals), atol=1e-5)
    np.testing.assert_allclose(load(paths.md)[mask], evals.mean(axis=-1), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(load(paths.ad)[mask], axial_diffusivity(evals), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(load(paths.colour_fa)[mask],
                               np.abs(evecs[..., 0]) * fractional_anisotropy(evals)[:, None], atol=1e-4)
    assert np.all(load(paths.fa)[~mask] == 0)


def test_outputs_pass_the_validator_and_parse_with_pybids(run):
    from bids import BIDSLayout

    from bssfp2dt.io.validation import validation_errors

    assert validation_errors(run["out"]) == []
    # every file is indexed, the error tables included (their columns use participant_id, not an entity name)
    layout = BIDSLayout(str(run["out"]), validate=False,
                        config=["bids", "derivatives", derivatives.PYBIDS_BEP016_CONFIG])
    assert layout.get(suffix="errors", extension=".tsv")
    found = layout.get(subject="01", session="1", desc="pcbssfp", model="tensor", suffix="dwimap",
                       extension=".nii.gz", return_type="filename")
    assert sorted(Path(name).name for name in found) == sorted(
        path.name for path in derivatives.tensor_map_paths("01", "1", "pc-bssfp", run["out"]).all()
        if "desc-pcbssfp_" in path.name)
    assert len(layout.get(suffix="probseg", extension=".nii.gz")) == 3


def run_files(output_dir: Path) -> list[Path]:
    """Every file of a participant run, relative, except ``sub-*/log/<run-uuid>/``: that folder is named by
    the run's uuid (start time + uuid4) and holds the run's own config (paths, uuid) and timestamped log."""
    return sorted(path.relative_to(output_dir) for path in output_dir.rglob("*")
                  if path.is_file() and path.relative_to(output_dir).parts[1:2] != ("log",))


@pytest.mark.parametrize("other", ["out2", "out3"])  # same work dir, fresh work dir
def test_same_inputs_give_byte_identical_outputs_and_reuse_the_preprocessing(run, other):
    files = run_files(run["out"])
    assert len([path for path in files if path.name.endswith(".nii.gz")]) >= 12
    assert any(path.suffix == ".tsv" for path in files) and any(path.suffix == ".png" for path in files)
    assert files == run_files(run[other])
    for relative in files:  # tissue maps (seeded HMRF), error tables, figures and report included
        assert (run["out"] / relative).read_bytes() == (run[other] / relative).read_bytes(), relative
    assert len(run["cached"]) >= 12 and run["after"] == run["cached"]  # no node executed again


def test_evaluation_against_the_dwi_reference(run):
    table = derivatives.error_table_path(run["out"], "01", "1", "pc-bssfp", "1")
    assert table.is_file() and derivatives.participant_report_path(run["out"], "01").is_file()
    assert derivatives.error_map_path(run["out"], "01", "1", "pc-bssfp", "fa", "1").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_model_is_one_line_and_exit_66(run, tmp_path, capsys, damage):
    broken = tmp_path / "broken.pt"
    data = run["model"].read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 100)
    code = main(argv(run["bids"], tmp_path / "out", run["work"], broken))
    assert code == 66 and one_error_line(capsys.readouterr().err).count(str(broken)) == 1


def test_a_sha256_mismatch_is_exit_66(run, tmp_path, capsys):
    model = tmp_path / "model.pt"
    shutil.copy(run["model"], model)
    (tmp_path / "model.pt.sha256").write_text(f"{'0' * 64}  model.pt\n")
    code = main(argv(run["bids"], tmp_path / "out", run["work"], model))
    assert code == 66 and "sha256 " in one_error_line(capsys.readouterr().err)


def test_a_model_without_the_modality_head_is_exit_66(run, tmp_path):
    other = save_release_checkpoint(tmp_path / "t1w.pt", build_generator("tiny", ["t1w"]), config={},
                                    stage="direct", modality="t1w", normalization=run["normalization"].to_dict())
    with pytest.raises(Exception, match="no input head for pc-bssfp") as raised:
        load_model("pc-bssfp", other, torch.device("cpu"))
    assert raised.value.exit_code == 66


def _plan(run, output_dir: Path, subjects, stop_on_first_crash: bool, modality: str = "pc-bssfp",
          model: Path | None = None, batch_size: int = 1, mem_mb: int | None = None) -> RunPlan:
    config = Config(paths=PathSettings(bids_dir=run["bids"], output_dir=output_dir, work_dir=run["work"]),
                    selection=SelectionSettings(analysis_level="participant", input_modality=modality,
                                                bids_queries=json.dumps(bids_io.DEFAULT_QUERIES)),
                    resources=ResourceSettings(nprocs=1, omp_nthreads=1, device="cpu", mem_mb=mem_mb),
                    run=RunSettings(run_uuid="run7", stop_on_first_crash=stop_on_first_crash),
                    model=ModelSettings(model=model or run["model"], patch_size=PATCH, batch_size=batch_size))
    inputs = bids_io.discover(config)
    return RunPlan(config=config, subjects=tuple(subjects(inputs)))


@pytest.mark.parametrize("stop", [False, True])
def test_a_failing_subject_leaves_a_crash_file_and_its_own_exit_code(run, tmp_path, monkeypatch, stop):
    monkeypatch.setattr(workflow, "settings_from_config", fast_settings(workflow.settings_from_config))
    no_t1w = bids_io.SubjectInputs(subject="99", sessions=())  # the workflow refuses a subject without T1w
    plan = _plan(run, tmp_path / "out", lambda inputs: (no_t1w,) + inputs, stop)
    with pytest.raises(MissingInputError) as raised:  # a data error: the other subjects run, then exit 66
        run_participant(plan)
    assert raised.value.exit_code == 66 and raised.value.message == "sub-99 has no session with a T1w; add one"
    crashes = list((tmp_path / "out" / "sub-99" / "log" / "run7").glob("crash-*-sub-99-participant.txt"))
    assert len(crashes) == 1 and "no session with a T1w" in crashes[0].read_text()
    tensor = derivatives.tensor_map_paths("01", "1", "pc-bssfp", tmp_path / "out").diffusivity
    assert tensor.is_file() is not stop  # --stop-on-first-crash skips the subjects after the failure


@pytest.mark.parametrize("mem_mb, chosen", [(1_000_000, 4), (1, 1)])
def test_mem_bounds_the_sliding_window_batch(run, tmp_path, monkeypatch, caplog, mem_mb, chosen):
    """--batch-size 4 with ample or too little --mem: the batch is logged, the tensor unchanged (one patch)."""
    monkeypatch.setattr(workflow, "settings_from_config", fast_settings(workflow.settings_from_config))
    plan = _plan(run, tmp_path / "out", lambda inputs: inputs, False, batch_size=4, mem_mb=mem_mb)
    with caplog.at_level("INFO", logger="bssfp2dt"):
        assert run_participant(plan) == 0
    assert f"sliding-window batch {chosen} of --batch-size 4" in caplog.text
    assert ("even one 32^3 patch may not fit" in caplog.text) is (chosen == 1)
    tensor, reference = (derivatives.tensor_map_paths("01", "1", "pc-bssfp", out).diffusivity
                         for out in (tmp_path / "out", run["out"]))
    assert tensor.read_bytes() == reference.read_bytes()


def test_network_inputs_of_each_modality(tmp_path):
    """Closed forms on random arrays: (x - low) / (high - low), clipped, masked, channels first."""
    from types import SimpleNamespace

    from bssfp2dt.io.nifti import save_nifti
    from bssfp2dt.pipeline.participant import network_input

    rng = np.random.default_rng(5)
    shape = (5, 4, 3)
    mask = rng.random(shape) > 0.3
    magnitude, phase = rng.uniform(0, 120, shape + (12,)), rng.uniform(-np.pi, np.pi, shape + (12,))
    channels = np.stack([magnitude, phase], axis=-1).reshape(shape + (24,))  # m0, p0, m1, p1, ...
    t1w, tensor = rng.uniform(0, 900, shape), rng.uniform(-1e-3, 3e-3, shape + (6,))
    session = SimpleNamespace(**{name: save_nifti(data, np.eye(4), tmp_path / f"{name}.nii.gz", dtype=np.float64)
                                 for name, data in (("bssfp", channels), ("t1w", t1w), ("tensor", tensor))})
    norm = Normalization(magnitude=Range(0.0, 100.0), phase=Range(-np.pi, np.pi), t1w=Range(100.0, 800.0),
                         tensor_diagonal=Range(0.0, 3e-3), tensor_offdiagonal=Range(-1e-3, 1e-3))
    m = np.clip(magnitude / 100.0, 0, 1) * mask[..., None]
    p = (phase + np.pi) / (2 * np.pi) * mask[..., None]

    pc = network_input(session, "pc-bssfp", norm, mask)
    assert pc.shape == (24,) + shape and pc.dtype == np.float32
    np.testing.assert_allclose(pc[0::2], np.moveaxis(m, -1, 0), atol=1e-6)
    np.testing.assert_allclose(pc[1::2], np.moveaxis(p, -1, 0), atol=1e-6)
    single = network_input(session, "bssfp", norm, mask)
    np.testing.assert_allclose(single[0::2], np.repeat(m[None, ..., 0], 12, axis=0), atol=1e-6)
    np.testing.assert_allclose(single[1::2], np.repeat(p[None, ..., 0], 12, axis=0), atol=1e-6)
    t1 = network_input(session, "t1w", norm, mask)
    np.testing.assert_allclose(t1, np.repeat((np.clip((t1w - 100) / 700, 0, 1) * mask)[None], 6, axis=0), atol=1e-6)
    dt = network_input(session, "dwi-tensor", norm, mask)
    expected = np.empty_like(tensor)
    expected[..., DIAGONAL] = np.clip(tensor[..., DIAGONAL] / 3e-3, 0, 1)
    expected[..., OFF_DIAGONAL] = np.clip((tensor[..., OFF_DIAGONAL] + 1e-3) / 2e-3, 0, 1)
    np.testing.assert_allclose(dt, np.moveaxis(expected * mask[..., None], -1, 0), atol=1e-6)


def test_a_patch_the_model_cannot_take_stops_before_any_preprocessing(run, tmp_path, capsys):
    arguments = argv(run["bids"], tmp_path / "out", tmp_path / "work", run["model"])
    arguments[arguments.index("--patch-size") + 1] = "24"  # the network halves the patch four times
    code = main(arguments)
    assert code == 64 and "--patch-size 24" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_inference_uses_the_models_training_patch_unless_told_otherwise(run):
    from bssfp2dt.pipeline.participant import inference_patch_size

    model = load_model("pc-bssfp", run["model"], torch.device("cpu"))
    trained = model.metadata["config"].get("patch_size")
    config = Config(paths=PathSettings(run["bids"], run["out"], run["work"]),
                    selection=SelectionSettings("participant"), resources=ResourceSettings(1, 1),
                    run=RunSettings(run_uuid="x"), model=ModelSettings(patch_size=None))
    assert inference_patch_size(config, model) == (trained or 64)
    assert inference_patch_size(dataclasses.replace(config, model=ModelSettings(patch_size=48)), model) == 48
