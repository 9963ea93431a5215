"""Template-space outputs (``--output-spaces``): ANTs normalisation of the T1w, tensor reorientation.

The subject's brain-masked T1w on the common grid is registered to the template's brain (1 mm template
resampled to :data:`TEMPLATE_VOXEL_MM`, masked by its GM + WM probability) with ANTs (antspyx), affine by
default: a cheap registration at 2 mm that the tensor can follow exactly. The predicted tensor is then
resampled onto the template grid and every tensor rotated by the rotation part of the transform's Jacobian
(finite strain, :func:`bssfp2dt.preprocessing.resampling.resample_tensor`); for an affine transform the
Jacobian is the same everywhere. FA, MD, AD, RD, colour-FA and the angles are recomputed from the
template-space tensor (so colour-FA and the angles are in the template's axes).

Conventions: ANTs transforms map fixed (template) points to moving (subject) points in LPS millimetres;
:func:`ants_affine_to_ras` turns one into the 4x4 "target world -> source world" RAS matrix that
:mod:`bssfp2dt.preprocessing.resampling` takes.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bssfp2dt.errors import Bssfp2dtError

logger = logging.getLogger(__name__)

TEMPLATE_VOXEL_MM = 2.0
TRANSFORM_TYPES = {"affine": "Affine", "rigid": "Rigid"}
STAGES = {"affine": ("Rigid", "Similarity", "Affine"), "rigid": ("Rigid",)}
ITERATIONS = (100, 100, 50, 25)  # per pyramid level, coarse to fine
SAMPLING = 0.25  # fraction of voxels the metric samples (ANTs' regular sampling)
FULL_SAMPLING_VOXELS = 200_000  # smaller grids are sampled fully: cheap, and no sampling jitter
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
_REGISTERED: dict = {}  # (T1w path, template, voxel mm) -> (shape, affine, transform) of the last registration


def ants_affine_to_ras(parameters: np.ndarray, fixed_parameters: np.ndarray) -> np.ndarray:
    """4x4 RAS matrix of an ITK/ANTs affine transform (12 parameters: 3x3 row-major matrix, translation;
    fixed parameters: the centre), which maps fixed LPS points x to A (x - c) + t + c."""
    matrix = np.asarray(parameters[:9], dtype=np.float64).reshape(3, 3)
    translation = np.asarray(parameters[9:12], dtype=np.float64)
    centre = np.asarray(fixed_parameters[:3], dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return _LPS @ lps @ _LPS


def template_grid(template_t1w: Path, voxel_mm: float = TEMPLATE_VOXEL_MM):
    """The template on an axis-aligned ``voxel_mm`` grid: ``(t1w, brain (0..1), shape, affine)``.

    The brain is GM + WM probability from the template folder when present, else t1w > 20 % of its 99th
    percentile (templates without tissue maps).
    """
    import nibabel as nib

    from bssfp2dt.preprocessing.resampling import common_grid, resample

    image = nib.load(str(template_t1w))
    data = np.asarray(image.dataobj, dtype=np.float64)
    shape, affine = common_grid(image.affine, image.shape, voxel_mm)
    t1w = resample(data, image.affine, shape, affine)
    brain = None
    for label in ("GM", "WM"):
        candidates = list(Path(template_t1w).parent.glob(f"*res-1_label-{label}_probseg.nii.gz"))
        if candidates and candidates[0].stat().st_size:
            tissue = nib.load(str(candidates[0]))
            values = resample(np.asarray(tissue.dataobj, dtype=np.float64), tissue.affine, shape, affine)
            values = values / max(float(values.max()), 1e-12)  # uint8 copies hold 0..255
            brain = values if brain is None else brain + values
    if brain is None:
        brain = (t1w > 0.2 * np.percentile(t1w, 99)).astype(np.float64)
    return t1w, np.clip(brain, 0.0, 1.0), shape, affine


def register_to_template(t1w: np.ndarray, t1w_affine: np.ndarray, template: np.ndarray,
                         template_affine: np.ndarray, transform_type: str = "affine",
                         seed: int = 1) -> np.ndarray:
    """ANTs registration of a brain-masked T1w (moving) to a template brain (fixed).

    Returns the 4x4 RAS "template world -> T1w world" matrix (mm). Initialised by aligning the centres
    of mass (ANTs' default), mutual information, one thread-independent seed, one ITK thread (as the
    preprocessing's registrations: with more, the metric's partial sums combine in a varying order and two
    runs differ; ``preprocessing.ants_registration``).
    """
    from bssfp2dt.preprocessing.ants_registration import single_thread

    single_thread()  # before ants is imported: ITK reads the thread count once per process
    import ants
    import nibabel as nib

    if transform_type not in TRANSFORM_TYPES:
        raise Bssfp2dtError(f"template registration {transform_type!r} unknown: use {', '.join(TRANSFORM_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="bssfp2dt-ants-") as folder:
        paths = []
        for name, data, affine in (("fixed", template, template_affine), ("moving", t1w, t1w_affine)):
            path = Path(folder) / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
            paths.append(str(path))
        fixed, moving = ants.image_read(paths[0]), ants.image_read(paths[1])
        shrink = pyramid(template.shape)
        options = dict(outprefix=str(Path(folder) / "xfm_"), random_seed=seed, aff_metric="mattes",
                       aff_iterations=ITERATIONS[-len(shrink):], aff_shrink_factors=shrink,
                       aff_smoothing_sigmas=tuple(max(f - 1, 0) for f in shrink),
                       aff_random_sampling_rate=SAMPLING if template.size > FULL_SAMPLING_VOXELS else 1.0,
                       verbose=False)
        # Rigid, then similarity (isotropic scale: heads differ in size), then affine, each from the last
        # (an affine alone from the centres of mass stalls on rotations and scale).
        initial = str(Path(folder) / "initial.mat")
        ants.write_transform(_moments_transform(template, template_affine, t1w, t1w_affine), initial)
        result = None
        for stage in STAGES[transform_type]:
            initial = result["fwdtransforms"][0] if result else initial
            result = ants.registration(fixed=fixed, moving=moving, type_of_transform=stage,
                                       initial_transform=initial, **options)
        transform = ants.read_transform(result["fwdtransforms"][0])
        return ants_affine_to_ras(np.asarray(transform.parameters), np.asarray(transform.fixed_parameters))


def moments_similarity(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray,
                       moving_affine: np.ndarray) -> np.ndarray:
    """4x4 RAS fixed world -> moving world: centres of mass aligned, scaled by the cube root of the ratio of
    the foreground volumes (voxels > 0). ANTs' optimiser does not travel from a 1x to a 0.3x head."""
    def centre_and_volume(data, affine):
        inside = np.asarray(data) > 0
        centre = affine[:3, :3] @ np.argwhere(inside).mean(axis=0) + affine[:3, 3]
        return centre, inside.sum() * abs(np.linalg.det(affine[:3, :3]))

    (fixed_centre, fixed_volume), (moving_centre, moving_volume) = (centre_and_volume(fixed, fixed_affine),
                                                                      centre_and_volume(moving, moving_affine))
    scale = (moving_volume / fixed_volume) ** (1.0 / 3.0)
    transform = np.eye(4)
    transform[:3, :3] = scale * np.eye(3)
    transform[:3, 3] = moving_centre - scale * fixed_centre
    return transform


def _moments_transform(fixed, fixed_affine, moving, moving_affine):
    """:func:`moments_similarity` as an ANTs (LPS) affine transform object."""
    import ants

    lps = _LPS @ moments_similarity(fixed, fixed_affine, moving, moving_affine) @ _LPS
    return ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                      matrix=lps[:3, :3], translation=lps[:3, 3], center=np.zeros(3))


def pyramid(shape, smallest: int = 12) -> tuple[int, ...]:
    """Shrink factors of the multi-resolution registration (8, 4, 2, 1 at most): every level keeps at least
    ``smallest`` voxels along the shortest axis (ANTs' default 8x on a 2 mm grid leaves a dozen)."""
    factors = [factor for factor in (8, 4, 2) if min(shape[:3]) / factor >= smallest]
    return tuple(factors) + (1,)


def _normalisation_figure(output_dir, session, name, t1w, affine, template_affine, transform, brain) -> None:
    """QC: the subject's T1w on the template grid with the template's brain and WM outlines (never fatal)."""
    from bssfp2dt.evaluation.reportlets import tissue_outline_figure
    from bssfp2dt.evaluation.subject_report import qc_figure_path
    from bssfp2dt.preprocessing.resampling import resample

    try:
        moved = resample(t1w, affine, brain.shape, template_affine, transform)
        path = qc_figure_path(output_dir, session.subject, session.t1w_session, "normqc", "T1w", space=name)
        tissue_outline_figure(moved, {"brain": brain}, path, f"sub-{session.subject} T1w in {name}")
    except Exception as error:  # noqa: BLE001 - a figure never fails the subject
        logger.warning("normalisation figure of sub-%s not drawn: %s", session.subject, error)


def tensor_to_template(tensor: np.ndarray, mask: np.ndarray, affine: np.ndarray, shape, template_affine: np.ndarray,
                       transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tensor (X, Y, Z, 6, mm^2/s) and mask resampled to the template grid with finite-strain reorientation.

    ``transform``: 4x4 template world -> subject world (RAS mm). Returns ``(tensor (X', Y', Z', 6), mask)``.
    """
    from bssfp2dt.preprocessing.resampling import resample, resample_tensor

    moved_mask = resample(np.asarray(mask, dtype=np.float64), affine, shape, template_affine, transform) > 0.5
    moved = resample_tensor(np.asarray(tensor, dtype=np.float64), affine, shape, template_affine, transform)
    return moved * moved_mask[..., None], moved_mask


def tensor_through_field(tensor: np.ndarray, affine: np.ndarray, points: np.ndarray,
                         template_affine: np.ndarray) -> np.ndarray:
    """Tensor (X, Y, Z, 6) resampled at a dense point map and reoriented by each voxel's local Jacobian.

    ``points``: (X', Y', Z', 3) subject world positions (RAS mm) of the template voxels (the template ->
    subject map of a nonlinear registration, e.g. ANTs SyN composed with its affine; --output-spaces registers
    affinely and does not use it yet). The Jacobian
    J = d(subject)/d(template) is taken by central differences; each tensor is rotated by the rotation
    part of J (finite strain: ``D_t = R^T D_s R``, R from the SVD of J), as ANTs' ReorientTensorImage does.
    """
    from scipy import ndimage

    points = np.asarray(points, dtype=np.float64)
    inverse = np.linalg.inv(affine)
    voxels = np.einsum("ij,...j->...i", inverse[:3, :3], points) + inverse[:3, 3]
    coords = np.moveaxis(voxels, -1, 0).reshape(3, -1)
    sampled = np.stack([ndimage.map_coordinates(np.asarray(tensor[..., c], dtype=np.float64), coords, order=1,
                                                mode="constant", cval=0.0) for c in range(6)], axis=-1)
    # d(points)/d(template voxel) / voxel size = d(subject world)/d(template world) on an axis-aligned grid
    spacing = np.abs(np.diag(template_affine)[:3])
    jacobian = np.stack([np.gradient(points, axis=axis) / spacing[axis] for axis in range(3)], axis=-1)
    u, _, vt = np.linalg.svd(jacobian.reshape(-1, 3, 3))
    rotation = u @ vt
    d = sampled
    matrix = np.stack([d[:, [0, 1, 2]], d[:, [1, 3, 4]], d[:, [2, 4, 5]]], axis=-2)
    turned = np.swapaxes(rotation, -1, -2) @ matrix @ rotation
    out = np.stack([turned[:, 0, 0], turned[:, 0, 1], turned[:, 0, 2], turned[:, 1, 1], turned[:, 1, 2],
                    turned[:, 2, 2]], axis=-1)
    return out.reshape(points.shape[:3] + (6,))


def prepare_templates(config) -> list[Path]:
    """Obtain every ``--output-spaces`` template before any subject runs (one exit-66 line if one is missing)."""
    from bssfp2dt.spaces.templates import NATIVE_SPACE, parse_space, template_file

    return [template_file(parse_space(space)[0], config.paths.work_dir)
            for space in getattr(config.model, "output_spaces", ()) if space != NATIVE_SPACE]


def write_template_outputs(config, session, raw_session, tensor: np.ndarray, model) -> list[dict[str, Any]]:
    """For every template of ``--output-spaces``: normalise, resample, write ``space-<template>`` outputs.

    ``session``: the preprocessed session (T1w grid and mask); ``tensor``: its predicted tensor (mm^2/s).
    Returns the provenance records (one per template) for the report and the methods text.
    """
    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.io import derivatives
    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.spaces.templates import NATIVE_SPACE, parse_space, template_file

    records = []
    templates = [space for space in getattr(config.model, "output_spaces", ()) if space != NATIVE_SPACE]
    if not templates:
        return records
    t1w, affine = load_nifti(session.t1w)
    mask = np.asarray(load_nifti(session.brain_mask)[0]) > 0
    for space in templates:
        started = time.perf_counter()
        name, voxel_mm = parse_space(space)
        voxel_mm = voxel_mm or TEMPLATE_VOXEL_MM
        key = (str(session.t1w), name, voxel_mm)
        if key not in _REGISTERED:  # sessions sharing one T1w share its registration
            template, brain, shape, template_affine = template_grid(template_file(name, config.paths.work_dir),
                                                                    voxel_mm)
            transform = register_to_template(np.asarray(t1w, dtype=np.float64) * mask, affine,
                                             template * (brain > 0.5), template_affine)
            _REGISTERED.clear()
            _REGISTERED[key] = (shape, template_affine, transform)
            _normalisation_figure(config.paths.output_dir, session, name, np.asarray(t1w, dtype=np.float64) * mask,
                                  affine, template_affine, transform, brain)
        shape, template_affine, transform = _REGISTERED[key]
        moved, moved_mask = tensor_to_template(tensor, mask, affine, shape, template_affine, transform)
        maps = tensor_maps(moved, moved_mask, dtype=np.float32)
        paths = derivatives.tensor_map_paths(session.subject, session.session, model.modality,
                                             config.paths.output_dir, space=name)
        sources = [derivatives.bids_uri(raw_session.t1w.image, config.paths.bids_dir)]
        outputs = {"diffusivity": moved, **{param: maps[param] for param in derivatives.SCALAR_UNITS},
                   "colour_fa": maps["rgb"], "brain_mask": moved_mask.astype(np.uint8)}
        derivatives.write_tensor_outputs(paths, outputs, template_affine, sources, "", model.modality,
                                         model_parameters=model.parameters())
        record = {"step": "normalise_to_template", "template": name, "transform_type": "affine",
                  "stages": ", ".join(STAGES["affine"]) + " (mutual information, moments start)",
                  "tool": "ANTs (antspyx)", "voxel_mm": voxel_mm, "reorientation": "finite strain",
                  "transform": transform.tolist(), "seconds": round(time.perf_counter() - started, 3)}
        logger.info("sub-%s ses-%s: outputs in %s written in %.1f s", session.subject, session.session, name,
                    record["seconds"])
        records.append(record)
    return records
