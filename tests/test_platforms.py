"""Platform descriptions and adapters: the Boutiques descriptor (vs the parser and ``bosh``) and the
Brainlife entry point (config.json -> BIDS -> bssfp2dt; participant outputs -> ``neuro/tensor``)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bssfp2dt.cli import run as cli_run
from bssfp2dt.cli.parser import build_parser, parse_args
from bssfp2dt.cli.platforms import boutiques_descriptor, descriptor_json
from bssfp2dt.io.derivatives import TENSOR_COMPONENT_ORDER, tensor_map_paths, write_tensor_outputs
from bssfp2dt.simulation.dataset import simulate_dataset

from helpers import tiny_config
REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "boutiques" / "descriptor.json"
BOSH = Path(sys.executable).with_name("bosh")


def load_brainlife_main():
    """Import brainlife/main (a script without .py) as a module."""
    loader = SourceFileLoader("brainlife_main", str(REPO / "brainlife" / "main"))
    module = module_from_spec(spec_from_loader("brainlife_main", loader))
    sys.modules["brainlife_main"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


brainlife = load_brainlife_main()


# --------------------------------------------------------------------------- Boutiques
def test_checked_in_descriptor_is_generated_from_the_parser():
    assert DESCRIPTOR.read_text() == descriptor_json(), "run python scripts/make_boutiques.py"


def test_descriptor_covers_every_parser_option_with_its_choices_and_defaults():
    descriptor = boutiques_descriptor()
    inputs = {item["id"]: item for item in descriptor["inputs"]}
    actions = {action.dest: action for action in build_parser()._actions
               if action.dest not in ("help", "version") and action.option_strings != ["--bids-exec-spec"]}
    assert set(inputs) == set(actions)
    for dest, action in actions.items():
        entry = inputs[dest]
        assert entry["value-key"] in descriptor["command-line"]
        assert entry.get("command-line-flag") in (action.option_strings or [None])
        if action.choices:
            assert entry["value-choices"] == list(action.choices)
        if action.nargs == 0:
            assert entry["type"] == "Flag"
    assert inputs["analysis_level"]["value-choices"] == ["participant", "group"]
    # No default: inference takes the model's training patch, training the recipe's.
    assert inputs["patch_size"] == {**inputs["patch_size"], "type": "Number", "integer": True, "minimum": 1}
    assert "default-value" not in inputs["patch_size"]
    assert descriptor["container-image"]["image"].endswith(":" + (REPO / "version").read_text().strip())


@pytest.mark.skipif(not BOSH.exists(), reason="boutiques (bosh) not installed")
def test_bosh_validates_the_descriptor():
    result = subprocess.run([str(BOSH), "validate", str(DESCRIPTOR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not BOSH.exists(), reason="boutiques (bosh) not installed")
def test_command_line_built_by_bosh_parses_back_to_the_invocation(tmp_path):
    invocation = {"bids_dir": "/data", "output_dir": "/out", "analysis_level": "participant",
                  "participant_label": ["01", "02"], "nprocs": 4, "mem": "8G", "input_modality": "t1w",
                  "dry_run": True, "skip_bids_validation": True, "seed": 7}
    (tmp_path / "invocation.json").write_text(json.dumps(invocation))
    result = subprocess.run([str(BOSH), "exec", "simulate", "-i", str(tmp_path / "invocation.json"),
                             str(DESCRIPTOR)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("bssfp2dt "))
    args = parse_args(shlex.split(line)[1:])
    assert (args.bids_dir, args.output_dir, args.analysis_level) == (Path("/data"), Path("/out"), "participant")
    assert args.participant_label == ["01", "02"]
    assert (args.nprocs, args.mem, args.input_modality, args.seed) == (4, 8 * 1024, "t1w", 7)
    assert args.dry_run and args.skip_bids_validation and not args.write_preproc


def test_bids_exec_spec_prints_the_descriptor_without_heavy_imports():
    code = ("import sys\nfrom bssfp2dt.cli.run import main\ntry:\n    main(['--bids-exec-spec'])\n"
            "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
            "heavy = sorted(m for m in ('torch', 'bids', 'nibabel', 'numpy') if m in sys.modules)\n"
            "sys.stderr.write(repr(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(DESCRIPTOR.read_text())
    assert result.stderr.strip() == "[]"


# --------------------------------------------------------------------------- Brainlife
@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brainlife") / "raw"
    return simulate_dataset(root, tiny_config(seed=3), progress=False)


def brainlife_config(raw: Path, job: Path) -> dict:
    """config.json as Brainlife writes it: paths relative to the job folder, options as strings."""
    anat, dwi = raw / "sub-01" / "ses-1" / "anat", raw / "sub-01" / "ses-1" / "dwi"
    relative = lambda path: os.path.relpath(path, job)  # noqa: E731
    return {
        "t1": relative(anat / "sub-01_ses-1_T1w.nii.gz"),
        "bssfp_mag": relative(anat / "sub-01_ses-1_acq-pcbssfp_part-mag_T2w.nii.gz"),
        "bssfp_phase": relative(anat / "sub-01_ses-1_acq-pcbssfp_part-phase_T2w.nii.gz"),
        "dwi": relative(dwi / "sub-01_ses-1_dwi.nii.gz"), "bvals": relative(dwi / "sub-01_ses-1_dwi.bval"),
        "bvecs": relative(dwi / "sub-01_ses-1_dwi.bvec"),
        "phase_increments": "0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330", "phase_units": "rad",
        "device": "cpu", "nprocs": 1, "copy_inputs": "false",
        "_inputs": [{"id": "t1", "meta": {"subject": "sub-Pilot_7"}}],
    }


def test_brainlife_config_becomes_a_bids_dataset_that_bssfp2dt_reads(simulated, tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    config = brainlife_config(simulated, job)
    inputs = brainlife.parse_config(config, base=job)
    assert (inputs.subject, inputs.input_modality) == ("Pilot7", "pc-bssfp")
    written = brainlife.build_bids_dataset(inputs, job / "bids")

    anat = job / "bids" / "sub-Pilot7" / "anat"
    assert written["bssfp_mag"] == anat / "sub-Pilot7_acq-pcbssfp_part-mag_T2w.nii.gz"
    assert written["t1"] == anat / "sub-Pilot7_T1w.nii.gz"
    for kind in ("t1", "bssfp_mag", "bssfp_phase", "dwi"):
        assert not written[kind].is_symlink() and written[kind].samefile(job / config[kind])  # a hard link
    for kind in ("bvals", "bvecs"):
        assert written[kind].read_bytes() == (job / config[kind]).read_bytes()
    phase_sidecar = json.loads(written["bssfp_phase"].with_name("sub-Pilot7_acq-pcbssfp_part-phase_T2w.json")
                               .read_text())
    assert phase_sidecar == {"PhaseIncrements": [30.0 * k for k in range(12)], "Units": "rad"}

    # The app itself (BIDS validation included) must find the pair, the T1w and the DWI.
    assert cli_run.main([str(job / "bids"), str(tmp_path / "out"), "participant", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"bSSFP phase:     {written['bssfp_phase']} (12 cycles, units rad)" in printed
    volumes = nib.load(job / config["dwi"]).shape[3]
    assert f"DWI:             {written['dwi']} ({volumes} volumes)" in printed
    assert not (tmp_path / "out").exists()

    command = brainlife.bssfp2dt_command(inputs, job / "bids", job / "out", job / "work")
    args = parse_args(command[1:])
    assert args.participant_label == ["Pilot7"] and args.input_modality == "pc-bssfp"
    assert (args.device, args.nprocs) == ("cpu", 1)


@pytest.mark.parametrize("change, message", [
    ({"t1": None}, "'t1' is required"),
    ({"bssfp_phase": ""}, "give both"),
    ({"bvals": None}, "needs 'bvals'"),
    ({"input_modality": "dwi"}, "is not one of"),
    ({"phase_units": "deg"}, "phase_units"),
    ({"phase_increments": "0, thirty"}, "phase_increments"),
    ({"t1": "missing.nii.gz"}, "is not a file"),
])
def test_brainlife_config_errors_name_the_key(simulated, tmp_path, change, message):
    config = {**brainlife_config(simulated, tmp_path), **change}
    with pytest.raises(brainlife.ConfigError, match=message):
        brainlife.parse_config(config, base=tmp_path)


def test_brainlife_t1w_only_config_and_default_subject(simulated, tmp_path):
    config = {key: value for key, value in brainlife_config(simulated, tmp_path).items()
              if key in ("t1",)}
    inputs = brainlife.parse_config({**config, "copy_inputs": "true"}, base=tmp_path)
    assert (inputs.subject, inputs.input_modality, inputs.bssfp_mag, inputs.dwi) == ("01", "t1w", None, None)
    written = brainlife.build_bids_dataset(inputs, tmp_path / "bids")
    assert sorted(written) == ["t1"]
    source = tmp_path / config["t1"]
    assert not written["t1"].samefile(source) and written["t1"].read_bytes() == source.read_bytes()


def symmetric_tensors(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random symmetric positive-definite tensors, X x Y x Z x 3 x 3 (mm^2/s)."""
    factors = rng.normal(scale=0.03, size=shape + (3, 3))
    return factors @ np.swapaxes(factors, -1, -2) + 1e-4 * np.eye(3)


def test_brainlife_tensor_datatype_from_a_participant_output_tree(tmp_path):
    from dipy.reconst.dti import lower_triangular

    rng = np.random.default_rng(5)
    shape = (5, 4, 3)
    full = symmetric_tensors(shape, rng)
    index = {"D11": (0, 0), "D12": (0, 1), "D13": (0, 2), "D22": (1, 1), "D23": (1, 2), "D33": (2, 2)}
    bep016 = np.stack([full[..., i, j] for i, j in (index[name] for name in TENSOR_COMPONENT_ORDER)], axis=-1)
    maps = {"diffusivity": bep016, **{name: rng.uniform(size=shape) for name in ("fa", "md", "ad", "rd")},
            "colour_fa": rng.uniform(size=shape + (3,))}
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = tensor_map_paths("01", None, "pc-bssfp", root=tmp_path / "out")
    write_tensor_outputs(paths, maps, affine, ["bids:raw:sub-01/anat/x.nii.gz"], "bids:raw:sub-01/anat/t1.nii.gz",
                         "pc-bssfp")

    written = brainlife.write_tensor_datatype(tmp_path / "out", "01", "pc-bssfp", tmp_path / "tensor")
    assert sorted(path.name for path in (tmp_path / "tensor").iterdir()) == \
        ["ad.nii.gz", "fa.nii.gz", "md.nii.gz", "rd.nii.gz", "tensors.nii.gz"]
    for name in ("fa", "md", "ad", "rd"):
        np.testing.assert_allclose(nib.load(written[name]).get_fdata(), maps[name], rtol=1e-6)
    tensors = nib.load(written["tensors"])
    assert tensors.shape == shape + (1, 6)
    assert tensors.header.get_intent()[0] == "symmetric matrix"
    np.testing.assert_allclose(tensors.affine, affine)
    np.testing.assert_allclose(tensors.get_fdata()[:, :, :, 0, :], lower_triangular(full), rtol=1e-5, atol=1e-9)


def test_brainlife_tensor_datatype_reports_missing_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="param-diffusivity"):
        brainlife.write_tensor_datatype(tmp_path, "01", "t1w", tmp_path / "tensor")


def test_brainlife_runs_itself_in_the_image_without_the_package(tmp_path, monkeypatch):
    runner = tmp_path / "apptainer"
    runner.write_text("#!/bin/sh\n")
    runner.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("BSSFP2DT_IMAGE", "docker://example/bssfp2dt:1.2.3")
    command = brainlife.container_command(["--config", "c.json"], Path("/app/main"), gpu=True)
    assert command[:4] == [str(runner), "exec", "-e", "--nv"]
    assert command[-5:] == ["docker://example/bssfp2dt:1.2.3", "python3", "/app/main", "--config", "c.json"]


def test_brainlife_example_config_and_image_match_this_release():
    example = json.loads((REPO / "brainlife" / "config.json.example").read_text())
    assert {key for key in example if not key.startswith("_")} == brainlife.CONFIG_KEYS
    assert brainlife.DEFAULT_IMAGE == f"docker://bssfp2dt/bssfp2dt:{(REPO / 'version').read_text().strip()}"
