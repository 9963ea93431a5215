"""The FSL path of the reference DWI: topup and eddy through fslpy, checked by the commands fslpy builds.

FSL cannot be installed here, so ``FSLDIR`` points to a folder whose ``bin/topup`` and ``bin/eddy`` are
placeholders that fslpy accepts; ``cmdonly=True`` returns the command lines without running them.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from bssfp2dt.errors import MissingInputError
from bssfp2dt.preprocessing import fsl


@pytest.fixture
def fsldir(tmp_path, monkeypatch):
    folder = tmp_path / "fsl"
    (folder / "bin").mkdir(parents=True)
    for tool in fsl.FSL_TOOLS:
        path = folder / "bin" / tool
        path.write_text("#!/bin/sh\nexit 1\n")  # never run: cmdonly
        path.chmod(0o755)
    monkeypatch.setenv("FSLDIR", str(folder))
    return folder


@pytest.fixture
def dwi_files(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = rng.uniform(50, 100, (8, 8, 6, 4)).astype(np.float32)
    data[2:6, 2:6, 1:5] += 400  # a bright 'brain' for the b0 mask
    paths = {"dwi": tmp_path / "sub-01_dwi.nii.gz", "bval": tmp_path / "sub-01_dwi.bval",
             "bvec": tmp_path / "sub-01_dwi.bvec", "b0": tmp_path / "sub-01_dir-PA_epi.nii.gz"}
    nib.save(nib.Nifti1Image(data, affine), str(paths["dwi"]))
    nib.save(nib.Nifti1Image(data[..., :1], affine), str(paths["b0"]))
    paths["bval"].write_text("0 1000 1000 1000\n")
    paths["bvec"].write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (tmp_path / "sub-01_dwi.json").write_text(json.dumps({"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.062}))
    (tmp_path / "sub-01_dir-PA_epi.json").write_text(json.dumps({"PhaseEncodingDirection": "j",
                                                                  "TotalReadoutTime": 0.062}))
    return paths


def test_commands_fslpy_builds_for_topup_and_eddy(fsldir, dwi_files, tmp_path):
    assert fsl.fsl_status(dwi_files["b0"]) is None
    result = fsl.topup_eddy(dwi_files["dwi"], dwi_files["bval"], dwi_files["bvec"], dwi_files["b0"], tmp_path / "out",
                            cmdonly=True)
    topup, eddy = result.commands
    work = tmp_path / "out" / "fsl"
    assert topup[0] == str(fsldir / "bin" / "topup")
    assert {f"--imain={work / 'b0_pair.nii.gz'}", f"--datain={work / 'acqp.txt'}", "--config=b02b0.cnf",
            f"--out={work / 'topup'}"} <= set(topup)
    assert eddy[0] == str(fsldir / "bin" / "eddy")
    assert {f"--imain={dwi_files['dwi']}", f"--mask={work / 'b0_mask.nii.gz'}", f"--index={work / 'index.txt'}",
            f"--acqp={work / 'acqp.txt'}", f"--bvecs={dwi_files['bvec']}", f"--bvals={dwi_files['bval']}",
            f"--out={work / 'eddy'}", f"--topup={work / 'topup'}"} <= set(eddy)
    # the files the commands read: PE rows j- and j with the readout time, one index per volume, the b0 pair
    assert (work / "acqp.txt").read_text() == "0 -1 0 0.062000\n0 1 0 0.062000\n"
    assert (work / "index.txt").read_text().split() == ["1"] * 4
    pair = nib.load(str(work / "b0_pair.nii.gz"))
    assert pair.shape == (8, 8, 6, 2)
    mask = np.asarray(nib.load(str(work / "b0_mask.nii.gz")).dataobj)
    assert 0 < mask.sum() < mask.size
    assert result.dwi == work / "eddy.nii.gz" and result.bvec == work / "eddy.eddy_rotated_bvecs"
    assert result.record["readout_time"] == "from the sidecars"


def test_without_fsl_the_reason_is_recorded(dwi_files, tmp_path, monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    assert fsl.fsl_status(dwi_files["b0"]) == "FSL not found (FSLDIR is not set)"
    monkeypatch.setenv("FSLDIR", str(tmp_path / "empty"))
    assert "lacks topup, eddy" in fsl.fsl_status(dwi_files["b0"])


def test_no_reverse_b0_means_no_topup(fsldir):
    assert "no reverse phase-encoded b0" in fsl.fsl_status(None)


def test_missing_phase_encoding_is_a_clear_error(fsldir, dwi_files, tmp_path):
    (tmp_path / "sub-01_dwi.json").write_text("{}")
    with pytest.raises(MissingInputError, match="PhaseEncodingDirection"):
        fsl.topup_eddy(dwi_files["dwi"], dwi_files["bval"], dwi_files["bvec"], dwi_files["b0"], tmp_path / "out",
                       cmdonly=True)


def test_preprocessing_records_why_fsl_did_not_run(monkeypatch, dwi_files, tmp_path):
    from bssfp2dt.preprocessing.steps import PreprocSettings, preprocess_dwi

    monkeypatch.delenv("FSLDIR", raising=False)
    settings = PreprocSettings(gibbs=False, motion_correction=False)
    *_, provenance = preprocess_dwi(str(dwi_files["dwi"]), str(dwi_files["bval"]), str(dwi_files["bvec"]),
                                    settings.to_dict(),
                                    out_dir=str(tmp_path), reverse_pe_b0=str(dwi_files["b0"]))
    assert provenance["topup_eddy"] == "skipped: FSL not found (FSLDIR is not set)"
    assert os.path.isfile(tmp_path / "dwi_preproc.nii.gz")


def test_methods_text_follows_what_ran():
    from bssfp2dt.evaluation.citation import methods_text

    def context(topup, motion):
        steps = [{"step": "preprocess_dwi", "topup_eddy": topup, "gibbs": "skipped: disabled",
                  "motion_correction": motion, "denoise": "skipped: not requested"}]
        return [{"version": "9.9", "sessions": [{"steps": steps}]}]

    text, cited = methods_text(context({"tool": "FSL topup + eddy", "readout_time": "from the sidecars"},
                                       "done by eddy"))
    assert "corrected with FSL's topup and eddy" in text and {"topup", "eddy"} <= set(cited)
    assert "Head-motion correction was not run" not in text
    text, cited = methods_text(context("skipped: FSL not found (FSLDIR is not set)", "skipped: disabled"))
    assert "topup and eddy were not run (skipped: FSL not found" in text and "topup" not in cited
    assert "Head-motion correction was not run" in text and "*bssfp2dt* 9.9" in text
