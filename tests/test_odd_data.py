"""Odd but valid data: discovered, read and resampled onto the common grid correctly.

Each case writes a tiny dataset whose images hold a known linear function of the world position
``f(x, y, z)`` (mm). Trilinear interpolation reproduces a linear function exactly, so wherever a
common-grid voxel lies inside the source field of view its value must equal ``f`` at its world
position: a closed-form reference that catches any error of orientation, voxel size, axis order,
storage scaling or dimension handling. Orientation invariance is checked against nibabel's
``as_closest_canonical``; stored values against ``raw * scl_slope + scl_inter`` from the raw integers.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli.parser import parse_args
from bssfp2dt.config import config_from_args
from bssfp2dt.io import bids as bids_io
from bssfp2dt.io.nifti import effective_shape, load_nifti
from bssfp2dt.preprocessing import steps, resampling

GRID_MM = 2.0
T1W_SHAPE = (9, 8, 7)
MIN_CHECKED = 20  # grid voxels compared with f, so that no check is vacuous
CYCLE_STEP = 10.0  # magnitude cycle c holds f + c * CYCLE_STEP
SLOPE_OFFSET, INTER_OFFSET = 112, 116  # byte offsets of scl_slope / scl_inter in a NIfTI-1 header


def f(world: np.ndarray) -> np.ndarray:
    """The linear test function of world position (mm): ``(..., 3) -> (...)``."""
    return 30.0 + 0.5 * world[..., 0] - 0.25 * world[..., 1] + 0.4 * world[..., 2]


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def make_affine(linear: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """4x4 affine with linear part ``linear`` whose field of view is centred on the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return affine


ORIENTATIONS = {
    "RAS-iso": np.diag([2.0, 2.0, 2.0]),
    "LAS": np.diag([-2.0, 2.0, 2.0]),
    # i -> posterior, j -> superior, k -> right, anisotropic 1.5 x 2.5 x 3 mm
    "PSR-aniso": np.array([[0, 0, 3.0], [-1.5, 0, 0], [0, 2.5, 0]]),
    "oblique-aniso": rotation(0, 20.0) @ rotation(2, -12.0) @ np.diag([1.8, 2.2, 2.6]),
}


def world_of(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates (mm) of every voxel centre: ``shape + (3,)``."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).T.reshape(shape + (3,))


def linear_image(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``f`` at every voxel centre; extra dimensions (cycles) add ``CYCLE_STEP`` per volume."""
    values = f(world_of(affine, shape[:3]))
    extra = shape[3:]
    if not extra:
        return values
    steps = np.arange(int(np.prod(extra)), dtype=np.float64).reshape(extra) * CYCLE_STEP
    return values.reshape(shape[:3] + (1,) * len(extra)) + steps


def inside(source_affine: np.ndarray, source_shape: tuple[int, ...], grid_affine: np.ndarray,
           grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Grid voxels whose position maps strictly inside the source voxel-centre box (all 8 neighbours exist)."""
    voxels = world_of(np.linalg.inv(source_affine) @ grid_affine, grid_shape)
    upper = np.asarray(source_shape[:3]) - 1
    return np.all((voxels > 1e-6) & (voxels < upper - 1e-6), axis=-1)


def save(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype=np.float32, slope: float | None = None,
         inter: float = 0.0, endianness: str = "<") -> Path:
    """Write ``data`` as ``dtype`` in the given byte order; with ``slope``, the header's scl_slope/scl_inter
    are set to exactly these values (patched into the header bytes, since nibabel recomputes scaling on save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name("plain.nii")
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine, nib.Nifti1Header(endianness=endianness))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, plain)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    if slope is not None:
        raw[SLOPE_OFFSET:SLOPE_OFFSET + 8] = np.array([slope, inter], dtype=endianness + "f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def write_session(root: Path, subject: str, session: str | None, *, t1w: np.ndarray | None = None,
                  bssfp: np.ndarray | None = None, dwi: tuple[int, ...] | None = None,
                  t1w_kwargs: dict | None = None, bssfp_kwargs: dict | None = None,
                  phase: tuple[np.ndarray, dict] | None = None) -> None:
    """Write the given images with the fixture names and sidecars; ``t1w``/``bssfp`` are (affine, shape)."""
    fx.write_description(root)
    if t1w is not None:
        affine, shape = t1w
        path = save(fx.t1w_path(root, subject, session), linear_image(affine, shape), affine, **(t1w_kwargs or {}))
        fx.write_json(fx.sidecar(path), {"RepetitionTime": 2.3})
    if bssfp is not None:
        affine, shape = bssfp
        magnitude, phase_path = fx.bssfp_paths(root, subject, session)
        save(magnitude, linear_image(affine, shape), affine, **(bssfp_kwargs or {}))
        meta = {"RepetitionTime": 0.005, "PhaseIncrements": fx.PHASE_INCREMENTS_DEG}
        fx.write_json(fx.sidecar(magnitude), meta)
        if phase is None:
            save(phase_path, np.zeros(shape, dtype=np.float32), affine)
            fx.write_json(fx.sidecar(phase_path), {**meta, "Units": "rad"})
        else:
            values, kwargs = phase
            save(phase_path, values, affine, **kwargs)
            fx.write_json(fx.sidecar(phase_path), meta)  # no Units: detected from the (scaled) values
    if dwi is not None:
        path = fx.dwi_path(root, subject, session)
        save(path, np.ones(dwi, dtype=np.float32), fx.AFFINE)
        stem = str(path)[: -len(".nii.gz")]
        Path(stem + ".bval").write_text(" ".join(str(b) for b in fx.BVALS) + "\n")
        Path(stem + ".bvec").write_text("\n".join(" ".join(f"{v:.4f}" for v in row) for row in fx.BVECS) + "\n")
        fx.write_json(fx.sidecar(path), {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05})


def discover(root: Path, *options: str):
    args = parse_args([str(root), str(root.parent / "out"), "participant", "-w", str(root.parent / "work"),
                       *options])
    return bids_io.discover(config_from_args(args, "odd", bids_io.DEFAULT_QUERIES))


def check_on_grid(path: Path, source_affine: np.ndarray, source_shape: tuple[int, ...], t1w_affine: np.ndarray,
                  t1w_shape: tuple[int, ...]) -> int:
    """Read ``path`` as discovery does, resample it onto the T1w's common grid and compare with ``f``.

    Returns the number of grid voxels inside the source field of view (all of them are checked).
    """
    data, affine = load_nifti(path)
    np.testing.assert_allclose(affine, source_affine, atol=1e-4)
    grid_shape, grid_affine = resampling.common_grid(t1w_affine, t1w_shape, GRID_MM)
    on_grid = resampling.resample(data, affine, grid_shape, grid_affine)
    expected = linear_image(grid_affine, grid_shape + tuple(data.shape[3:]))
    valid = inside(affine, source_shape, grid_affine, grid_shape)
    np.testing.assert_allclose(on_grid[valid], expected[valid], rtol=1e-5, atol=1e-4)
    return int(valid.sum())


# --------------------------------------------------------------------------- orientations
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_orientations_are_discovered_and_resampled(tmp_path, orientation):
    linear = ORIENTATIONS[orientation]
    affine = make_affine(linear, T1W_SHAPE)
    bssfp_shape = (6, 5, 4, 12)
    bssfp_affine = make_affine(linear * 1.25, bssfp_shape)
    root = tmp_path / "bids"
    write_session(root, "01", None, t1w=(affine, T1W_SHAPE), bssfp=(bssfp_affine, bssfp_shape))
    (subject,) = discover(root)
    session = subject.sessions[0]
    assert session.t1w.shape == T1W_SHAPE and session.bssfp.shape == bssfp_shape
    # Voxel sizes in on-disk axis order: the column norms of the affine.
    np.testing.assert_allclose(session.t1w.voxel_size_mm, np.linalg.norm(linear, axis=0), rtol=1e-6)
    assert check_on_grid(session.t1w.image, affine, T1W_SHAPE, affine, T1W_SHAPE) >= MIN_CHECKED
    assert check_on_grid(session.bssfp.magnitude, bssfp_affine, bssfp_shape, affine, T1W_SHAPE) >= MIN_CHECKED


@pytest.mark.parametrize("orientation", ["LAS", "PSR-aniso", "oblique-aniso"])
def test_resampling_does_not_depend_on_the_stored_orientation(tmp_path, orientation):
    """The same image reoriented by nibabel (closest canonical RAS) gives the same common-grid image."""
    affine = make_affine(ORIENTATIONS[orientation], T1W_SHAPE)
    path = save(tmp_path / "t1w.nii.gz", np.random.default_rng(0).uniform(0, 100, T1W_SHAPE), affine)
    data, stored_affine = load_nifti(path)
    canonical = nib.as_closest_canonical(nib.load(path))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    grid_shape, grid_affine = resampling.common_grid(stored_affine, data.shape, GRID_MM)
    canonical_grid = resampling.common_grid(canonical.affine, canonical.shape, GRID_MM)
    assert canonical_grid[0] == grid_shape
    np.testing.assert_allclose(canonical_grid[1], grid_affine, atol=1e-4)
    direct = resampling.resample(data, stored_affine, grid_shape, grid_affine)
    reoriented = resampling.resample(np.asanyarray(canonical.dataobj), canonical.affine, grid_shape, grid_affine)
    np.testing.assert_allclose(direct, reoriented, atol=1e-3)


def test_common_grid_covers_an_oblique_field_of_view():
    affine = make_affine(ORIENTATIONS["oblique-aniso"], T1W_SHAPE)
    grid_shape, grid_affine = resampling.common_grid(affine, T1W_SHAPE, GRID_MM)
    centres = world_of(affine, T1W_SHAPE).reshape(-1, 3)
    in_grid = (np.linalg.inv(grid_affine[:3, :3]) @ (centres - grid_affine[:3, 3]).T).T
    assert np.all(in_grid >= -0.5) and np.all(in_grid <= np.asarray(grid_shape) - 0.5)


def test_oblique_t1w_through_the_grid_step(tmp_path):
    """The preprocessing step that puts the T1w on the common grid, on an oblique scaled int16 file."""
    affine = make_affine(ORIENTATIONS["oblique-aniso"], T1W_SHAPE)
    slope, inter = 0.01, 20.0
    raw = np.rint((linear_image(affine, T1W_SHAPE) - inter) / slope)
    t1w = save(tmp_path / "t1w.nii.gz", raw, affine, dtype=np.int16, slope=slope, inter=inter)
    mask = save(tmp_path / "mask.nii.gz", np.ones(T1W_SHAPE), affine, dtype=np.uint8)
    t1w_grid, _, record = steps.t1w_to_grid(str(t1w), str(mask), GRID_MM, str(tmp_path / "node"))
    image = nib.load(t1w_grid)
    values = np.asanyarray(image.dataobj)
    valid = inside(affine, T1W_SHAPE, image.affine, image.shape)
    assert valid.sum() >= MIN_CHECKED and list(image.shape) == record["grid_shape"]
    expected = linear_image(image.affine, image.shape)
    # float32 output and slope-quantised input: within half a stored step (0.005) plus rounding.
    np.testing.assert_allclose(values[valid], expected[valid], atol=0.006)


# --------------------------------------------------------------------------- storage and scaling
STORAGE = {  # dtype, scl_slope, scl_inter, byte order
    "int16-scaled": (np.int16, 0.5, -100.0, "<"),
    "uint16-scaled": (np.uint16, 0.25, 7.0, "<"),
    "int16-slope-zero": (np.int16, 0.0, 5.0, "<"),  # NIfTI: slope 0 means "no scaling"
    "float64": (np.float64, None, 0.0, "<"),
    "int16-big-endian-scaled": (np.int16, 0.5, 3.0, ">"),
    "float32-big-endian": (np.float32, None, 0.0, ">"),
}


@pytest.mark.parametrize("storage", list(STORAGE))
def test_storage_types_and_scaling(tmp_path, storage):
    dtype, slope, inter, endianness = STORAGE[storage]
    affine = make_affine(ORIENTATIONS["RAS-iso"], T1W_SHAPE)
    raw = np.random.default_rng(3).integers(0, 30000, T1W_SHAPE).astype(dtype)
    root = tmp_path / "bids"
    write_session(root, "01", None, bssfp=(affine, T1W_SHAPE + (12,)))
    path = save(fx.t1w_path(root, "01", None), raw, affine, dtype=dtype, slope=slope, inter=inter,
                endianness=endianness)
    assert nib.load(path).header.endianness == endianness
    session = discover(root)[0].sessions[0]
    assert session.t1w.image == path and session.t1w.shape == T1W_SHAPE
    data, _ = load_nifti(path)
    scaled = raw.astype(np.float64) * slope + inter if slope else raw.astype(np.float64)
    np.testing.assert_allclose(data, scaled, rtol=1e-6)
    # The RAS 2 mm T1w grid is its own common grid: resampling returns the scaled values at the nodes.
    grid_shape, grid_affine = resampling.common_grid(affine, T1W_SHAPE, GRID_MM)
    assert grid_shape == T1W_SHAPE and np.allclose(grid_affine, affine)
    np.testing.assert_allclose(resampling.resample(data, affine, grid_shape, grid_affine), scaled, rtol=1e-6)


def test_phase_units_are_detected_from_scaled_values(tmp_path):
    """int16 phase stored as round(10000 phi / pi) with slope pi/10000: only the scaled values are radians."""
    shape = (6, 5, 5, 12)
    affine = make_affine(ORIENTATIONS["LAS"], shape)
    raw = np.random.default_rng(4).integers(-10000, 10001, shape).astype(np.int16)
    root = tmp_path / "bids"
    write_session(root, "01", None, t1w=(affine, shape[:3]), bssfp=(affine, shape),
                  bssfp_kwargs={"dtype": np.float64},
                  phase=(raw, {"dtype": np.int16, "slope": np.pi / 10000, "inter": 0.0}))
    bssfp = discover(root)[0].sessions[0].bssfp
    assert bssfp.phase_units == "rad"  # raw integers up to 10000 would be "cannot tell"
    values, _ = load_nifti(bssfp.phase)
    np.testing.assert_allclose(values, raw * np.float32(np.pi / 10000), rtol=1e-6)
    assert check_on_grid(bssfp.magnitude, affine, shape, affine, shape[:3]) >= MIN_CHECKED  # float64 magnitude


# --------------------------------------------------------------------------- singleton dimensions
def test_effective_shape():
    assert effective_shape((4, 5, 6, 1)) == (4, 5, 6)
    assert effective_shape((4, 5, 6, 1, 12)) == (4, 5, 6, 12)
    assert effective_shape((4, 5, 1)) == (4, 5, 1)  # a single slice stays 3D
    assert effective_shape((4, 5, 6, 3, 1, 2)) == (4, 5, 6, 3, 2)


def test_t1w_with_a_singleton_fourth_dimension(tmp_path):
    affine = make_affine(ORIENTATIONS["PSR-aniso"], T1W_SHAPE)
    root = tmp_path / "bids"
    write_session(root, "01", None, bssfp=(affine, T1W_SHAPE + (12,)))
    path = save(fx.t1w_path(root, "01", None), linear_image(affine, T1W_SHAPE)[..., None], affine)
    fx.write_json(fx.sidecar(path), {"RepetitionTime": 2.3})
    assert nib.load(path).shape == T1W_SHAPE + (1,)
    t1w = discover(root)[0].sessions[0].t1w
    assert t1w.shape == T1W_SHAPE
    assert load_nifti(path)[0].shape == T1W_SHAPE
    assert check_on_grid(path, affine, T1W_SHAPE, affine, T1W_SHAPE) >= MIN_CHECKED


def test_five_dimensional_bssfp_and_dwi_with_a_singleton_fourth_dimension(tmp_path):
    shape = (5, 4, 4, 12)
    affine = make_affine(ORIENTATIONS["oblique-aniso"], shape)
    root = tmp_path / "bids"
    write_session(root, "01", None, t1w=(affine, shape[:3]), dwi=(4, 4, 4, 1, len(fx.BVALS)))
    magnitude, phase = fx.bssfp_paths(root, "01", None)
    five_d = shape[:3] + (1, 12)
    save(magnitude, linear_image(affine, shape).reshape(five_d), affine)
    save(phase, np.zeros(five_d), affine)
    for path in (magnitude, phase):
        fx.write_json(fx.sidecar(path), {"Units": "rad", "PhaseIncrements": fx.PHASE_INCREMENTS_DEG})
    session = discover(root)[0].sessions[0]
    assert nib.load(magnitude).shape == five_d
    assert session.bssfp.shape == shape and session.bssfp.n_cycles == 12
    assert session.dwi.shape == (4, 4, 4, len(fx.BVALS)) and session.dwi.n_volumes == len(fx.BVALS)
    assert check_on_grid(magnitude, affine, shape, affine, shape[:3]) >= MIN_CHECKED


def test_singleton_t1w_through_the_grid_step(tmp_path):
    affine = make_affine(ORIENTATIONS["RAS-iso"], T1W_SHAPE)
    t1w = save(tmp_path / "t1w.nii.gz", linear_image(affine, T1W_SHAPE)[..., None], affine)
    mask = save(tmp_path / "mask.nii.gz", np.ones(T1W_SHAPE), affine, dtype=np.uint8)
    t1w_grid, _, _ = steps.t1w_to_grid(str(t1w), str(mask), GRID_MM, str(tmp_path / "node"))
    assert nib.load(t1w_grid).shape == T1W_SHAPE


# --------------------------------------------------------------------------- sessions
def test_t1w_of_another_session_defines_the_grid_of_the_bssfp(tmp_path):
    t1w_affine = make_affine(np.diag([1.5, 1.5, 1.5]), (12, 12, 12))
    bssfp_shape = (6, 6, 5, 12)
    bssfp_affine = make_affine(ORIENTATIONS["oblique-aniso"] * 1.1, bssfp_shape)
    root = tmp_path / "bids"
    write_session(root, "01", "1", t1w=(t1w_affine, (12, 12, 12)), dwi=fx.SHAPE + (len(fx.BVALS),))
    write_session(root, "01", "2", bssfp=(bssfp_affine, bssfp_shape))
    sessions = discover(root)[0].sessions
    assert [s.session for s in sessions] == ["1", "2"]
    second = sessions[1]
    assert second.t1w.session == "1" and second.t1w.image == fx.t1w_path(root, "01", "1")
    assert second.bssfp.shape == bssfp_shape and sessions[0].bssfp is None
    t1w_data, t1w_affine_read = load_nifti(second.t1w.image)
    checked = check_on_grid(second.bssfp.magnitude, bssfp_affine, bssfp_shape, t1w_affine_read, t1w_data.shape)
    assert checked >= MIN_CHECKED


def test_sessions_without_dwi(tmp_path):
    affine = make_affine(ORIENTATIONS["RAS-iso"], T1W_SHAPE)
    root = tmp_path / "bids"
    write_session(root, "01", "1", t1w=(affine, T1W_SHAPE), bssfp=(affine, T1W_SHAPE + (12,)),
                  dwi=fx.SHAPE + (len(fx.BVALS),))
    write_session(root, "01", "2", bssfp=(affine, T1W_SHAPE + (12,)))
    found = discover(root)
    first, second = found[0].sessions
    assert first.dwi.n_volumes == len(fx.BVALS) and second.dwi is None
    assert second.bssfp.shape == T1W_SHAPE + (12,) and second.t1w.session == "1"
    bids_io.require_inputs(found, "pc-bssfp", training=True)  # one DWI session is enough to train
    only_second = discover(root, "--session-label", "2")
    with pytest.raises(bids_io.MissingInputError, match="has no DWI"):
        bids_io.require_inputs(only_second, "pc-bssfp", training=True)
    assert check_on_grid(second.bssfp.magnitude, affine, T1W_SHAPE + (12,), affine, T1W_SHAPE) >= MIN_CHECKED
