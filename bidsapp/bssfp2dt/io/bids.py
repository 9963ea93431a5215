"""BIDS input discovery: pybids queries -> typed, frozen, checked inputs per subject and session.

The only module that imports pybids (lazily, so importing the dataclasses stays cheap). Every file
that will be used is checked here (readable NIfTI, matching grids, cycle count, phase units, b-value
and b-vector counts), so that the pipelines never meet an unusable input after writing has begun.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import MissingInputError, NoFilesSelectedError, UsageError
from bssfp2dt.io.nifti import effective_shape
from bssfp2dt.messages import capped, path_problem

if TYPE_CHECKING:
    from bids import BIDSLayout

    from bssfp2dt.config import Config

logger = logging.getLogger(__name__)

N_PHASE_CYCLES = 12
SCANNER_PHASE_MAX = 4095  # 12-bit scanner phase, rescaled to [-pi, pi] downstream
PHASE_UNITS = ("rad", "arbitrary")
TISSUE_LABELS = ("GM", "WM", "CSF")
_NIFTI = [".nii.gz", ".nii"]
# Radians written as float32 may overshoot pi by a rounding step.
_PI_TOLERANCE = 1e-4
PHASE_ENCODING_DIRECTIONS = ("i", "j", "k", "i-", "j-", "k-")

# bids-conventions.md section 2; merged with --bids-filter-file (None: entity absent, "*": any).
DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    "bssfp_mag": {"datatype": "anat", "suffix": "T2w", "acquisition": "pcbssfp", "part": "mag",
                  "extension": _NIFTI},
    "bssfp_phase": {"datatype": "anat", "suffix": "T2w", "acquisition": "pcbssfp", "part": "phase",
                    "extension": _NIFTI},
    "t1w": {"datatype": "anat", "suffix": "T1w", "part": None, "extension": _NIFTI},
    "dwi": {"datatype": "dwi", "suffix": "dwi", "part": None, "extension": _NIFTI},
    "fmap_epi": {"datatype": "fmap", "suffix": "epi", "direction": "*", "extension": _NIFTI},
    "probseg": {"datatype": "anat", "suffix": "probseg", "label": list(TISSUE_LABELS), "space": None,
                "extension": _NIFTI},
    "brain_mask": {"datatype": "anat", "suffix": "mask", "space": None, "extension": _NIFTI},
}
_RAW_KINDS = ("bssfp_mag", "bssfp_phase", "t1w", "dwi", "fmap_epi")
_DERIVATIVE_KINDS = ("probseg", "brain_mask")


# --------------------------------------------------------------------------- typed inputs
@dataclass(frozen=True)
class BssfpInput:
    """Phase-cycled bSSFP: magnitude and phase, each X x Y x Z x cycles on the same grid.

    ``phase_units``: ``"rad"`` (values in [-pi, pi]) or ``"arbitrary"`` (scanner integers 0..4095).
    Times in seconds, angles in degrees, field in tesla (None when the sidecar lacks them).
    """

    magnitude: Path
    phase: Path
    phase_units: str
    phase_increments_deg: tuple[float, ...]
    shape: tuple[int, ...]
    voxel_size_mm: tuple[float, ...]
    repetition_time_s: float | None = None
    echo_time_s: float | None = None
    flip_angle_deg: float | None = None
    field_strength_t: float | None = None

    @property
    def n_cycles(self) -> int:
        return self.shape[3]


@dataclass(frozen=True)
class T1wInput:
    """A T1-weighted image (X x Y x Z); ``session`` is where it was found, maybe not the bSSFP's."""

    image: Path
    session: str | None
    shape: tuple[int, ...]
    voxel_size_mm: tuple[float, ...]


@dataclass(frozen=True)
class DwiInput:
    """DWI series (X x Y x Z x N) with N b-values (s/mm^2) and unit b-vectors (3 x N in the file).

    ``reverse_pe_b0``: an ``fmap/*_dir-<X>_epi`` image with the opposite phase encoding (for TOPUP).
    """

    image: Path
    bval: Path
    bvec: Path
    b_values: tuple[float, ...]
    shape: tuple[int, ...]
    voxel_size_mm: tuple[float, ...]
    phase_encoding_direction: str | None = None
    total_readout_time_s: float | None = None
    reverse_pe_b0: Path | None = None

    @property
    def n_volumes(self) -> int:
        return self.shape[3]


@dataclass(frozen=True)
class TissuePriors:
    """Precomputed tissue probability maps (0..1) and brain mask from ``--derivatives`` datasets."""

    gm: Path | None = None
    wm: Path | None = None
    csf: Path | None = None
    brain_mask: Path | None = None

    @property
    def empty(self) -> bool:
        return not any((self.gm, self.wm, self.csf, self.brain_mask))


@dataclass(frozen=True)
class SessionInputs:
    """Everything found for one subject and session (``session`` None in datasets without sessions)."""

    subject: str
    session: str | None
    bssfp: BssfpInput | None = None
    t1w: T1wInput | None = None
    dwi: DwiInput | None = None
    priors: TissuePriors = TissuePriors()

    def describe(self) -> str:
        """Multi-line human-readable summary (for ``--dry-run``)."""
        lines = [f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")]
        if self.bssfp:
            lines.append(f"  bSSFP magnitude: {self.bssfp.magnitude}")
            lines.append(f"  bSSFP phase:     {self.bssfp.phase} ({self.bssfp.n_cycles} cycles, "
                         f"units {self.bssfp.phase_units})")
        if self.t1w:
            lines.append(f"  T1w:             {self.t1w.image}")
        if self.dwi:
            lines.append(f"  DWI:             {self.dwi.image} ({self.dwi.n_volumes} volumes)")
            if self.dwi.reverse_pe_b0:
                lines.append(f"  reverse-PE b0:   {self.dwi.reverse_pe_b0}")
        for name in ("gm", "wm", "csf", "brain_mask"):
            value = getattr(self.priors, name)
            if value:
                lines.append(f"  {name + ':':<16} {value}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SubjectInputs:
    """All selected sessions of one subject."""

    subject: str
    sessions: tuple[SessionInputs, ...]


# --------------------------------------------------------------------------- layouts
def raw_layout(bids_dir: Path, subjects: Sequence[str] = ()) -> "BIDSLayout":
    """Index ``bids_dir`` without validation, skipping folders and subjects that are not needed."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore: list[Any] = ["code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^/\.")]
    if subjects:
        wanted = "|".join(re.escape(label) for label in subjects)
        ignore.append(re.compile(rf"^/sub-(?!({wanted})(/|$))"))
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=True)
    return BIDSLayout(str(bids_dir), validate=False, indexer=indexer)


def derivatives_layout(path: Path) -> "BIDSLayout":
    """Index a derivatives dataset (sMRIPrep / fMRIPrep outputs) for the tissue priors."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    return BIDSLayout(str(path), validate=False, config=["bids", "derivatives"], indexer=indexer)


def list_subjects(bids_dir: Path) -> tuple[str, ...]:
    """Subject labels of the dataset, from the ``sub-*`` folders (sorted)."""
    return tuple(sorted(folder.name[4:] for folder in Path(bids_dir).glob("sub-*") if folder.is_dir()))


def select_subjects(available: Sequence[str], requested: Sequence[str], bids_dir: Path) -> tuple[str, ...]:
    """The requested labels (all when empty); unknown labels are listed in the error (exit 18)."""
    if not available:
        raise NoFilesSelectedError(f"bids_dir {bids_dir} has no sub-* folders; check the dataset")
    if not requested:
        return tuple(available)
    unknown = [label for label in requested if label not in available]
    if unknown:
        raise NoFilesSelectedError(
            f"--participant-label: no subject {capped('sub-' + u for u in unknown)} in {bids_dir}; "
            f"available: {capped(available)}")
    return tuple(requested)


def to_pybids(query: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the filter-file conventions to pybids: None -> Query.NONE, ``"*"`` -> Query.ANY."""
    from bids.layout import Query

    translated = {}
    for entity, value in query.items():
        if value is None:
            translated[entity] = Query.NONE
        elif value == "*":
            translated[entity] = Query.ANY
        else:
            translated[entity] = value
    return translated


# --------------------------------------------------------------------------- discovery
def discover(config: "Config") -> tuple[SubjectInputs, ...]:
    """Find and check the inputs of every selected subject and session.

    Raises :class:`NoFilesSelectedError` (18) when labels or the filter file select nothing,
    :class:`UsageError` (64) when the filter file names an unknown entity or a query matches several
    files, and :class:`MissingInputError` (66) when a found file or sidecar is unusable.
    """
    bids_dir = config.paths.bids_dir
    subjects = select_subjects(list_subjects(bids_dir), config.selection.participant_labels, bids_dir)
    check_sidecars(bids_dir, subjects)
    layout = raw_layout(bids_dir, subjects)
    queries = {kind: to_pybids(query) for kind, query in config.selection.queries.items()}
    priors_layouts = [(source.name, derivatives_layout(source.path)) for source in config.paths.derivatives]
    if config.paths.bids_filter_file is not None:
        _check_filter_entities(layout, priors_layouts, config.selection.queries, config.paths.bids_filter_file)
    kinds = needed_kinds(config.selection.input_modality)
    sessions_by_subject = _select_sessions(layout, subjects, config.selection.session_labels)
    found = tuple(
        SubjectInputs(subject=subject, sessions=tuple(
            _session_inputs(layout, priors_layouts, queries, kinds, subject, session)
            for session in sessions_by_subject[subject]))
        for subject in subjects)
    if config.paths.bids_filter_file is not None:
        _check_filters_matched(found, layout, priors_layouts, queries, subjects, config)
    return found


def check_sidecars(bids_dir: Path, subjects: Sequence[str]) -> None:
    """Every JSON file pybids will read (top level and the selected subjects) must hold a JSON object.

    pybids fails on the first bad sidecar with an error that is not the user's kind; this names the
    file instead (exit 66). Hidden folders are skipped, as pybids skips them.
    """
    bids_dir = Path(bids_dir)
    candidates = list(bids_dir.glob("*.json"))
    for subject in subjects:
        candidates.extend(path for path in (bids_dir / f"sub-{subject}").rglob("*.json")
                          if not any(part.startswith(".") for part in path.relative_to(bids_dir).parts))
    for path in sorted(candidates):
        if not path.is_file():
            problem = path_problem(path, "file") if path.is_symlink() else None
            if problem is not None:  # pybids would stop on it with an OSError
                raise MissingInputError(f"{path} {problem}")
            continue
        try:
            content = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MissingInputError(f"{path} is not valid JSON ({reason}); fix or remove this sidecar") from None
        if not isinstance(content, dict):
            raise MissingInputError(f"{path} holds a JSON {type(content).__name__}, not an object of "
                                    "metadata fields; fix or remove this sidecar")
        # pybids resolves IntendedFor while indexing and fails on anything but paths.
        intended = content.get("IntendedFor", [])
        intended = [intended] if isinstance(intended, str) else intended
        if not isinstance(intended, list) or not all(isinstance(target, str) for target in intended):
            raise MissingInputError(f"{path}: IntendedFor must be a path or a list of paths "
                                    "(bids::sub-<label>/...); fix the sidecar")


def _check_filter_entities(layout: "BIDSLayout", priors_layouts: list[tuple[str, "BIDSLayout"]],
                           queries: Mapping[str, Mapping[str, Any]], filter_file: Path) -> None:
    """Every entity a query names must be one pybids knows for the layout it is sent to (else exit 64)."""
    for kind, query in queries.items():
        layouts = [layout] if kind in _RAW_KINDS else [lay for _, lay in priors_layouts]
        for layout_ in layouts:
            known = set(layout_.get_entities())
            unknown = sorted(set(query) - known)
            if unknown:
                raise UsageError(f"--bids-filter-file {filter_file}: {kind}.{unknown[0]} is not a BIDS entity or "
                                 "metadata field of the dataset; use entity names such as acquisition, run, "
                                 "reconstruction")


def needed_kinds(input_modality: str) -> frozenset[str]:
    """Input kinds read for a modality; DWI is always read when present (reference / training target)."""
    kinds = {"t1w", "dwi", "fmap_epi", "probseg", "brain_mask"}
    if modalities.get(input_modality).reads_bssfp:
        kinds |= {"bssfp_mag", "bssfp_phase"}
    return frozenset(kinds)


def require_inputs(subjects: Iterable[SubjectInputs], input_modality: str, training: bool) -> None:
    """Every subject needs its modality's input and a T1w (outputs live in T1w space); training also DWI.

    Raises :class:`MissingInputError` naming the subject and what it lacks.
    """
    modality = modalities.get(input_modality)
    for subject in subjects:
        sessions = subject.sessions
        where = f"sub-{subject.subject}"
        if modality.reads_bssfp and not any(s.bssfp for s in sessions):
            raise MissingInputError(
                f"{where} has no pc-bSSFP magnitude+phase (anat/*_acq-pcbssfp_part-mag_T2w.nii.gz); add it, "
                "drop the subject with --participant-label, or use --input-modality t1w")
        if not any(s.t1w for s in sessions):
            raise MissingInputError(f"{where} has no T1w (anat/*_T1w.nii.gz), which defines the output space; "
                                    "add one or drop the subject with --participant-label")
        if (modality.needs_dwi or training) and not any(s.dwi for s in sessions):
            raise MissingInputError(f"{where} has no DWI (dwi/*_dwi.nii.gz), needed for "
                                    f"{'training' if training else f'--input-modality {modality.name}'}; "
                                    "add it or drop the subject with --participant-label")


def _select_sessions(layout: "BIDSLayout", subjects: Sequence[str],
                     requested: Sequence[str]) -> dict[str, tuple[str | None, ...]]:
    by_subject: dict[str, tuple[str | None, ...]] = {}
    for subject in subjects:
        sessions = tuple(sorted(layout.get_sessions(subject=subject))) or (None,)
        if requested:
            sessions = tuple(s for s in sessions if s in requested)
        by_subject[subject] = sessions
    if requested:
        seen = {s for sessions in by_subject.values() for s in sessions}
        unknown = [label for label in requested if label not in seen]
        if unknown:
            raise NoFilesSelectedError(f"--session-label: no session {capped('ses-' + u for u in unknown)} in "
                                       f"the selected subjects; check the labels")
    return by_subject


def _get(layout: "BIDSLayout", query: Mapping[str, Any], subject: str, session: str | None) -> list[Path]:
    from bids.layout import Query

    files = layout.get(return_type="filename", subject=subject,
                       session=session if session is not None else Query.NONE, **query)
    return sorted(Path(name) for name in files)


def _session_inputs(layout: "BIDSLayout", priors_layouts: list[tuple[str, "BIDSLayout"]],
                    queries: Mapping[str, Mapping[str, Any]], kinds: frozenset[str],
                    subject: str, session: str | None) -> SessionInputs:
    where = f"sub-{subject}" + (f" ses-{session}" if session else "")
    bssfp = _bssfp(layout, queries, subject, session, where) if "bssfp_mag" in kinds else None
    dwi = _dwi(layout, queries, subject, session, where)
    t1w = _t1w(layout, queries["t1w"], subject, session, where)
    priors = _priors(priors_layouts, queries, subject, session)
    return SessionInputs(subject=subject, session=session, bssfp=bssfp, t1w=t1w, dwi=dwi, priors=priors)


def _single(files: list[Path], what: str, where: str) -> Path | None:
    if len(files) > 1:
        names = capped(f.name for f in files)
        raise UsageError(f"{where}: several {what} match ({names}); select one with --bids-filter-file")
    return files[0] if files else None


def _bssfp(layout: "BIDSLayout", queries: Mapping[str, Mapping[str, Any]], subject: str,
           session: str | None, where: str) -> BssfpInput | None:
    magnitude = _single(_get(layout, queries["bssfp_mag"], subject, session), "bSSFP magnitude series", where)
    phase = _single(_get(layout, queries["bssfp_phase"], subject, session), "bSSFP phase series", where)
    if magnitude is None and phase is None:
        return None
    if phase is None:
        raise MissingInputError(f"bSSFP magnitude {magnitude} has no phase series (part-phase) on the same "
                                "grid; add it or use --input-modality t1w")
    if magnitude is None:
        raise MissingInputError(f"bSSFP phase {phase} has no magnitude series (part-mag); add it or use "
                                "--input-modality t1w")
    mag_header = read_nifti_header(magnitude)
    phase_header = read_nifti_header(phase)
    check_same_grid(magnitude, mag_header, phase, phase_header)
    shape = effective_shape(mag_header.get_data_shape())
    mag_meta = layout.get_metadata(str(magnitude))
    phase_meta = layout.get_metadata(str(phase))
    increments = phase_increments(magnitude, shape, mag_meta, phase, phase_meta)
    return BssfpInput(
        magnitude=magnitude, phase=phase, phase_units=phase_units(phase, phase_meta),
        phase_increments_deg=increments, shape=shape,
        voxel_size_mm=tuple(float(v) for v in mag_header.get_zooms()[:3]),
        repetition_time_s=_number(mag_meta, "RepetitionTime", magnitude),
        echo_time_s=_number(mag_meta, "EchoTime", magnitude), flip_angle_deg=_number(mag_meta, "FlipAngle", magnitude),
        field_strength_t=_number(mag_meta, "MagneticFieldStrength", magnitude))


def phase_increments(magnitude: Path, shape: tuple[int, ...], mag_meta: Mapping[str, Any], phase: Path,
                     phase_meta: Mapping[str, Any]) -> tuple[float, ...]:
    """The RF phase increments (degrees, one per volume, in storage order), checked against the 4th
    dimension (12 cycles).

    Without a ``PhaseIncrements`` sidecar field, evenly spaced increments 360 k / N are assumed. The
    preprocessing sorts the cycles by these increments (:func:`bssfp2dt.preprocessing.bssfp.cycle_order`), so a
    series stored in another order feeds the network's channels in the order it was trained with.
    """
    if len(shape) != 4 or shape[3] != N_PHASE_CYCLES:
        cycles = shape[3] if len(shape) == 4 else 1
        raise MissingInputError(f"bSSFP magnitude {magnitude} has {cycles} volume(s); {N_PHASE_CYCLES} phase "
                                "cycles are required (4D: x, y, z, cycle)")
    listed = [meta["PhaseIncrements"] for meta in (mag_meta, phase_meta) if "PhaseIncrements" in meta]
    if not listed:
        logger.warning("%s: no PhaseIncrements in the sidecar; assuming 0, 30, ..., 330 degrees", magnitude.name)
        return tuple(360.0 * k / shape[3] for k in range(shape[3]))
    sources = [source for meta, source in ((mag_meta, magnitude), (phase_meta, phase)) if "PhaseIncrements" in meta]
    for values, source in zip(listed, sources):
        if not isinstance(values, list) or len(values) != shape[3]:
            count = len(values) if isinstance(values, list) else "no list of"
            raise MissingInputError(f"{source}: the sidecar lists {count} PhaseIncrements but the series has "
                                    f"{shape[3]} volumes; fix the sidecar")
        if not all(_is_number(value) for value in values):
            raise MissingInputError(f"{source}: the sidecar's PhaseIncrements are not all numbers (degrees); "
                                    "fix the sidecar")
    if len(listed) == 2 and not np.allclose(listed[0], listed[1]):
        raise MissingInputError(f"bSSFP magnitude {magnitude} and phase {phase} list different PhaseIncrements; "
                                "fix the sidecars")
    increments = tuple(float(v) for v in listed[0])
    wrapped = np.mod(increments, 360.0)
    ordered = np.sort(wrapped)
    if not np.allclose(ordered - ordered[0], 360.0 * np.arange(shape[3]) / shape[3], atol=0.5):
        logger.warning("%s: the PhaseIncrements (%s degrees) are not %d evenly spaced cycles, the spacing the "
                       "packaged models were trained with", magnitude.name,
                       ", ".join(f"{v:g}" for v in increments), shape[3])
    elif np.any(np.diff(wrapped) < 0):
        logger.info("%s: cycles stored in another order than their PhaseIncrements; they are sorted by increment",
                    magnitude.name)
    return increments


def phase_units(phase: Path, meta: Mapping[str, Any]) -> str:
    """``"rad"`` or ``"arbitrary"`` from the sidecar ``Units``, else from the value range of the data."""
    units = meta.get("Units")
    if units is not None:
        if units not in PHASE_UNITS:
            raise MissingInputError(f"bSSFP phase {phase}: sidecar Units {units!r} is not 'rad' or 'arbitrary'; "
                                    "fix the sidecar")
        return units
    import nibabel as nib

    try:
        values = np.asanyarray(nib.load(str(phase)).dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise MissingInputError(f"bSSFP phase {phase}: its voxel data cannot be read ({type(error).__name__}); "
                                "re-export or replace it") from None
    detected = detect_phase_units(values)
    if detected is None:
        raise MissingInputError(f"bSSFP phase {phase}: cannot tell the units (values neither within [-pi, pi] "
                                "nor integers 0..4095); set \"Units\" to \"rad\" or \"arbitrary\" in its sidecar")
    logger.info("%s: phase units detected from the values: %s", phase.name, detected)
    return detected


def detect_phase_units(data: np.ndarray) -> str | None:
    """``"rad"`` if every value lies in [-pi, pi]; ``"arbitrary"`` for integers in 0..4095; else None."""
    values = np.asarray(data)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return None
    low, high = float(values.min()), float(values.max())
    if low >= -np.pi - _PI_TOLERANCE and high <= np.pi + _PI_TOLERANCE:
        return "rad"
    if low >= 0 and high <= SCANNER_PHASE_MAX and np.all(values == np.round(values)):
        return "arbitrary"
    return None


def _t1w(layout: "BIDSLayout", query: Mapping[str, Any], subject: str, session: str | None,
         where: str) -> T1wInput | None:
    """The session's own T1w, else the subject's T1w from another session (one per subject is normal)."""
    same_session = _get(layout, query, subject, session)
    if same_session:
        image, found_in = same_session[0], session
    else:
        any_session = sorted(Path(f) for f in layout.get(return_type="filename", subject=subject, **query))
        if not any_session:
            return None
        image = any_session[0]
        found_in = layout.parse_file_entities(str(image)).get("session")
        logger.debug("%s: using the T1w of session %s", where, found_in)
    if len(same_session) > 1:
        logger.info("%s: %d T1w images match; using %s", where, len(same_session), image.name)
    header = read_nifti_header(image)
    shape = effective_shape(header.get_data_shape())
    if len(shape) != 3:
        raise MissingInputError(f"T1w {image} holds {int(np.prod(shape[3:]))} volumes (shape {shape}); give a "
                                "single 3D image or select one with --bids-filter-file")
    return T1wInput(image=image, session=found_in, shape=shape,
                    voxel_size_mm=tuple(float(v) for v in header.get_zooms()[:3]))


def _dwi(layout: "BIDSLayout", queries: Mapping[str, Mapping[str, Any]], subject: str, session: str | None,
         where: str) -> DwiInput | None:
    image = _single(_get(layout, queries["dwi"], subject, session), "DWI series", where)
    if image is None:
        return None
    header = read_nifti_header(image)
    shape = effective_shape(header.get_data_shape())
    if len(shape) != 4:
        raise MissingInputError(f"DWI {image} is not 4D (shape {shape}); give the full diffusion series")
    bval, bvec = _companion(layout, image, "bval"), _companion(layout, image, "bvec")
    b_values = read_gradients(image, bval, bvec, shape[3])
    meta = layout.get_metadata(str(image))
    return DwiInput(image=image, bval=bval, bvec=bvec, b_values=b_values, shape=shape,
                    voxel_size_mm=tuple(float(v) for v in header.get_zooms()[:3]),
                    phase_encoding_direction=_phase_encoding(meta, image),
                    total_readout_time_s=_number(meta, "TotalReadoutTime", image),
                    reverse_pe_b0=_reverse_pe_b0(layout, queries["fmap_epi"], image, subject, session, meta))


def _companion(layout: "BIDSLayout", image: Path, kind: str) -> Path:
    getter = layout.get_bval if kind == "bval" else layout.get_bvec
    try:
        found = getter(str(image))
    except IndexError:  # pybids raises this when no file is found at any level
        found = None
    if not found:
        raise MissingInputError(f"DWI {image} has no .{kind} file; add {image.name.split('.')[0]}.{kind}")
    return Path(found)


def read_gradients(image: Path, bval: Path, bvec: Path, n_volumes: int) -> tuple[float, ...]:
    """Read b-values (s/mm^2) and check that both files have one entry per volume (bvec: 3 rows)."""
    try:
        b_values = np.loadtxt(bval, ndmin=1)
        b_vectors = np.loadtxt(bvec, ndmin=2)
    except ValueError as error:
        raise MissingInputError(f"DWI {image}: cannot read {bval.name} / {bvec.name} ({error}); "
                                "fix the files") from None
    if b_values.ndim != 1 or b_values.size != n_volumes:
        raise MissingInputError(f"DWI {image} has {n_volumes} volumes but {bval} lists {b_values.size} b-values; "
                                "fix the .bval")
    if b_vectors.shape != (3, n_volumes):
        raise MissingInputError(f"DWI {image} has {n_volumes} volumes but {bvec} holds a "
                                f"{b_vectors.shape[0]}x{b_vectors.shape[1]} table (3x{n_volumes} expected); "
                                "fix the .bvec")
    if not np.all(np.isfinite(b_values)) or np.any(b_values < 0):
        raise MissingInputError(f"DWI {image}: {bval} holds negative or non-numeric b-values; fix the .bval")
    if not np.all(np.isfinite(b_vectors)):
        raise MissingInputError(f"DWI {image}: {bvec} holds non-numeric entries; fix the .bvec")
    return tuple(float(b) for b in b_values)


def _reverse_pe_b0(layout: "BIDSLayout", query: Mapping[str, Any], dwi: Path, subject: str,
                   session: str | None, dwi_meta: Mapping[str, Any]) -> Path | None:
    """The fmap EPI meant for this DWI (IntendedFor), else the only one whose PE opposes the DWI's."""
    candidates = _get(layout, query, subject, session)
    relative = dwi.relative_to(Path(layout.root) / f"sub-{subject}").as_posix()
    intended = []
    opposed = []
    dwi_direction = _phase_encoding(dwi_meta, dwi)
    for candidate in candidates:
        meta = layout.get_metadata(str(candidate))
        targets = meta.get("IntendedFor", [])
        targets = [targets] if isinstance(targets, str) else targets  # a list of str: check_sidecars
        if any(t.endswith(relative) for t in targets):
            intended.append(candidate)
        direction = _phase_encoding(meta, candidate)
        if direction and dwi_direction and direction.rstrip("-") == dwi_direction.rstrip("-") and \
                direction != dwi_direction:
            opposed.append(candidate)
    chosen = intended[0] if intended else (opposed[0] if len(opposed) == 1 else None)
    if chosen is not None:
        read_nifti_header(chosen)
    return chosen


def _priors(priors_layouts: list[tuple[str, "BIDSLayout"]], queries: Mapping[str, Mapping[str, Any]],
            subject: str, session: str | None) -> TissuePriors:
    """The first ``--derivatives`` dataset providing each map wins; session-specific before subject-wide."""
    found: dict[str, Path] = {}
    for _, layout in priors_layouts:
        if subject not in layout.get_subjects():
            continue
        for sess in ([session, None] if session else [None]):
            for path in _get(layout, queries["probseg"], subject, sess):
                label = layout.parse_file_entities(str(path)).get("label", "")
                if label.upper() in TISSUE_LABELS:
                    found.setdefault(label.lower(), path)
            masks = _get(layout, queries["brain_mask"], subject, sess)
            if masks:
                found.setdefault("brain_mask", masks[0])
    for path in found.values():
        read_nifti_header(path)
    return TissuePriors(**found)


def _check_filters_matched(found: tuple[SubjectInputs, ...], layout: "BIDSLayout",
                           priors_layouts: list[tuple[str, "BIDSLayout"]], queries: Mapping[str, Mapping[str, Any]],
                           subjects: Sequence[str], config: "Config") -> None:
    """Every kind the filter file overrides must select at least one file (else exit 18)."""
    overridden = json.loads(config.paths.bids_filter_file.read_text()).keys()
    for kind in overridden:
        layouts = [layout] if kind in _RAW_KINDS else [lay for _, lay in priors_layouts]
        matched = any(layout_.get(return_type="filename", subject=list(subjects), **queries[kind])
                      for layout_ in layouts)
        if not matched and (kind in _RAW_KINDS or priors_layouts):
            raise NoFilesSelectedError(f"--bids-filter-file {config.paths.bids_filter_file}: the {kind!r} query "
                                       "selects no file for the selected subjects; loosen it")


# --------------------------------------------------------------------------- NIfTI checks
def read_nifti_header(path: Path) -> Any:
    """Load the NIfTI header and check that the file holds all its voxel data, has at least three
    non-empty dimensions and an invertible affine; 66 if not.

    For .nii.gz the gzip trailer (uncompressed size mod 2^32) is compared with header offset + data
    size; only when that disagrees (truncation, or multi-member gzip) is the file fully decompressed.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        header = image.header
        # The array proxy's offset is where nibabel really reads (the header may say 0 for single files).
        offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
        expected = offset + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as error:  # noqa: BLE001 - any failure to parse means the file is unusable
        problem = path_problem(path, "file")
        if problem is not None:
            raise MissingInputError(f"{path} {problem}") from None
        raise MissingInputError(f"{path} is not a readable NIfTI file ({type(error).__name__}); "
                                "re-export or replace it") from None
    if not _complete(Path(path), expected):
        raise MissingInputError(f"{path} is truncated or corrupt (fewer voxel bytes than its header says); "
                                "re-export or replace it")
    _check_geometry(Path(path), header)
    return header


def _check_geometry(path: Path, header: Any) -> None:
    """At least 3 non-empty dimensions and a finite, invertible voxel -> world affine (else 66)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3 or 0 in shape:
        raise MissingInputError(f"{path} has shape {shape}; a 3D (or 4D) image with at least one voxel a side "
                                "is needed, re-export it")
    linear = np.asarray(header.get_best_affine(), dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(linear)) or abs(np.linalg.det(linear)) < 1e-9:
        raise MissingInputError(f"{path} has a non-finite or singular voxel-to-world affine (sform/qform, "
                                "pixdim); fix its header")


def _complete(path: Path, expected_bytes: int) -> bool:
    if path.name.endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, 2)
            trailer_size = int.from_bytes(handle.read(4), "little")
        if trailer_size == expected_bytes % 2 ** 32:
            return True
        return _decompressed_size(path) >= expected_bytes
    return path.stat().st_size >= expected_bytes


def _decompressed_size(path: Path) -> int:
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                size += len(chunk)
    except (OSError, EOFError, zlib.error):
        return -1
    return size


def check_same_grid(first: Path, first_header: Any, second: Path, second_header: Any) -> None:
    """Same voxel grid: identical shape (incl. volumes; singleton dimensions after the third ignored)
    and affines equal within 1e-3 mm."""
    first_shape = effective_shape(first_header.get_data_shape())
    second_shape = effective_shape(second_header.get_data_shape())
    same_affine = np.allclose(first_header.get_best_affine(), second_header.get_best_affine(), atol=1e-3)
    if first_shape != second_shape:
        raise MissingInputError(
            f"bSSFP magnitude {first} and phase {second} are on different grids "
            f"(shapes {first_shape} vs {second_shape}); reconstruct them together")
    if not same_affine:
        offset = np.abs(first_header.get_best_affine() - second_header.get_best_affine()).max()
        raise MissingInputError(
            f"bSSFP magnitude {first} and phase {second} are on different grids (affines differ by up to "
            f"{offset:.3g} mm); reconstruct them together")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _number(meta: Mapping[str, Any], key: str, image: Path) -> float | None:
    """A numeric sidecar field as float (None when absent); anything else is the user's to fix (66)."""
    value = meta.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise MissingInputError(f"the sidecar of {image} gives {key} = {value!r}, not a number; fix the sidecar")
    return float(value)


def _phase_encoding(meta: Mapping[str, Any], image: Path) -> str | None:
    """``PhaseEncodingDirection`` (i, j, k, i-, j-, k-) or None when absent."""
    value = meta.get("PhaseEncodingDirection")
    if value is None:
        return None
    if value not in PHASE_ENCODING_DIRECTIONS:
        raise MissingInputError(f"the sidecar of {image} gives PhaseEncodingDirection = {value!r}; use one of "
                                f"{', '.join(PHASE_ENCODING_DIRECTIONS)}")
    return value
