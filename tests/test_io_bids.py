"""BIDS input discovery against tiny datasets whose contents the fixture helpers define."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli.parser import parse_args
from bssfp2dt.config import config_from_args
from bssfp2dt.errors import MissingInputError, NoFilesSelectedError, UsageError
from bssfp2dt.io import bids as bids_io
from bssfp2dt.io.validation import find_validator, select_errors, validation_errors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two subjects x two sessions; T1w only in ses-1. Shared by the tests of this module."""
    return fx.make_bids_dataset(tmp_path_factory.mktemp("raw") / "ds", subjects=("01", "02"), sessions=("1", "2"))


@pytest.fixture(scope="module")
def smriprep(tmp_path_factory) -> Path:
    return fx.make_derivatives_dataset(tmp_path_factory.mktemp("deriv") / "smriprep", subject="01")


def discover(bids_dir: Path, *options: str, output: Path | None = None):
    output = output or bids_dir.parent / "out"
    args = parse_args([str(bids_dir), str(output), "participant", "-w", str(bids_dir.parent / "work"), *options])
    return bids_io.discover(config_from_args(args, "run", bids_io.DEFAULT_QUERIES))


def test_fixture_dataset_passes_the_bids_validator(dataset):
    assert find_validator().name == "bids-validator-deno"
    assert validation_errors(dataset) == []


def test_discovers_every_session_with_typed_inputs(dataset):
    found = discover(dataset)
    assert [s.subject for s in found] == ["01", "02"]
    assert [[ses.session for ses in s.sessions] for s in found] == [["1", "2"], ["1", "2"]]
    ses2 = found[0].sessions[1]
    magnitude, phase = fx.bssfp_paths(dataset, "01", "2")
    assert (ses2.bssfp.magnitude, ses2.bssfp.phase) == (magnitude, phase)
    assert ses2.bssfp.shape == fx.SHAPE + (12,) and ses2.bssfp.n_cycles == 12
    assert ses2.bssfp.phase_increments_deg == tuple(fx.PHASE_INCREMENTS_DEG)
    assert ses2.bssfp.phase_units == "rad"
    assert ses2.bssfp.voxel_size_mm == (2.0, 2.0, 2.0)
    meta = json.loads(fx.sidecar(magnitude).read_text())
    assert (ses2.bssfp.repetition_time_s, ses2.bssfp.echo_time_s, ses2.bssfp.flip_angle_deg,
            ses2.bssfp.field_strength_t) == (meta["RepetitionTime"], meta["EchoTime"], meta["FlipAngle"],
                                             meta["MagneticFieldStrength"])
    # One T1w per subject: session 2 borrows the session-1 T1w.
    assert ses2.t1w.image == fx.t1w_path(dataset, "01", "1") and ses2.t1w.session == "1"
    assert found[0].sessions[0].t1w.session == "1"
    dwi = ses2.dwi
    assert dwi.image == fx.dwi_path(dataset, "01", "2")
    assert dwi.b_values == tuple(float(b) for b in fx.BVALS) and dwi.n_volumes == len(fx.BVALS)
    assert dwi.bval.name == "sub-01_ses-2_dwi.bval" and dwi.bvec.name == "sub-01_ses-2_dwi.bvec"
    assert dwi.reverse_pe_b0.name == "sub-01_ses-2_dir-PA_epi.nii.gz"
    assert (dwi.phase_encoding_direction, dwi.total_readout_time_s) == ("j-", 0.05)
    assert ses2.priors.empty


def test_labels_select_subjects_and_sessions(dataset):
    found = discover(dataset, "--participant-label", "sub-02", "--session-label", "ses-2")
    assert [(s.subject, [x.session for x in s.sessions]) for s in found] == [("02", ["2"])]
    # The T1w still comes from the unselected session 1.
    assert found[0].sessions[0].t1w.image == fx.t1w_path(dataset, "02", "1")


def test_layout_indexes_only_selected_subjects(dataset):
    layout = bids_io.raw_layout(dataset, ["02"])
    assert layout.get_subjects() == ["02"]
    assert bids_io.raw_layout(dataset).get_subjects() == ["01", "02"]


def test_unknown_labels_are_listed(dataset):
    with pytest.raises(NoFilesSelectedError) as caught:
        discover(dataset, "--participant-label", "01", "07", "08")
    assert "sub-07, sub-08" in caught.value.message and "available: 01, 02" in caught.value.message
    with pytest.raises(NoFilesSelectedError) as caught:
        discover(dataset, "--session-label", "9")
    assert "ses-9" in caught.value.message


def test_dataset_without_sessions(tmp_path):
    root = fx.make_bids_dataset(tmp_path / "ds", sessions=(None,), dwi=False)
    (session,) = discover(root)[0].sessions
    assert session.session is None and session.dwi is None
    assert session.bssfp.magnitude == fx.bssfp_paths(root, "01", None)[0]
    assert session.t1w.image == fx.t1w_path(root, "01", None)


@pytest.mark.parametrize(("sidecar_units", "expected"), [("arbitrary", "arbitrary"), (None, "arbitrary")])
def test_scanner_phase_units(tmp_path, sidecar_units, expected):
    root = fx.make_bids_dataset(tmp_path / "ds", sessions=(None,), dwi=False, phase_units=sidecar_units)
    assert discover(root)[0].sessions[0].bssfp.phase_units == expected


def test_radian_phase_detected_without_units(tmp_path):
    root = fx.make_bids_dataset(tmp_path / "ds", sessions=(None,), dwi=False)
    phase_json = fx.sidecar(fx.bssfp_paths(root, "01", None)[1])
    meta = json.loads(phase_json.read_text())
    del meta["Units"]
    phase_json.write_text(json.dumps(meta))
    assert discover(root)[0].sessions[0].bssfp.phase_units == "rad"


@pytest.mark.parametrize(("values", "expected"), [
    (np.array([-np.pi, 0.0, np.pi]), "rad"),
    (np.array([-3.1416, 3.1416], dtype=np.float32), "rad"),  # float32 rounding of pi
    (np.array([0, 17, 4095]), "arbitrary"),
    (np.array([0.0, 2048.0, 4095.0]), "arbitrary"),
    (np.array([0, 4096]), None),
    (np.array([-4, 100]), None),
    (np.array([0.0, 3.5, 10.25]), None),
    (np.array([0.0, np.nan]), None),
    (np.array([]), None),
])
def test_detect_phase_units(values, expected):
    assert bids_io.detect_phase_units(values) == expected


def test_filter_file_null_and_any(tmp_path):
    root = fx.make_bids_dataset(tmp_path / "ds", sessions=(None,), dwi=False)
    plain = fx.t1w_path(root, "01", None)
    mprage = plain.with_name("sub-01_acq-mprage_T1w.nii.gz")
    fx.write_nifti(mprage, np.zeros(fx.SHAPE, dtype=np.float32))

    def t1w_with(query: dict) -> Path:
        filters = tmp_path / "filters.json"
        filters.write_text(json.dumps({"t1w": query}))
        return discover(root, "--bids-filter-file", str(filters))[0].sessions[0].t1w.image

    assert t1w_with({"acquisition": None}) == plain  # null: entity must be absent
    assert t1w_with({"acquisition": "*"}) == mprage  # "*": any value, but present
    assert t1w_with({"acquisition": "mprage"}) == mprage


def test_filter_file_rejects_subject_entities(tmp_path, dataset):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"session": "1"}}))
    with pytest.raises(UsageError) as caught:
        discover(dataset, "--bids-filter-file", str(filters))
    assert "--session-label" in caught.value.message


def test_priors_from_derivatives(dataset, smriprep):
    found = discover(dataset, "--participant-label", "01", "02", "--derivatives", f"smriprep={smriprep}")
    priors = found[0].sessions[0].priors
    anat = smriprep / "sub-01" / "anat"
    assert priors.gm == anat / "sub-01_label-GM_probseg.nii.gz"  # not the space-MNI152 one
    assert priors.wm == anat / "sub-01_label-WM_probseg.nii.gz"
    assert priors.csf == anat / "sub-01_label-CSF_probseg.nii.gz"
    assert priors.brain_mask == anat / "sub-01_desc-brain_mask.nii.gz"
    assert found[0].sessions[1].priors == priors  # subject-wide maps serve every session
    assert found[1].sessions[0].priors.empty  # sub-02 has none


def test_t1w_modality_skips_bssfp_and_requirements(tmp_path):
    root = fx.make_bids_dataset(tmp_path / "ds", sessions=(None,), dwi=False)
    for path in fx.bssfp_paths(root, "01", None):
        path.unlink()
    found = discover(root, "--input-modality", "t1w")
    assert found[0].sessions[0].bssfp is None
    bids_io.require_inputs(found, "t1w", training=False)
    with pytest.raises(MissingInputError) as caught:
        bids_io.require_inputs(found, "pc-bssfp", training=False)
    assert "sub-01 has no pc-bSSFP" in caught.value.message
    with pytest.raises(MissingInputError) as caught:
        bids_io.require_inputs(found, "t1w", training=True)
    assert "sub-01 has no DWI" in caught.value.message


def test_truncated_and_multimember_gzip(tmp_path):
    data = np.arange(8 * 8 * 8, dtype=np.float32).reshape(fx.SHAPE)
    intact = fx.write_nifti(tmp_path / "intact.nii.gz", data)
    assert bids_io.read_nifti_header(intact).get_data_shape() == fx.SHAPE
    raw = gzip.decompress(intact.read_bytes())
    # Two gzip members (valid per RFC 1952): the trailer holds only the last member's size.
    two_members = tmp_path / "two.nii.gz"
    two_members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(nib.load(two_members).get_fdata(), data)
    assert bids_io.read_nifti_header(two_members).get_data_shape() == fx.SHAPE
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(MissingInputError, match="truncated"):
        bids_io.read_nifti_header(truncated)
    plain = tmp_path / "short.nii"
    plain.write_bytes(raw[:-4])
    with pytest.raises(MissingInputError, match="truncated"):
        bids_io.read_nifti_header(plain)


def test_select_errors_keeps_dataset_level_and_selected_subjects():
    report = {"issues": {"issues": [
        {"code": "A", "severity": "error", "location": "/sub-01/anat/x.nii.gz"},
        {"code": "B", "severity": "error", "location": "/sub-02/anat/y.nii.gz", "issueMessage": "bad  y"},
        {"code": "C", "severity": "warning", "location": "/sub-02/anat/z.nii.gz"},
        {"code": "D", "severity": "error", "location": "/dataset_description.json"},
    ], "codeMessages": {"A": "a message", "D": "d message"}}}
    assert [(e.code, e.location, e.message) for e in select_errors(report, ["02"])] == [
        ("B", "/sub-02/anat/y.nii.gz", "bad y"), ("D", "/dataset_description.json", "d message")]
    assert [e.code for e in select_errors(report)] == ["A", "B", "D"]
