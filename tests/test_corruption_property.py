"""Property: a randomly corrupted copy of a tiny dataset never ends in exit 0 with non-finite or empty maps.

Each case applies one corruption (its kind fixed per case so that every kind is covered, its size,
place and target drawn from a seeded generator): a NaN patch, a constant volume, a sign flip, a
truncated file, a shifted affine (of one bSSFP part or both). Every run must either exit 0 with
finite, non-empty maps, or exit >= 64 with exactly one error line and no traceback. The cases share
one work dir (the unchanged T1w steps are cached), with Gibbs removal and motion correction off;
about 1-2 min in all on the shared 2-core machine.
"""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import tiny_config, tiny_pcbssfp_model

from bssfp2dt.cli.run import main
from bssfp2dt.io import derivatives
from bssfp2dt.simulation.dataset import simulate_dataset

KINDS = ("nan_patch", "constant_volume", "flip_sign", "truncate", "shift_affine")
#: More cases for a longer check: ``BSSFP2DT_CORRUPTION_CASES=30 pytest tests/test_corruption_property.py``.
N_CASES = int(os.environ.get("BSSFP2DT_CORRUPTION_CASES", len(KINDS)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    model, _ = tiny_pcbssfp_model(bids_dir, root / "tiny.pt")
    return bids_dir, model, root / "work"


def _images(bids_dir: Path) -> dict[str, Path]:
    anat = bids_dir / "sub-01" / "ses-1" / "anat"
    return {"magnitude": next(anat.glob("*part-mag_T2w.nii.gz")), "phase": next(anat.glob("*part-phase_T2w.nii.gz")),
            "t1w": next(anat.glob("*_T1w.nii.gz"))}


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    affine = image.affine if affine is None else affine
    out = nib.Nifti1Image(data.astype(np.float32), affine, image.header)
    out.set_data_dtype(np.float32)
    out.set_sform(affine)
    out.set_qform(affine)
    nib.save(out, path)


def corrupt(bids_dir: Path, kind: str, rng: np.random.Generator) -> str:
    """Apply one corruption of ``kind`` with parameters from ``rng``; return a description."""
    images = _images(bids_dir)
    target = images[str(rng.choice(["magnitude", "t1w"]))] if kind in ("nan_patch", "flip_sign") else \
        images["magnitude"]
    data = np.asarray(nib.load(target).dataobj, dtype=np.float32)
    if kind == "nan_patch":
        edge = int(rng.integers(1, 11))
        corner = [int(rng.integers(0, n - edge)) for n in data.shape[:3]]
        data[corner[0]:corner[0] + edge, corner[1]:corner[1] + edge, corner[2]:corner[2] + edge] = np.nan
        _rewrite(target, data)
        return f"NaN cube of edge {edge} in {target.name}"
    if kind == "constant_volume":
        cycle = int(rng.integers(0, data.shape[3]))
        data[..., cycle] = float(rng.uniform(0, 100))
        _rewrite(target, data)
        return f"constant cycle {cycle}"
    if kind == "flip_sign":
        share = float(rng.uniform(0, 0.05))  # often under, sometimes over the repairable 1 %
        data[rng.random(data.shape) < share] *= -1
        data[data == 0] = -1.0 if share > 0.02 else 0.0
        _rewrite(target, data)
        return f"{share:.3f} of {target.name} negated"
    if kind == "truncate":
        path = images[str(rng.choice(["magnitude", "phase", "t1w"]))]
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * rng.uniform(0.2, 0.95))])
        return f"{path.name} truncated"
    if kind == "shift_affine":
        shift = rng.uniform(-1, 1, 3) * float(rng.choice([5.0, 300.0]))
        parts = ["magnitude", "phase"] if rng.random() < 0.7 else [str(rng.choice(["magnitude", "phase"]))]
        for part in parts:
            image = nib.load(images[part])
            affine = image.affine.copy()
            affine[:3, 3] += shift
            _rewrite(images[part], np.asarray(image.dataobj, dtype=np.float32), affine)
        return f"{'+'.join(parts)} shifted by {np.round(shift, 1).tolist()} mm"
    raise ValueError(kind)


def check_maps(out: Path) -> None:
    paths = derivatives.tensor_map_paths("01", "1", "pc-bssfp", out)
    tensor = np.asarray(nib.load(paths.diffusivity).dataobj, dtype=np.float64)
    fa = np.asarray(nib.load(paths.fa).dataobj, dtype=np.float64)
    assert np.all(np.isfinite(tensor)) and np.all(np.isfinite(fa)), "non-finite maps"
    assert np.count_nonzero(tensor) > 0 and np.count_nonzero(fa) > 0, "empty maps"


@pytest.mark.parametrize("case", range(N_CASES))
def test_a_corrupted_dataset_gives_finite_maps_or_one_line(source, tmp_path, capsys, case):
    bids_dir = tmp_path / "bids"
    shutil.copytree(source[0], bids_dir, ignore=shutil.ignore_patterns("derivatives"))
    what = corrupt(bids_dir, KINDS[case % len(KINDS)], np.random.default_rng(1000 + case))
    out = tmp_path / "out"
    code = main([str(bids_dir), str(out), "participant", "--model", str(source[1]), "-w", str(source[2]),
                 "--patch-size", "32", "--nprocs", "1", "--omp-nthreads", "1", "--skip-bids-validation",
                 "--device", "cpu", "--unringing-method", "none", "--hmc-model", "none"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, what
    if code == 0:
        check_maps(out)
        print(what, "-> 0, finite maps")
        return
    assert code >= 64, f"{what}: exit {code}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("bssfp2dt: error: ")]
    assert len(errors) == 1, f"{what}: {err}"
    print(what, "->", code, errors[0])


def test_the_truncated_gzip_really_is_truncated(tmp_path):
    """The "truncate" corruption is what it claims: reading it fails (independent of bssfp2dt)."""
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8, 4)).astype(np.float32), np.eye(4)), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 6 // 10])
    with pytest.raises((EOFError, OSError, zlib.error)):
        np.asarray(nib.load(path).dataobj)
