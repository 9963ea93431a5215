"""The simulated BIDS dataset: layout, validity, determinism, and agreement of images with the truth."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst.dti import TensorModel

from bssfp2dt.cli import simulate
from bssfp2dt.dti.eigen import bep016_to_matrix
from bssfp2dt.evaluation.truth import WM_PROBABILITY, b0_direction, truth_paths, white_matter_errors
from bssfp2dt.simulation.dataset import simulate_dataset
from bssfp2dt.simulation.geometry import RigidPose
from helpers import tiny_config
TRUTH = Path("derivatives") / "bssfp2dt-truth"


def _hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    first = _hashes(simulate_dataset(tmp_path / "a", tiny_config(seed=5), progress=False))
    second = _hashes(simulate_dataset(tmp_path / "b", tiny_config(seed=5), progress=False))
    other = _hashes(simulate_dataset(tmp_path / "c", tiny_config(seed=6), progress=False))
    assert first == second
    assert len(first) > 40
    raw_images = [name for name in first if name.startswith("sub-") and name.endswith(".nii.gz")]
    assert all(first[name] != other[name] for name in raw_images)


def test_layout_follows_the_bids_naming(tiny_dataset):
    for subject in ("01", "02"):
        ses1 = tiny_dataset / f"sub-{subject}" / "ses-1"
        for name in (f"anat/sub-{subject}_ses-1_T1w.nii.gz",
                     f"anat/sub-{subject}_ses-1_acq-pcbssfp_part-mag_T2w.nii.gz",
                     f"anat/sub-{subject}_ses-1_acq-pcbssfp_part-phase_T2w.nii.gz",
                     f"dwi/sub-{subject}_ses-1_dwi.nii.gz",
                     f"dwi/sub-{subject}_ses-1_dwi.bval", f"dwi/sub-{subject}_ses-1_dwi.bvec",
                     f"fmap/sub-{subject}_ses-1_dir-PA_epi.nii.gz"):
            assert (ses1 / name).is_file(), name
        assert (tiny_dataset / f"sub-{subject}" / "ses-2" / "dwi" / f"sub-{subject}_ses-2_dwi.nii.gz").is_file()
        assert not (tiny_dataset / f"sub-{subject}" / "ses-2" / "anat").exists()
    magnitude = nib.load(tiny_dataset / "sub-01/ses-1/anat/sub-01_ses-1_acq-pcbssfp_part-mag_T2w.nii.gz")
    sidecar = json.loads((tiny_dataset / "sub-01/ses-1/anat/sub-01_ses-1_acq-pcbssfp_part-mag_T2w.json").read_text())
    assert magnitude.shape[3] == len(sidecar["PhaseIncrements"]) == 12
    assert 12 <= min(magnitude.shape[:3]) and max(magnitude.shape[:3]) <= 48  # tiny enough for tests
    dwi = nib.load(tiny_dataset / "sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz")
    bvals, bvecs = read_bvals_bvecs(str(tiny_dataset / "sub-01/ses-1/dwi/sub-01_ses-1_dwi.bval"),
                                    str(tiny_dataset / "sub-01/ses-1/dwi/sub-01_ses-1_dwi.bvec"))
    assert dwi.shape[3] == len(bvals) == len(bvecs)
    assert np.sum(bvals > 0) == 30 and 2 <= np.sum(bvals == 0) <= 6
    np.testing.assert_allclose(np.linalg.norm(bvecs[bvals > 0], axis=1), 1.0, atol=1e-5)
    assert np.linalg.det(dwi.affine[:3, :3]) < 0  # stored LAS, so bvecs in voxel axes need no flip
    params = json.loads((tiny_dataset / TRUTH / "sub-01" / "sub-01_simulation.json").read_text())
    params2 = json.loads((tiny_dataset / TRUTH / "sub-02" / "sub-02_simulation.json").read_text())
    assert params["subject"]["tissues"] != params2["subject"]["tissues"]


def test_bids_validator_reports_no_errors(tiny_dataset):
    result = subprocess.run([str(Path(sys.executable).parent / "bids-validator-deno"), str(tiny_dataset),
                             "--format", "json"], capture_output=True, text=True, timeout=120)
    issues = json.loads(result.stdout)["issues"]["issues"]
    errors = [issue for issue in issues if issue["severity"] == "error"]
    assert errors == []


def test_pybids_finds_every_raw_file(tiny_dataset):
    from bids import BIDSLayout

    layout = BIDSLayout(tiny_dataset, validate=False)
    indexed = {Path(f).resolve() for f in layout.get(return_type="file")}
    on_disk = {p.resolve() for p in tiny_dataset.glob("sub-*/**/*") if p.is_file()}
    assert on_disk <= indexed
    assert len(layout.get(subject="01", acquisition="pcbssfp", part="phase", extension=".nii.gz")) == 1
    assert len(layout.get(subject="02", suffix="dwi", extension=".nii.gz")) == 2


def test_noiseless_fit_equals_the_truth_in_pure_white_matter(tiny_dataset):
    folder = tiny_dataset / TRUTH / "sub-01" / "dwi"
    truth = _load(folder / "sub-01_space-T1w_desc-truth_model-tensor_param-diffusivity_dwimap.nii.gz")
    fitted = _load(folder / "sub-01_space-T1w_desc-noiselessfit_model-tensor_param-diffusivity_dwimap.nii.gz")
    wm = _load(tiny_dataset / TRUTH / "sub-01" / "anat" / "sub-01_space-T1w_label-WM_probseg.nii.gz")
    pure = wm > 0.9999
    assert pure.sum() > 50
    error = np.linalg.norm(fitted[pure] - truth[pure], axis=1) / np.linalg.norm(truth[pure], axis=1)
    assert error.max() < 2e-4  # float32 files; the 1e-4 of other tissue left in these voxels
    mixed = (wm > 0.3) & (wm < 0.7)
    assert np.median(np.linalg.norm(fitted[mixed] - truth[mixed], axis=1) / np.linalg.norm(truth[mixed], axis=1)) > 1e-3


def test_dipy_fit_of_the_raw_dwi_recovers_the_session_truth(tiny_dataset):
    """End to end: image, bvecs in voxel axes (LAS), and the per-session truth agree."""
    base = tiny_dataset / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_dwi"
    bvals, bvecs = read_bvals_bvecs(f"{base}.bval", f"{base}.bvec")
    data = _load(f"{base}.nii.gz").astype(np.float64)
    fit_base = tiny_dataset / TRUTH / "sub-01/ses-1/dwi/sub-01_ses-1_desc-noiselessfit_model-tensor"
    truth = _load(f"{fit_base}_param-diffusivity_dwimap.nii.gz")
    truth_fa = _load(f"{fit_base}_param-fa_dwimap.nii.gz")
    anisotropic = truth_fa > 0.5
    assert anisotropic.sum() > 30
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(data[anisotropic])
    truth_v1 = np.linalg.eigh(bep016_to_matrix(truth[anisotropic]))[1][:, :, 2]
    cosine = np.abs(np.sum(fit.evecs[:, :, 0] * truth_v1, axis=1))
    angles = np.degrees(np.arccos(np.clip(cosine, 0, 1)))
    assert np.median(angles) < 12.0
    assert np.median(np.abs(fit.fa - truth_fa[anisotropic])) < 0.1


def _centroid_mm(mask_image):
    mask = np.asanyarray(mask_image.dataobj) > 0.5
    index = np.argwhere(mask).mean(axis=0)
    return mask_image.affine[:3, :3] @ index + mask_image.affine[:3, 3]


def test_sessions_differ_by_their_recorded_rigid_transforms(tiny_dataset):
    params = json.loads((tiny_dataset / TRUTH / "sub-01" / "sub-01_simulation.json").read_text())
    poses = {(s["modality"], s["session"]): RigidPose(tuple(s["pose"]["rotation_deg"]),
                                                      tuple(s["pose"]["translation_mm"]))
             for s in params["subject"]["scans"]}
    t1w_space = nib.load(tiny_dataset / TRUTH / "sub-01/anat/sub-01_space-T1w_desc-brain_mask.nii.gz")
    c_t1w = _centroid_mm(t1w_space)
    for session in ("1", "2"):
        fa = nib.load(tiny_dataset / TRUTH / f"sub-01/ses-{session}/dwi"
                      / f"sub-01_ses-{session}_desc-truth_model-tensor_param-md_dwimap.nii.gz")
        brain = nib.Nifti1Image((np.asanyarray(fa.dataobj) > 0).astype(np.uint8), fa.affine)
        t1w, dwi = poses[("t1w", "1")], poses[("dwi", session)]
        in_head = t1w.rotation.T @ (c_t1w - np.asarray(t1w.translation_mm))
        expected = dwi.rotation @ in_head + np.asarray(dwi.translation_mm)
        # the DWI mask is every voxel with any tissue, the T1w-space mask half-filled voxels: compare the
        # moved centroid with a tolerance of a quarter voxel at 2 mm
        assert np.linalg.norm(_centroid_mm(brain) - expected) < 0.5
        moved = np.linalg.norm(np.asarray(dwi.translation_mm) - np.asarray(t1w.translation_mm))
        assert moved > 0.1  # the sessions really moved


def test_phase_can_be_stored_as_scanner_integers(tmp_path):
    radians = simulate_dataset(tmp_path / "rad", tiny_config(seed=3), progress=False)
    integers = simulate_dataset(tmp_path / "int", tiny_config(seed=3, phase_units="arbitrary"), progress=False)
    name = "sub-01/ses-1/anat/sub-01_ses-1_acq-pcbssfp_part-phase_T2w"
    stored = nib.load(integers / f"{name}.nii.gz")
    assert stored.get_data_dtype() == np.uint16
    values = np.asanyarray(stored.dataobj).astype(np.float64)
    assert values.min() >= 0 and values.max() <= 4095
    assert json.loads((integers / f"{name}.json").read_text())["Units"] == "arbitrary"
    assert json.loads((radians / f"{name}.json").read_text())["Units"] == "rad"
    rescaled = values / 4096 * 2 * np.pi - np.pi
    difference = np.angle(np.exp(1j * (rescaled - _load(radians / f"{name}.nii.gz"))))
    assert np.abs(difference).max() <= 2 * np.pi / 4096 + 1e-6


@pytest.mark.parametrize("arguments, code, words", [
    (["--subjects", "-1"], 64, "--subjects must be >= 1"),
    (["--dwi-sessions", "-2"], 64, "--dwi-sessions must be >= 0"),
    (["--regime", "hard"], 64, "invalid choice"),
    (["--voxel-scale", "0"], 64, "--voxel-scale must be > 0"),
    (["--tiny", "--anatomy", "mni"], 64, "--tiny uses the procedural phantom"),
])
def test_bad_arguments_give_one_line_and_exit_code(tmp_path, capsys, arguments, code, words):
    with pytest.raises(SystemExit) as raised:
        sys.exit(simulate.main([str(tmp_path / "out")] + arguments))
    assert raised.value.code == code
    error = capsys.readouterr().err.strip().splitlines()
    assert words in error[-1] and "Traceback" not in "\n".join(error)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert simulate.main([str(tmp_path / "out"), "--tiny", "--no-progress"]) == 73
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "not empty" in message[0] and "--overwrite" in message[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    (tmp_path / "file").write_text("x")
    assert simulate.main([str(tmp_path / "file"), "--tiny", "--no-progress"]) == 73


def test_cli_writes_a_dataset(tmp_path):
    assert simulate.main([str(tmp_path / "out"), "--tiny", "--bssfp-sessions", "1", "--dwi-sessions", "0",
                          "--no-progress", "--no-reverse-pe"]) == 0
    assert (tmp_path / "out" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_acq-pcbssfp_part-mag_T2w.nii.gz").is_file()
    assert not (tmp_path / "out" / "sub-01" / "ses-1" / "dwi").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_tract_mask_marks_the_more_anisotropic_white_matter_and_splits_the_truth_errors(tiny_dataset):
    anat = tiny_dataset / TRUTH / "sub-01" / "anat"
    tracts = _load(anat / "sub-01_space-T1w_desc-tracts_mask.nii.gz") > 0
    white = _load(anat / "sub-01_space-T1w_label-WM_probseg.nii.gz") > WM_PROBABILITY
    fa = _load(tiny_dataset / TRUTH / "sub-01" / "dwi"
               / "sub-01_space-T1w_desc-truth_model-tensor_param-fa_dwimap.nii.gz")
    assert (white & tracts).sum() > 20 and (white & ~tracts).sum() > 20
    assert np.median(fa[white & tracts]) > np.median(fa[white & ~tracts]) + 0.1  # coherence raises the FA
    image = nib.load(truth_paths(tiny_dataset, "01")[0])
    exact = white_matter_errors(np.asarray(image.dataobj, dtype=np.float64), image.affine, tiny_dataset, "01")
    for part in ("", "tract_", "other_"):
        assert exact[f"{part}v1_angle"] < 1e-3 and exact[f"{part}fa_error"] < 1e-6
        assert exact[f"{part}fa_ratio"] == pytest.approx(1.0)


def test_b0_direction_in_t1w_space_gives_each_fibre_its_angle_to_b0_during_the_bssfp(tiny_dataset):
    """The recorded poses: a head-frame axis f makes with B0 (scanner z) during the bSSFP the same angle as its
    T1w-space axis R_t f makes with b0_direction; the head tilt is shared, so B0 is near the grid's z."""
    record = json.loads((tiny_dataset / TRUTH / "sub-01" / "sub-01_simulation.json").read_text())
    poses = {scan["modality"]: RigidPose(tuple(scan["pose"]["rotation_deg"]), tuple(scan["pose"]["translation_mm"]))
             for scan in record["subject"]["scans"] if scan["session"] == "1"}
    b0 = b0_direction(tiny_dataset, "01")
    fibres = np.random.default_rng(0).standard_normal((50, 3))
    fibres /= np.linalg.norm(fibres, axis=1, keepdims=True)
    during_bssfp = np.abs(fibres @ poses["pcbssfp"].rotation.T @ np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(np.abs(fibres @ poses["t1w"].rotation.T @ b0), during_bssfp, atol=1e-9)
    assert np.linalg.norm(b0) == pytest.approx(1.0)
    assert np.degrees(np.arccos(b0[2])) < 10.0  # per-scan jitter only (<= 3 deg about each axis, twice)
