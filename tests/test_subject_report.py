"""The participant report of a subject without DWI, ``--reports-only`` and ``logs/CITATION.md``.

One CLI run of a tiny simulated subject whose DWI (and reverse-PE b0) was removed, with Gibbs removal and
motion correction switched off as in the participant tests, so the methods text must say they did not run,
and ``--output-spaces MNI152NLin2009aSym`` (template-space outputs, offline).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import check_offline_html, tiny_config, tiny_pcbssfp_model

from bssfp2dt import __version__
from bssfp2dt.cli.run import main
from bssfp2dt.evaluation import reportlets
from bssfp2dt.preprocessing import workflow
from bssfp2dt.simulation.dataset import simulate_dataset


TEMPLATE = "MNI152NLin2009aSym"  # the template that works offline (seeded from nilearn)


def argv(bids_dir: Path, output_dir: Path, work_dir: Path, model: Path, *extra: str) -> list[str]:
    return [str(bids_dir), str(output_dir), "participant", "--model", str(model), "-w", str(work_dir),
            "--patch-size", "32", "--nprocs", "1", "--omp-nthreads", "1", "--skip-bids-validation",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def no_dwi(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodwi")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    for folder in ("dwi", "fmap"):
        for path in bids_dir.glob(f"sub-*/ses-*/{folder}"):
            shutil.rmtree(path)
    model, _ = tiny_pcbssfp_model(bids_dir, root / "tiny.pt")
    original = workflow.settings_from_config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow, "settings_from_config",
                      lambda config: dataclasses.replace(original(config), gibbs=False, motion_correction=False))
        patch.delenv("TEMPLATEFLOW_HOME", raising=False)  # the offline home seeded in the work dir
        code = main(argv(bids_dir, root / "out", root / "work", model, "--output-spaces", f"{TEMPLATE}:res-4"))
    return {"root": root, "bids": bids_dir, "out": root / "out", "model": model, "code": code}


def test_subject_without_dwi_gets_a_report_with_qc_and_maps(no_dwi):
    assert no_dwi["code"] == 0
    report = no_dwi["out"] / "sub-01.html"
    images = check_offline_html(report)
    names = {path.name for path in images}
    assert all(path.parent == no_dwi["out"] / "sub-01" / "figures" for path in images)
    assert "sub-01_ses-1_desc-coregbssfp_T2w.png" in names  # registration QC of the bSSFP
    assert any(name.endswith("_desc-tissues_dseg.png") for name in names)  # mask and tissue outlines
    assert not any("coregdwi" in name or "error" in name for name in names)  # no DWI: no b0 QC, no evaluation
    for param in ("fa", "colourfa", "md"):
        assert f"sub-01_ses-1_desc-pcbssfp_param-{param}_dwimap.png" in names
    text = report.read_text()
    digest = hashlib.sha256(no_dwi["model"].read_bytes()).hexdigest()
    assert digest in text and "Caveats" in text and "No DWI reference was evaluated" in text
    assert "No errors to report" in text
    assert "sub-01_ses-1_acq-pcbssfp_part-mag_T2w.nii.gz" in text  # inputs found


def test_registration_figure_draws_the_t1w_outline_where_the_image_is(no_dwi):
    """The QC figure is not blank: its 'after' row shows the bSSFP, with the outline in its colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(no_dwi["out"] / "sub-01" / "figures" / "sub-01_ses-1_desc-coregbssfp_T2w.png")
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)  # brain outline #e41a1c
    assert red.sum() > 100 and pixels[..., :3].std() > 0.1


def test_citation_names_version_tools_that_ran_and_model(no_dwi):
    text = (no_dwi["out"] / "logs" / "CITATION.md").read_text()
    bib = (no_dwi["out"] / "logs" / "CITATION.bib").read_text()
    assert f"*bssfp2dt* {__version__}" in text
    assert "model `" in text and hashlib.sha256(no_dwi["model"].read_bytes()).hexdigest() in text
    assert "Gibbs-ringing removal was not run" in text  # disabled above
    assert "rigidly registered to the T1w" in text and "HMRF" in text
    assert "Diffusion data" not in text and "topup" not in text  # no DWI was processed
    for key in re.findall(r"@(\w+)", text):
        assert f"{{{key}," in bib, key


def test_reports_only_rebuilds_the_report_from_the_outputs(no_dwi, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(no_dwi["out"], out)
    (out / "sub-01.html").unlink()
    (out / "logs" / "CITATION.md").unlink()
    code = main(argv(no_dwi["bids"], out, tmp_path / "work_unused", no_dwi["model"], "--reports-only"))
    assert code == 0
    assert (out / "sub-01.html").read_text() == (no_dwi["out"] / "sub-01.html").read_text()
    assert (out / "logs" / "CITATION.md").is_file()
    assert not (tmp_path / "work_unused").exists() or not any((tmp_path / "work_unused").rglob("*.pklz"))


def test_failed_subject_report_lists_the_crash_file(tmp_path):
    from bssfp2dt.evaluation.report import write_participant_report

    folder = tmp_path / "sub-07" / "log" / "20260101-000000_x"
    folder.mkdir(parents=True)
    (folder / "crash-20260101-000001-sub-07-participant.txt").write_text("sub-07 failed\nboom: disk full\n")
    text = write_participant_report(tmp_path, "07").read_text()
    assert "1 failed step(s)" in text and "boom: disk full" in text
    assert 'href="sub-07/log/20260101-000000_x/crash-20260101-000001-sub-07-participant.txt"' in text


def test_mosaic_windows_fa_on_0_1_and_mean_b0_uses_low_b():
    dwi = np.stack([np.full((2, 2, 2), value) for value in (10.0, 3.0, 12.0)], axis=-1)
    np.testing.assert_allclose(reportlets.mean_b0(dwi, np.array([0, 1000, 5])), 11.0)


def test_figures_in_the_subject_folder_keep_the_dataset_valid(no_dwi):
    from bssfp2dt.io.validation import validation_errors

    assert any((no_dwi["out"] / "sub-01" / "figures").glob("*.png"))
    assert validation_errors(no_dwi["out"]) == []


def test_template_space_outputs_are_valid_and_parse_with_pybids(no_dwi):
    import nibabel as nib
    from bids import BIDSLayout

    from bssfp2dt.io import derivatives

    paths = derivatives.tensor_map_paths("01", "1", "pc-bssfp", no_dwi["out"], space=TEMPLATE)
    for path in (paths.diffusivity, paths.fa, paths.md, paths.colour_fa, paths.brain_mask):
        assert path.is_file(), path
    tensor = nib.load(paths.diffusivity)
    assert tensor.shape[3] == 6 and np.allclose(np.diag(tensor.affine)[:3], 4.0)  # :res-4 (mm)
    fa = np.asarray(nib.load(paths.fa).dataobj)
    assert 0 < fa.max() <= 1 and (fa > 0).sum() > 100
    sidecar = (paths.fa.parent / paths.fa.name.replace(".nii.gz", ".json")).read_text()
    assert "SpatialReference" not in sidecar  # a standard template needs none
    layout = BIDSLayout(str(no_dwi["out"]), validate=False,
                        config=["bids", "derivatives", derivatives.PYBIDS_BEP016_CONFIG])
    found = layout.get(subject="01", space=TEMPLATE, suffix="dwimap", extension=".nii.gz", return_type="filename")
    assert len(found) == 8  # tensor, six scalar maps, colour-FA
    text = (no_dwi["out"] / "logs" / "CITATION.md").read_text()
    assert f"normalised to {TEMPLATE}" in text and "@templateflow" in text
    assert (no_dwi["out"] / "sub-01" / "figures" / f"sub-01_ses-1_space-{TEMPLATE}_desc-normqc_T1w.png").is_file()
    assert f"space-{TEMPLATE}_desc-normqc_T1w.png" in (no_dwi["out"] / "sub-01.html").read_text()


def test_nipype_crash_files_are_listed_too(tmp_path):
    from bssfp2dt.evaluation.report import write_participant_report

    folder = tmp_path / "sub-08" / "log" / "20260101-000000_y"
    folder.mkdir(parents=True)
    (folder / "crash-20260101-000002-root-dwi_prepare_ses1-abc.pklz").write_bytes(b"\x80\x04")
    text = write_participant_report(tmp_path, "08").read_text()
    assert "nipypecli crash crash-20260101-000002-root-dwi_prepare_ses1-abc.pklz" in text
