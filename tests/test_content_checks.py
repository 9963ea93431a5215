"""Content checks of the input images (io/content_checks.py): what stops a run, what is repaired.

Each case breaks the values of one image of a fresh tiny front-door dataset (8 voxels a side) and runs
``bssfp2dt ... --dry-run``: the checks run before the dry run prints its plan, so a stop is one exit-66
line naming the file, and a repair is a warning counting what was repaired followed by exit 0.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli import run as cli_run
from bssfp2dt.errors import EXIT_MISSING_INPUT, MissingInputError
from bssfp2dt.io import content_checks

SKIP = "--skip-bids-validation"


def dataset(tmp: Path) -> Path:
    return fx.make_bids_dataset(tmp / "bids", sessions=(None,))


def run_dry(root: Path, tmp: Path, capsys, *extra) -> tuple[int, str]:
    code = cli_run.main([str(root), str(tmp / "out"), "participant", "-w", str(tmp / "work"), SKIP, "--dry-run",
                         *extra])
    return code, capsys.readouterr().err


def rewrite(path: Path, change) -> None:
    """Replace the voxel values of ``path`` by ``change(values)`` (float32), keeping its header."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    fx.write_nifti(path, change(data).astype(np.float32), image.affine, tr=0.005 if data.ndim == 4 else None)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bssfp2dt: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0][len("bssfp2dt: error: "):]


def with_nan(data, count):
    flat = data.reshape(-1)
    flat[np.arange(count) * 7] = np.nan
    flat[1] = np.inf if count > 1 else flat[1]
    return data


def test_a_few_non_finite_magnitude_values_are_repaired_with_a_count(tmp_path, capsys):
    root = dataset(tmp_path)
    magnitude = fx.bssfp_paths(root, "01", None)[0]
    rewrite(magnitude, lambda data: with_nan(data, 5))
    code, err = run_dry(root, tmp_path, capsys)
    assert code == 0, err
    assert f"{magnitude}: 6 non-finite value(s) set to 0 (repaired when read)" in err
    assert not (tmp_path / "out").exists()


def test_many_non_finite_values_stop_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    magnitude = fx.bssfp_paths(root, "01", None)[0]
    rewrite(magnitude, lambda data: np.where(np.arange(data.size).reshape(data.shape) % 10 == 0, np.nan, data))
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"bSSFP magnitude {magnitude}: 615 of 6144 voxel values are NaN or infinite "
                               "(10 %); re-export the image")


def test_a_constant_magnitude_stops_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    magnitude = fx.bssfp_paths(root, "01", None)[0]
    rewrite(magnitude, np.zeros_like)
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"bSSFP magnitude {magnitude} holds one constant value (0) in every voxel "
                               "(volume 0): there is no signal; re-export or replace it")


def test_one_constant_cycle_is_named(tmp_path, capsys):
    root = dataset(tmp_path)
    magnitude = fx.bssfp_paths(root, "01", None)[0]

    def flatten_cycle_5(data):
        data[..., 5] = 7.0
        return data
    rewrite(magnitude, flatten_cycle_5)
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert "holds one constant value (7) in every voxel (volume 5)" in error_line(err)


def test_a_constant_t1w_stops_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    t1w = fx.t1w_path(root, "01", None)
    rewrite(t1w, lambda data: np.full_like(data, 3.5))
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"T1w {t1w} holds one constant value (3.5) in every voxel: there is no signal; "
                               "re-export or replace it")


def test_a_sign_flipped_magnitude_stops_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    magnitude = fx.bssfp_paths(root, "01", None)[0]
    rewrite(magnitude, lambda data: -data)
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"bSSFP magnitude {magnitude}: 6144 of 6144 values are negative (100 %), which a "
                               "magnitude never is (a sign flip?); re-export the magnitude")


def test_phase_in_degrees_under_units_rad_stops_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    phase = fx.bssfp_paths(root, "01", None)[1]
    rewrite(phase, np.degrees)
    low, high = (float(f(np.degrees(np.asarray(nib.load(phase).dataobj, np.float32)))) for f in (np.min, np.max))
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    message = error_line(err)
    assert message.startswith(f"bSSFP phase {phase}: the sidecar says \"Units\": \"rad\" but the values span [")
    assert message.endswith("] (degrees?); convert them to radians or fix \"Units\"")
    assert low < -170 and high > 170


def test_a_tiny_image_stops_the_run(tmp_path, capsys):
    root = dataset(tmp_path)
    t1w = fx.t1w_path(root, "01", None)
    fx.write_nifti(t1w, np.random.default_rng(0).uniform(1, 2, (1, 1, 1)).astype(np.float32))
    code, err = run_dry(root, tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == f"{t1w} is 1x1x1 voxels; at least 4 voxels a side are needed, give the full image"


def test_the_repair_sets_non_finite_values_to_zero():
    data = np.array([1.0, np.nan, -np.inf, 2.0], dtype=np.float32)
    assert content_checks.finite(data).tolist() == [1.0, 0.0, 0.0, 2.0]
    clean = np.ones(3)
    assert content_checks.finite(clean) is clean


def test_overlap_is_the_covered_fraction_of_the_mask():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True  # 216 voxels
    moving = np.zeros((10, 10, 10, 2))
    moving[:, :, 2:5, 1] = 1.0  # covers 3 of the 6 mask slices: exactly 50 %
    assert content_checks.check_overlap(moving, mask, "bSSFP magnitude", "m.nii.gz") == pytest.approx(0.5)
    moving[:, :, 4, 1] = 0.0
    with pytest.raises(MissingInputError) as caught:
        content_checks.check_overlap(moving, mask, "bSSFP magnitude", "m.nii.gz")
    assert caught.value.message == ("bSSFP magnitude m.nii.gz covers 33 % of the T1w brain mask after registration "
                                    "(at least 50 % needed): the images do not overlap; check that both come from "
                                    "the same subject and session")


@pytest.mark.parametrize("bvals, bvecs, problem", [
    ([0, 0, 0, 0, 0, 0, 0], fx.BVECS, "every volume is b = 0"),
    (fx.BVALS, np.zeros((3, 7)), "every b-vector of a diffusion-weighted volume in x.bvec is zero"),
    (fx.BVALS, np.array([[1, 0, 0]] * 4 + [[0, 1, 0]] * 3).T, "the b-vectors span 2 of the 6 independent "
                                                              "directions a tensor needs"),
    (fx.BVALS, fx.BVECS, None),
])
def test_gradient_tables_that_cannot_give_a_tensor(tmp_path, bvals, bvecs, problem):
    path = tmp_path / "x.bvec"
    np.savetxt(path, bvecs)
    assert content_checks.tensor_problem(bvals, path) == problem


def test_summarise_counts_over_volumes_read_one_at_a_time(tmp_path):
    data = np.arange(4 * 4 * 4 * 3, dtype=np.int16).reshape(4, 4, 4, 3) - 5  # 5 negative values in volume 0..2
    data[..., 2] = 9
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, 1.0)  # stored x 2 + 1
    nib.save(image, tmp_path / "x.nii.gz")
    read = list(content_checks.volumes(tmp_path / "x.nii.gz"))
    assert len(read) == 3 and read[0].dtype == np.float32
    np.testing.assert_array_equal(read[1], data[..., 1] * 2.0 + 1.0)
    summary = content_checks.summarise(read + [np.array([[[np.nan, 1.0]]], np.float32)])
    expected_negative = int(np.count_nonzero(data[..., :2] * 2 + 1 < 0))
    assert (summary.size, summary.n_volumes, summary.non_finite, summary.negative) == (194, 4, 1, expected_negative)
    assert summary.constant == (2, 19.0) and summary.low == float(data.min() * 2 + 1)
    assert summary.high == float(data[..., :2].max() * 2 + 1)
