"""Participant-level evaluation outputs: error-map derivatives, tidy TSV + JSON, offline HTML with figures."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import nibabel as nib
import numpy as np
import pytest
from helpers import check_offline_html

from bssfp2dt.evaluation.report import COMPARISON_FIGURES, evaluate_participant
from bssfp2dt.evaluation.statistics import COLUMNS, EvaluationEntities, read_table
from bssfp2dt.io import derivatives as out

N = 16
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
FIGURES = set(COMPARISON_FIGURES) | {"errormaps", "boxplots"}


def phantom(n: int = N):
    """A sphere of WM-like tensors (fibres along x on the left, along y on the right) inside CSF/GM shells.

    Returns reference tensor (n, n, n, 6) mm^2/s, tissue probabilities, mask.
    """
    grid = (np.indices((n, n, n)) - (n - 1) / 2) / (n / 2)
    radius = np.sqrt((grid ** 2).sum(axis=0))
    mask = radius < 0.9
    wm = np.clip((0.6 - radius) / 0.2, 0, 1)
    csf = np.clip((radius - 0.7) / 0.15, 0, 1)
    gm = np.clip(1 - wm - csf, 0, 1)
    reference = np.zeros((n, n, n, 6))
    along_x = grid[0] < 0
    reference[..., 0] = np.where(along_x, 1.7e-3, 0.3e-3)
    reference[..., 3] = np.where(along_x, 0.3e-3, 1.7e-3)
    reference[..., 5] = 0.3e-3 + 2e-3 * csf
    reference[..., 1] = 1e-4 * grid[2] * (np.abs(grid[2]) > 0.2)  # zero in a central slab: excluded voxels
    reference[..., 4] = 2e-4
    return reference * mask[..., None], {"CSF": csf, "GM": gm, "WM": wm}, mask


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("derivatives")
    reference, tissues, mask = phantom()
    predicted = reference * 1.1
    entities = EvaluationEntities("01", "1", "2", "pc-bssfp")
    result = evaluate_participant(predicted, reference, tissues, mask, AFFINE, entities, root,
                                  sources=["bids:raw:sub-01/ses-1/anat/x.nii.gz"])
    return root, result, reference, tissues, mask


def test_error_maps_are_written_as_derivatives(evaluated):
    root, result, reference, _, mask = evaluated
    expected = out.error_map_path(root, "01", "1", "pc-bssfp", "diffusivity", "2")
    assert result.error_maps["diffusivity"] == expected
    assert expected.name == "sub-01_ses-1_space-T1w_desc-pcbssfperrorref2_model-tensor_param-diffusivity_dwimap.nii.gz"
    image = nib.load(expected)
    data = image.get_fdata()
    assert data.shape == (N, N, N, 6) and np.allclose(image.affine, AFFINE)
    evaluated_voxels = mask[..., None] & (np.abs(reference) >= 1e-6)
    np.testing.assert_allclose(data[evaluated_voxels], 0.1, rtol=1e-6)  # float32 on disk
    assert np.isnan(data[mask[..., None] & ~evaluated_voxels]).all()
    assert (data[~mask] == 0).all()
    sidecar = json.loads(out.sidecar_path(expected).read_text())
    assert sidecar["Units"] == "ratio" and sidecar["NearZeroThreshold"] == 1e-6 and sidecar["SkullStripped"]
    for param in ("fa", "md", "ad", "rd", "inclination", "azimuth", "v1angle"):
        assert result.error_maps[param].is_file()
    md = nib.load(result.error_maps["md"]).get_fdata()
    np.testing.assert_allclose(md[mask], 0.1, rtol=1e-6)


def test_statistics_table_and_sidecar(evaluated):
    root, result, reference, tissues, mask = evaluated
    assert result.table == out.error_table_path(root, "01", "1", "pcbssfp", "2")
    frame = read_table(result.table)
    assert list(frame.columns) == list(COLUMNS)
    assert set(frame["participant_id"]) == {"sub-01"} and set(frame["input_session"]) == {"1"}
    assert set(frame["dwi_session"]) == {"2"} and set(frame["modality"]) == {"pcbssfp"}
    diagonal = frame[(frame["metric"] == "diagonal") & frame["statistic"].isin(["weighted_mean", "median", "p99"])]
    np.testing.assert_allclose(diagonal["value"], 0.1, rtol=1e-9)
    # D12 crosses zero: the excluded count is the number of in-mask voxels with |D12| < 1e-6 mm^2/s.
    d12 = frame[(frame["metric"] == "D12") & (frame["tissue"] == "brain") & (frame["statistic"] == "median")]
    assert int(d12["n_excluded"].iloc[0]) == np.count_nonzero(mask & (np.abs(reference[..., 1]) < 1e-6)) > 0
    wm = frame[(frame["metric"] == "fa") & (frame["tissue"] == "WM") & (frame["statistic"] == "median")]
    assert int(wm["n_voxels"].iloc[0]) == np.count_nonzero(mask & (tissues["WM"] > 0.5))
    psnr = frame[frame["metric"] == "psnr"]["value"]
    assert len(psnr) == 1 and np.isfinite(psnr.iloc[0])
    assert frame["value"].dropna().map(np.isfinite).all()
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["ImageMetrics"]["fid"] is None and "weights" in sidecar["ImageMetrics"]["NotComputed"]["fid"]
    assert set(sidecar["Figures"]) == FIGURES and sidecar["TissueProbabilityThreshold"] == 0.5
    assert "Description" in sidecar["value"]


def test_participant_html_is_offline_and_has_every_figure(evaluated):
    root, result, *_ = evaluated
    assert result.report == root / "sub-01.html"
    images = check_offline_html(result.report)
    assert {path.stem.rsplit("_", 1)[1] for path in images} == FIGURES
    assert all(path.parent == root / "sub-01" / "figures" for path in images)
    text = result.report.read_text()
    assert "not computed: no MedicalNet ResNet-10 weights" in text


def test_second_session_pair_from_nifti_paths_is_added_to_the_same_report(tmp_path):
    from bssfp2dt.io.nifti import save_nifti

    reference, tissues, mask = phantom(12)
    evaluate_participant(reference * 1.05, reference, tissues, mask, AFFINE,
                         EvaluationEntities("02", None, "1", "t1w"), tmp_path / "out")
    # The second pair comes as files, as the participant pipeline has them: affine from the reference file.
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    inputs = {name: save_nifti(data, affine, tmp_path / "in" / f"{name}.nii.gz") for name, data in
              {"predicted": reference * 0.8, "reference": reference, "mask": mask.astype(np.uint8),
               "gm": tissues["GM"], "wm": tissues["WM"], "csf": tissues["CSF"]}.items()}
    result = evaluate_participant(inputs["predicted"], inputs["reference"],
                                  {name: inputs[name] for name in ("gm", "wm", "csf")}, inputs["mask"], None,
                                  EvaluationEntities("02", None, "2", "t1w"), tmp_path / "out")
    np.testing.assert_allclose(nib.load(result.error_maps["md"]).affine, affine)
    text = result.report.read_text()
    assert text.count("<h3>") == 2 and "DWI reference (ses-1)" in text and "DWI reference (ses-2)" in text
    assert len(check_offline_html(result.report)) == 2 * len(FIGURES)
    frame = read_table(result.table)
    assert set(frame["tissue"]) == {"CSF", "GM", "WM", "brain"}
    assert frame["input_session"].isna().all()
    md = frame[(frame["metric"] == "md") & (frame["tissue"] == "brain") & (frame["statistic"] == "mean")]
    assert md["value"].iloc[0] == pytest.approx(0.2)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_participant_html_renders_in_headless_chromium(evaluated, tmp_path):
    import matplotlib.image

    root, result, *_ = evaluated
    screenshot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                    f"--screenshot={screenshot}", "--window-size=1200,2000", result.report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05  # text, tables and figures, not an empty page


def test_outputs_keep_the_derivatives_dataset_valid(evaluated, tmp_path):
    from bssfp2dt.io.validation import validation_errors

    root, *_ = evaluated
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.10.0"}')
    out.initialise_dataset(root, raw)
    assert validation_errors(root) == []
