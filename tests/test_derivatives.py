"""The derivatives writer: names from the conventions table, valid BIDS, pybids-parsable, exact content."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt import __version__
from bssfp2dt.errors import OutputError
from bssfp2dt.io import derivatives as out
from bssfp2dt.io.validation import validation_errors

# bids-conventions.md section 3, written out by hand as the independent reference.
EXPECTED_NAMES = {
    "diffusivity": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-diffusivity_dwimap.nii.gz",
    "fa": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-fa_dwimap.nii.gz",
    "md": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-md_dwimap.nii.gz",
    "ad": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-ad_dwimap.nii.gz",
    "rd": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-rd_dwimap.nii.gz",
    "inclination": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-inclination_dwimap.nii.gz",
    "azimuth": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfp_model-tensor_param-azimuth_dwimap.nii.gz",
    "colour_fa": "sub-01/ses-1/dwi/sub-01_ses-1_space-T1w_desc-pcbssfpdec_model-tensor_param-fa_dwimap.nii.gz",
    "gm": "sub-01/ses-1/anat/sub-01_ses-1_space-T1w_label-GM_probseg.nii.gz",
    "wm": "sub-01/ses-1/anat/sub-01_ses-1_space-T1w_label-WM_probseg.nii.gz",
    "csf": "sub-01/ses-1/anat/sub-01_ses-1_space-T1w_label-CSF_probseg.nii.gz",
    "brain_mask": "sub-01/ses-1/anat/sub-01_ses-1_space-T1w_desc-brain_mask.nii.gz",
}
AFFINE = np.array([[2.0, 0, 0, -8], [0, 2.0, 0, -8], [0, 0, 2.0, -8], [0, 0, 0, 1]])


def test_naming_table():
    paths = out.tensor_map_paths("01", "1", "pc-bssfp")
    assert {name: path.as_posix() for name, path in vars(paths).items()} == EXPECTED_NAMES
    assert out.tensor_map_paths("01", "1", "pcbssfp") == paths
    assert len(set(paths.all())) == 12


@pytest.mark.parametrize(("modality", "desc"), [("bssfp", "bssfp"), ("t1w", "t1w"), ("dwi-tensor", "dwi")])
def test_naming_without_session(modality, desc):
    paths = out.tensor_map_paths("02", None, modality, root="/o")
    assert paths.fa == Path(f"/o/sub-02/dwi/sub-02_space-T1w_desc-{desc}_model-tensor_param-fa_dwimap.nii.gz")
    assert paths.colour_fa.name == f"sub-02_space-T1w_desc-{desc}dec_model-tensor_param-fa_dwimap.nii.gz"
    assert paths.brain_mask == Path("/o/sub-02/anat/sub-02_space-T1w_desc-brain_mask.nii.gz")


def test_unknown_modality_is_rejected():
    with pytest.raises(ValueError):
        out.tensor_map_paths("01", None, "flair")


def synthetic_maps(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = fx.SHAPE
    maps = {"diffusivity": rng.normal(0, 1e-3, shape + (6,)), "colour_fa": rng.uniform(0, 1, shape + (3,)),
            "brain_mask": (rng.uniform(size=shape) > 0.3).astype(np.uint8)}
    maps.update({name: rng.uniform(0, 1, shape) for name in ("fa", "md", "ad", "rd", "gm", "wm", "csf")})
    maps.update({"inclination": rng.uniform(0, 180, shape), "azimuth": rng.uniform(-180, 180, shape)})
    return maps


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A derivatives dataset for sub-01 (ses-1, ses-2) written from synthetic arrays."""
    base = tmp_path_factory.mktemp("derivatives")
    raw = fx.make_bids_dataset(base / "raw", sessions=("1", "2"), dwi=False)
    output = base / "out"
    out.initialise_dataset(output, raw)
    rng = np.random.default_rng(3)
    arrays = {}
    for session in ("1", "2"):
        paths = out.tensor_map_paths("01", session, "pc-bssfp", output)
        sources = [out.bids_uri(p, raw) for p in fx.bssfp_paths(raw, "01", session)]
        reference = out.bids_uri(fx.t1w_path(raw, "01", "1"), raw)
        arrays[session] = synthetic_maps(rng)
        out.write_tensor_outputs(paths, arrays[session], AFFINE, sources, reference, "pc-bssfp",
                                 model_parameters={"Checkpoint": "default"})
    return raw, output, arrays


def test_written_dataset_passes_the_validator(written):
    _, output, _ = written
    assert validation_errors(output) == []


def test_pybids_parses_every_output(written):
    from bids import BIDSLayout

    _, output, _ = written
    layout = BIDSLayout(str(output), validate=False, config=["bids", "derivatives", out.PYBIDS_BEP016_CONFIG])
    for session in ("1", "2"):
        paths = out.tensor_map_paths("01", session, "pc-bssfp", output)
        for name, path in vars(paths).items():
            entities = layout.get_file(str(path)).get_entities()
            assert entities["subject"] == "01" and entities["session"] == session and entities["space"] == "T1w"
            if name in ("gm", "wm", "csf"):
                assert (entities["suffix"], entities["label"]) == ("probseg", name.upper())
            elif name == "brain_mask":
                assert (entities["suffix"], entities["desc"]) == ("mask", "brain")
            else:
                expected_param = "fa" if name == "colour_fa" else name
                assert (entities["suffix"], entities["model"], entities["param"]) == ("dwimap", "tensor",
                                                                                      expected_param)
                assert entities["desc"] == ("pcbssfpdec" if name == "colour_fa" else "pcbssfp")
    # The plain derivative config parses the standard entities too.
    plain = BIDSLayout(str(output), validate=False, is_derivative=True)
    assert len(plain.get(suffix="probseg", extension=".nii.gz")) == 6


def test_images_and_sidecars_hold_what_was_written(written):
    raw, output, arrays = written
    paths = out.tensor_map_paths("01", "2", "pc-bssfp", output)
    for name, data in arrays["2"].items():
        image = nib.load(getattr(paths, name))
        np.testing.assert_allclose(np.asarray(image.dataobj), data.astype(np.float32 if name != "brain_mask"
                                                                          else np.uint8))
        np.testing.assert_array_equal(image.affine, AFFINE)
    tensor = json.loads(out.sidecar_path(paths.diffusivity).read_text())
    assert tensor["Units"] == "mm^2/s" and tensor["SkullStripped"] is True
    assert tensor["OrientationEncoding"] == {"Type": "tensor", "TensorRank": 2, "EncodingAxis": 3, "Reference": "xyz"}
    assert set(tensor["Model"]) == {"Description", "URL", "Parameters"}
    assert tensor["Model"]["Parameters"] == {"InputModality": "pc-bssfp", "Checkpoint": "default"}
    assert tensor["Sources"] == ["bids:raw:sub-01/ses-2/anat/sub-01_ses-2_acq-pcbssfp_part-mag_T2w.nii.gz",
                                 "bids:raw:sub-01/ses-2/anat/sub-01_ses-2_acq-pcbssfp_part-phase_T2w.nii.gz"]
    assert tensor["SpatialReference"] == "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    dec = json.loads(out.sidecar_path(paths.colour_fa).read_text())
    assert dec["OrientationEncoding"] == {"Type": "dec", "EncodingAxis": 3, "Reference": "xyz"}
    units = {p: json.loads(out.sidecar_path(paths.scalar(p)).read_text())["Units"]
             for p in ("fa", "md", "ad", "rd", "inclination", "azimuth")}
    assert units == {"fa": "ratio", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s", "inclination": "deg",
                     "azimuth": "deg"}
    mask = json.loads(out.sidecar_path(paths.brain_mask).read_text())
    assert mask["Type"] == "Brain" and "SkullStripped" not in mask
    assert not list(output.rglob("*.part*"))  # atomic writes leave no temporaries


def test_dataset_description_and_bidsignore(written):
    raw, output, _ = written
    description = json.loads((output / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0] == {"Name": "bssfp2dt", "Version": __version__, "CodeURL": out.CODE_URL}
    assert description["DatasetLinks"] == {"raw": raw.resolve().as_uri()}
    assert "SourceDatasets" not in description  # the raw dataset has no DOI
    assert "CITATION.md" in description["HowToAcknowledge"] and description["License"] == "CC0"  # the raw one
    bare = raw.parent / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    assert "declares none" in out.dataset_description(bare)["License"]
    ignored = (output / ".bidsignore").read_text().splitlines()
    assert {"*_dwimap.*", "*.html", "figures/", "logs/", "log/"} <= set(ignored)


def test_container_and_doi_provenance(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    fx.write_description(raw, DatasetDOI="https://doi.org/10.18112/openneuro.ds000001.v1.0.0")
    description = out.dataset_description(raw, {"BSSFP2DT_CONTAINER_TYPE": "docker",
                                                "BSSFP2DT_CONTAINER_TAG": "bssfp2dt/bssfp2dt:0.1.0"})
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "bssfp2dt/bssfp2dt:0.1.0"}
    assert description["SourceDatasets"] == [{"DOI": "doi:10.18112/openneuro.ds000001.v1.0.0"}]
    assert description["DatasetLinks"]["raw"] == "doi:10.18112/openneuro.ds000001.v1.0.0"
    assert "Container" not in out.dataset_description(raw, {})["GeneratedBy"][0]


def test_refuses_another_pipelines_output(tmp_path):
    fx.write_json(tmp_path / "dataset_description.json",
                  {"Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "fmriprep"}]})
    with pytest.raises(OutputError, match="fmriprep"):
        out.check_output_dataset(tmp_path)
    out.check_output_dataset(tmp_path / "absent")  # nothing there yet: fine


def test_wrong_volume_counts_are_rejected(tmp_path):
    paths = out.tensor_map_paths("01", None, "t1w", tmp_path)
    with pytest.raises(ValueError, match="6"):
        out.write_tensor_outputs(paths, {"diffusivity": np.zeros(fx.SHAPE + (3,))}, AFFINE, [], "bids:raw:x", "t1w")
    with pytest.raises(ValueError, match="unknown"):
        out.write_tensor_outputs(paths, {"tensor": np.zeros(fx.SHAPE)}, AFFINE, [], "bids:raw:x", "t1w")
    assert not paths.diffusivity.exists()


def test_find_participant_results(written):
    _, output, _ = written
    results = out.find_participant_results(output)
    assert list(results) == ["01"]
    assert results["01"] == tuple(out.tensor_map_paths("01", s, "pc-bssfp", output).diffusivity for s in ("1", "2"))
    assert out.find_participant_results(output, ["02"]) == {}


def test_log_and_config_paths():
    assert out.run_config_path(Path("/o"), "01", "r1") == Path("/o/sub-01/log/r1/bssfp2dt.toml")
    assert out.run_config_path(Path("/o"), None, "r1") == Path("/o/log/r1/bssfp2dt.toml")


def test_bids_uri_of_a_symlinked_input_names_the_bids_path(tmp_path):
    """DataLad/git-annex datasets hold symlinks into .git/annex; the URI is the BIDS path, not the target."""
    from bssfp2dt.io.derivatives import bids_uri

    annex = tmp_path / "ds" / ".git" / "annex" / "objects"
    annex.mkdir(parents=True)
    (annex / "MD5E-s1--abc.nii.gz").write_bytes(b"x")
    anat = tmp_path / "ds" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    link = anat / "sub-01_T1w.nii.gz"
    link.symlink_to(annex / "MD5E-s1--abc.nii.gz")
    assert bids_uri(link, tmp_path / "ds") == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    import os
    import stat

    from bssfp2dt.io.nifti import write_text

    path = write_text("x", tmp_path / "file.txt")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


KILLED_WRITER = """
import os, signal, sys
from bssfp2dt.io.nifti import atomic_path
open_writes = [atomic_path(os.path.join(sys.argv[1], name)) for name in sys.argv[2:]]  # kept referenced
for context in open_writes:
    context.__enter__().write_bytes(b"half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_temporaries_of_a_killed_writer_are_removed_but_not_a_live_writers(tmp_path):
    import signal
    import subprocess

    from bssfp2dt.io.nifti import TEMPORARY_NAME, atomic_path, remove_stale_temporaries

    names = ["sub-01_ses-1_desc-x_dwimap.nii.gz", "sub-01.html", ".bidsignore", "sub-02_T1w.json"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), *names])
    assert killed.returncode == -signal.SIGKILL
    left = sorted(path for path in tmp_path.iterdir())
    assert len(left) == len(names) and all(TEMPORARY_NAME.match(path.name) for path in left)
    with atomic_path(tmp_path / "sub-01_live.nii.gz") as live:
        live.write_bytes(b"being written")
        assert remove_stale_temporaries(tmp_path) == []  # younger than STALE_AFTER_S
        removed = remove_stale_temporaries(tmp_path, lambda stem: stem.startswith("sub-01") or stem == "",
                                           min_age_s=0)
        assert live.exists()  # its writer holds the lock
    assert sorted(removed) == sorted(path for path in left if not path.name.startswith(".sub-02"))
    assert sorted(path.name[:8] for path in tmp_path.iterdir()) == [".sub-02_", "sub-01_l"]  # another subject's kept
    assert (tmp_path / "sub-01_live.nii.gz").read_bytes() == b"being written"
