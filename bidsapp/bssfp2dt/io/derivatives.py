"""The BIDS-Derivatives output dataset: every output name, sidecar, dataset_description.json, .bidsignore.

The only module that decides output file names (through :func:`bssfp2dt.io.naming.bids_path`), so the
pipelines ask :func:`tensor_map_paths` for paths and never format ``sub-...`` strings themselves.
Naming follows the BEP016 draft (bids-conventions.md section 3); images are written atomically, the
sidecar before the image, so an image under its final name always has its metadata.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bssfp2dt import __version__, modalities
from bssfp2dt.errors import OutputError
from bssfp2dt.io.naming import bids_filename, bids_path
from bssfp2dt.io.nifti import save_nifti, write_json, write_text

logger = logging.getLogger(__name__)

PIPELINE_NAME = "bssfp2dt"
def _code_url(default: str = "https://github.com/bssfp2dt/bssfp2dt") -> str:
    """The ``Source`` URL of the installed package's metadata (``[project.urls]`` in pyproject.toml: one place)."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        for entry in metadata("bssfp2dt").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() == "source" and url.strip():
                return url.strip()
    except (ImportError, PackageNotFoundError):
        pass
    return default


CODE_URL = _code_url()
HOW_TO_ACKNOWLEDGE = ("Please cite bssfp2dt with its version (GeneratedBy) and include the methods text of "
                      "logs/CITATION.md, with its references (logs/CITATION.bib), in the Methods section.")
BIDS_VERSION = "1.10.0"
RAW_DATASET_KEY = "raw"  # BIDS URIs of inputs read "bids:raw:sub-01/..."
SPACE = "T1w"
# --input-modality value -> alphanumeric desc label of the outputs.
MODALITY_DESC = {modality.name: modality.desc for modality in modalities.MODALITIES}
TENSOR_COMPONENT_ORDER = modalities.TENSOR_COMPONENTS  # BEP016 volume order
SCALAR_UNITS = {"fa": "ratio", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s",
                "inclination": "deg", "azimuth": "deg"}
SCALAR_DESCRIPTIONS = {
    "fa": "fractional anisotropy (dimensionless, 0..1)",
    "md": "mean diffusivity, mean of the eigenvalues",
    "ad": "axial diffusivity, largest eigenvalue",
    "rd": "radial diffusivity, mean of the two smaller eigenvalues",
    "inclination": "inclination of the principal eigenvector from the +z axis (0..180 degrees)",
    "azimuth": "azimuth of the principal eigenvector in the xy plane from +x (degrees)",
}
# bids-validator-deno 3.x ignores no folder for a pattern with a trailing slash ("figures/"); the bare
# name ("figures") matches the folder at any depth, so the evaluation's folders are listed both ways.
BIDSIGNORE_LINES = ("*_dwimap.*", "*.html", "*_errors.tsv", "*_errors.json", "figures/", "figures", "logs/", "log/",
                    "sub-*/figures/**", "logs", "log", "models/", "models",
                    "group/", "group")
README_TEXT = (
    f"# {PIPELINE_NAME} derivatives\n\nDiffusion tensor (BEP016 draft naming, `*_dwimap.nii.gz`), FA, MD, AD, RD, "
    "colour-FA, principal-eigenvector angles, tissue probability maps and brain masks predicted by "
    f"{PIPELINE_NAME} ({CODE_URL}) in each subject's T1w space at the DWI resolution.\n")
# pybids knows `model` but not BEP016's `param`; pass this in `config=["bids", "derivatives", PYBIDS_BEP016_CONFIG]`.
PYBIDS_BEP016_CONFIG = {"name": "bep016", "entities": [{"name": "param", "pattern": r"[_/\\]+param-([a-zA-Z0-9]+)"}]}
TENSOR_FILE_PATTERN = "*_model-tensor_param-diffusivity_dwimap.nii.gz"


@dataclass(frozen=True)
class OutputPaths:
    """Every image the participant level writes for one subject, session and input modality."""

    diffusivity: Path
    fa: Path
    md: Path
    ad: Path
    rd: Path
    inclination: Path
    azimuth: Path
    colour_fa: Path
    gm: Path
    wm: Path
    csf: Path
    brain_mask: Path

    def all(self) -> tuple[Path, ...]:
        """All image paths, in field order."""
        return tuple(getattr(self, item.name) for item in dataclasses.fields(self))

    def scalar(self, param: str) -> Path:
        """Path of a scalar map: ``fa``, ``md``, ``ad``, ``rd``, ``inclination`` or ``azimuth``."""
        if param not in SCALAR_UNITS:
            raise ValueError(f"unknown tensor parameter {param!r}")
        return getattr(self, param)


def modality_desc(input_modality: str) -> str:
    """``'pc-bssfp'`` -> ``'pcbssfp'`` (the desc label of outputs predicted from that modality)."""
    try:
        return MODALITY_DESC[input_modality]
    except KeyError:
        raise ValueError(f"unknown input modality {input_modality!r}") from None


def tensor_map_paths(subject: str, session: str | None, modality: str, root: Path | str = ".",
                     space: str = SPACE) -> OutputPaths:
    """Paths of every output of the naming table under ``root`` (relative when root is ``'.'``).

    ``modality`` is an ``--input-modality`` value (``pc-bssfp``) or its desc label (``pcbssfp``);
    ``space``: ``T1w`` or a template name (``--output-spaces``).
    """
    desc = MODALITY_DESC.get(modality, modality)
    if desc not in MODALITY_DESC.values():
        raise ValueError(f"unknown input modality {modality!r}")
    root = Path(root)
    common = {"subject": subject, "session": session, "space": space}

    def dwimap(param: str, description: str = desc) -> Path:
        return bids_path(root, "dwi", "dwimap", description=description, model="tensor", param=param, **common)

    return OutputPaths(
        diffusivity=dwimap("diffusivity"),
        **{param: dwimap(param) for param in SCALAR_UNITS},
        colour_fa=dwimap("fa", f"{desc}dec"),
        gm=bids_path(root, "anat", "probseg", label="GM", **common),
        wm=bids_path(root, "anat", "probseg", label="WM", **common),
        csf=bids_path(root, "anat", "probseg", label="CSF", **common),
        brain_mask=bids_path(root, "anat", "mask", description="brain", **common),
    )


@dataclass(frozen=True)
class PreprocPaths:
    """The ``--write-preproc`` images of one subject and session (``desc-preproc``, space-T1w, not normalised)."""

    bssfp_magnitude: Path
    bssfp_phase: Path
    t1w: Path
    diffusivity: Path


def preproc_paths(subject: str, session: str | None, root: Path | str = ".") -> PreprocPaths:
    """Paths of the preprocessed (``desc-preproc``) images under ``root``; masks and tissue maps use
    the :func:`tensor_map_paths` names (they are the same images)."""
    common = {"subject": subject, "session": session, "space": SPACE, "description": "preproc"}
    root = Path(root)
    return PreprocPaths(
        bssfp_magnitude=bids_path(root, "anat", "T2w", acquisition="pcbssfp", part="mag", **common),
        bssfp_phase=bids_path(root, "anat", "T2w", acquisition="pcbssfp", part="phase", **common),
        t1w=bids_path(root, "anat", "T1w", **common),
        diffusivity=bids_path(root, "dwi", "dwimap", model="tensor", param="diffusivity", **common),
    )


def preproc_sidecar(sources: Iterable[str], spatial_reference: str, description: str, units: str, *,
                    skull_stripped: bool = True, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sidecar of a ``desc-preproc`` image: what was done (``description``), its units and extra fields."""
    return {**_common(sources, spatial_reference, skull_stripped), "Description": description, "Units": units,
            **dict(extra or {})}


def sidecar_path(image: Path) -> Path:
    """``x.nii.gz`` -> ``x.json``."""
    name = image.name
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return image.with_name(name[: -len(extension)] + ".json")
    return image.with_suffix(".json")


def subject_log_dir(output_dir: Path, subject: str, run_uuid: str) -> Path:
    """``output_dir/sub-<label>/log/<run_uuid>/``: resolved config and log of one run."""
    return Path(output_dir) / f"sub-{subject}" / "log" / run_uuid


def run_config_path(output_dir: Path, subject: str | None, run_uuid: str) -> Path:
    """Where the run's TOML config is saved (per subject; group runs under ``output_dir/log/``)."""
    folder = subject_log_dir(output_dir, subject, run_uuid) if subject else Path(output_dir) / "log" / run_uuid
    return folder / "bssfp2dt.toml"


def group_dir(output_dir: Path) -> Path:
    """Folder of the group-level tables and report."""
    return Path(output_dir) / "group"


def find_participant_results(output_dir: Path, subjects: Sequence[str] = ()) -> dict[str, tuple[Path, ...]]:
    """Subject label -> diffusivity-tensor files the participant level wrote (selected subjects only)."""
    results: dict[str, tuple[Path, ...]] = {}
    for folder in sorted(Path(output_dir).glob("sub-*")):
        label = folder.name[4:]
        if not folder.is_dir() or (subjects and label not in subjects):
            continue
        found = tuple(sorted(folder.rglob(TENSOR_FILE_PATTERN)))
        if found:
            results[label] = found
    return results


# --------------------------------------------------------------------------- dataset level
def bids_uri(path: Path | str, bids_dir: Path) -> str:
    """BIDS URI of an input file, ``bids:raw:sub-01/anat/...`` (``raw`` is a DatasetLinks key).

    Folders are resolved, the file itself is not: in DataLad/git-annex datasets every file is a symlink
    into ``.git/annex``, and its URI must still name the BIDS path.
    """
    path = Path(path)
    relative = (path.parent.resolve() / path.name).relative_to(Path(bids_dir).resolve())
    return f"bids:{RAW_DATASET_KEY}:{relative.as_posix()}"


def dataset_description(bids_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The derivative ``dataset_description.json`` content.

    ``GeneratedBy[0].Container`` is set from ``BSSFP2DT_CONTAINER_TYPE``/``BSSFP2DT_CONTAINER_TAG``
    (the image sets them); ``SourceDatasets`` from the input's ``DatasetDOI`` when it has one.
    """
    environ = os.environ if environ is None else environ
    generated_by: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
    container_type, container_tag = environ.get("BSSFP2DT_CONTAINER_TYPE"), environ.get("BSSFP2DT_CONTAINER_TAG")
    if container_type:
        generated_by["Container"] = {"Type": container_type, **({"Tag": container_tag} if container_tag else {})}
    raw = _read_json(Path(bids_dir) / "dataset_description.json")
    description: dict[str, Any] = {
        "Name": f"{PIPELINE_NAME} outputs" + (f" for {raw['Name']}" if raw.get("Name") else ""),
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        # Derivatives carry the terms of the data they come from; the code's own licence is in GeneratedBy's CodeURL.
        "License": str(raw.get("License") or "the source dataset's licence (it declares none)"),
        "HowToAcknowledge": HOW_TO_ACKNOWLEDGE,
    }
    doi = raw.get("DatasetDOI")
    if doi:
        doi = doi if doi.startswith("doi:") else "doi:" + doi.removeprefix("https://doi.org/")
        source: dict[str, str] = {"DOI": doi}
        if raw.get("DatasetVersion"):
            source["Version"] = str(raw["DatasetVersion"])
        description["SourceDatasets"] = [source]
    description["DatasetLinks"] = {RAW_DATASET_KEY: doi or Path(bids_dir).resolve().as_uri()}
    return description


def check_output_dataset(output_dir: Path) -> None:
    """Refuse an output_dir that already holds another pipeline's derivatives (exit 73). Writes nothing."""
    existing = Path(output_dir) / "dataset_description.json"
    if not existing.is_file():
        return
    content = _read_json(existing)
    names = [entry.get("Name") for entry in content.get("GeneratedBy", []) if isinstance(entry, dict)]
    if names and names[0] != PIPELINE_NAME:
        raise OutputError(f"output_dir {output_dir} holds derivatives of {names[0]!r} "
                          f"({existing}); choose an empty folder or one written by {PIPELINE_NAME}")


def initialise_dataset(output_dir: Path, bids_dir: Path) -> None:
    """Create ``output_dir`` with ``dataset_description.json`` and ``.bidsignore`` (exit 73 if impossible)."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(dataset_description(bids_dir), output_dir / "dataset_description.json")
        write_text("".join(line + "\n" for line in BIDSIGNORE_LINES), output_dir / ".bidsignore")
        if not (output_dir / "README.md").exists():
            write_text(README_TEXT, output_dir / "README.md")
    except OSError as error:
        raise OutputError(f"output_dir {output_dir} cannot be written ({error.strerror}); choose another "
                          "path or fix its permissions") from None
    if output_dir.parent.name == "derivatives" and PIPELINE_NAME not in output_dir.name:
        logger.warning("%s: BIDS expects derivatives/<name> to contain the pipeline name %r",
                       output_dir, PIPELINE_NAME)


# --------------------------------------------------------------------------- sidecars
def _common(sources: Iterable[str], spatial_reference: str, skull_stripped: bool | None) -> dict[str, Any]:
    # space-T1w is not a standard template, so BIDS requires SpatialReference (a BIDS URI of the T1w);
    # a standard template (space-MNI152NLin2009aSym) needs none, and "" leaves it out.
    sidecar: dict[str, Any] = {"Sources": list(sources)}
    if spatial_reference:
        sidecar["SpatialReference"] = spatial_reference
    if skull_stripped is not None:
        sidecar["SkullStripped"] = skull_stripped
    return sidecar


def tensor_sidecar(sources: Iterable[str], spatial_reference: str, input_modality: str, *,
                   skull_stripped: bool = True, model_parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sidecar of the 6-volume diffusivity tensor (mm^2/s, BEP016 order D11, D12, D13, D22, D23, D33).

    ``sources`` and ``spatial_reference`` are BIDS URIs (:func:`bids_uri`) of the inputs and the T1w.
    """
    return {
        **_common(sources, spatial_reference, skull_stripped),
        "Model": {
            "Description": f"Diffusion tensor predicted from {input_modality} MRI by a 3D conditional GAN "
                           f"({PIPELINE_NAME} {__version__}); volumes {', '.join(TENSOR_COMPONENT_ORDER)}",
            "URL": CODE_URL,
            "Parameters": {"InputModality": input_modality, **dict(model_parameters or {})},
        },
        "Units": "mm^2/s",
        "OrientationEncoding": {"Type": "tensor", "TensorRank": 2, "EncodingAxis": 3, "Reference": "xyz"},
    }


def scalar_sidecar(param: str, sources: Iterable[str], spatial_reference: str, *,
                   skull_stripped: bool = True) -> dict[str, Any]:
    """Sidecar of a scalar tensor map (``fa``, ``md``, ``ad``, ``rd``, ``inclination``, ``azimuth``)."""
    return {**_common(sources, spatial_reference, skull_stripped), "Units": SCALAR_UNITS[param],
            "Description": SCALAR_DESCRIPTIONS[param]}


def colour_fa_sidecar(sources: Iterable[str], spatial_reference: str, *,
                      skull_stripped: bool = True) -> dict[str, Any]:
    """Sidecar of the RGB colour-FA map: |V1| x FA, 3 volumes (x, y, z), non-negative."""
    return {**_common(sources, spatial_reference, skull_stripped), "Units": "arbitrary",
            "Description": "directionally encoded colour FA: |principal eigenvector| x FA",
            "OrientationEncoding": {"Type": "dec", "EncodingAxis": 3, "Reference": "xyz"}}


def segmentation_sidecar(sources: Iterable[str], spatial_reference: str, description: str,
                         mask_type: str | None = None) -> dict[str, Any]:
    """Sidecar of a probability map or mask (segmentations need no SkullStripped; masks a ``Type``)."""
    sidecar = {**_common(sources, spatial_reference, None), "Description": description}
    if mask_type:
        sidecar["Type"] = mask_type
    return sidecar


# --------------------------------------------------------------------------- images
def write_image(data: np.ndarray, affine: np.ndarray, path: Path, sidecar: Mapping[str, Any], *,
                dtype: Any = np.float32) -> Path:
    """Write the sidecar, then the image (both atomic); ``data`` is X x Y x Z[ x T], affine 4x4 in mm."""
    try:
        write_json(dict(sidecar), sidecar_path(path))
        return save_nifti(data, affine, path, dtype=dtype)
    except OSError as error:
        raise OutputError(f"cannot write {path} ({error.strerror}); check free space and permissions") from None


def write_tensor_outputs(paths: OutputPaths, maps: Mapping[str, np.ndarray], affine: np.ndarray,
                         sources: Sequence[str], spatial_reference: str, input_modality: str, *,
                         skull_stripped: bool = True, model_parameters: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the tensor and whichever derived maps are in ``maps``; return the written paths.

    ``sources``: BIDS URIs of the inputs; ``spatial_reference``: BIDS URI of the T1w defining space-T1w.

    ``maps`` keys: ``diffusivity`` (X, Y, Z, 6; mm^2/s), the scalar params (X, Y, Z) and ``colour_fa``
    (X, Y, Z, 3), ``gm``/``wm``/``csf`` (X, Y, Z; 0..1), ``brain_mask`` (X, Y, Z; 0/1).
    """
    unknown = set(maps) - {item.name for item in dataclasses.fields(OutputPaths)}
    if unknown:
        raise ValueError(f"unknown output maps: {sorted(unknown)}")
    written = []
    for name, data in maps.items():
        path = getattr(paths, name)
        dtype: Any = np.float32
        if name == "diffusivity":
            _check_volumes(data, 6, name)
            sidecar = tensor_sidecar(sources, spatial_reference, input_modality, skull_stripped=skull_stripped,
                                     model_parameters=model_parameters)
        elif name == "colour_fa":
            _check_volumes(data, 3, name)
            sidecar = colour_fa_sidecar(sources, spatial_reference, skull_stripped=skull_stripped)
        elif name in SCALAR_UNITS:
            sidecar = scalar_sidecar(name, sources, spatial_reference, skull_stripped=skull_stripped)
        elif name == "brain_mask":
            sidecar, dtype = segmentation_sidecar(sources, spatial_reference, "brain mask", "Brain"), np.uint8
        else:
            sidecar = segmentation_sidecar(sources, spatial_reference, f"{name.upper()} probability (0..1)")
        written.append(write_image(data, affine, path, sidecar, dtype=dtype))
    return written


def _check_volumes(data: np.ndarray, volumes: int, name: str) -> None:
    if np.ndim(data) != 4 or np.shape(data)[3] != volumes:
        raise ValueError(f"{name} must be X x Y x Z x {volumes}, got shape {np.shape(data)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


# --------------------------------------------------------------------------- evaluation outputs
ERROR_TABLE_PATTERN = "*_errors.tsv"
GROUP_ERRORS_NAME = "group_errors.tsv"
GROUP_SUMMARY_NAME = "group_summary.tsv"
GROUP_REPORT_NAME = "group_report.html"
FIGURES_FOLDER = "figures"


def evaluation_desc(modality: str, reference_session: str | None = None) -> str:
    """desc label of the error outputs: ``pcbssfperror`` (+ ``ref<ses>`` when the reference DWI has a session).

    ``modality`` is an ``--input-modality`` value or its desc label.
    """
    desc = MODALITY_DESC.get(modality, modality)
    if desc not in MODALITY_DESC.values():
        raise ValueError(f"unknown input modality {modality!r}")
    return f"{desc}error" + (f"ref{reference_session}" if reference_session else "")


def error_map_path(root: Path | str, subject: str, session: str | None, modality: str, param: str,
                   reference_session: str | None = None) -> Path:
    """Error map of one tensor parameter, next to the prediction it evaluates:
    ``sub-<s>/[ses-<i>/]dwi/..._space-T1w_desc-<modality>error[ref<r>]_model-tensor_param-<param>_dwimap.nii.gz``.

    ``session``: the prediction's (input) session; ``reference_session``: the reference DWI's session.
    """
    return bids_path(Path(root), "dwi", "dwimap", subject=subject, session=session, space=SPACE,
                     description=evaluation_desc(modality, reference_session), model="tensor", param=param)


def error_table_path(root: Path | str, subject: str, session: str | None, modality: str,
                     reference_session: str | None = None) -> Path:
    """Per-subject error statistics ``sub-<s>/[ses-<i>/]dwi/..._desc-<modality>error[ref<r>]_errors.tsv``
    (its JSON sidecar: :func:`sidecar_path` of the same name)."""
    return bids_path(Path(root), "dwi", "errors", ".tsv", subject=subject, session=session, space=SPACE,
                     description=evaluation_desc(modality, reference_session))


def error_table_sidecar_path(table: Path) -> Path:
    """``x_errors.tsv`` -> ``x_errors.json``."""
    return Path(table).with_suffix(".json")


def find_error_tables(output_dir: Path | str, subject: str) -> tuple[Path, ...]:
    """Error TSVs the participant level wrote for one subject (sorted)."""
    return tuple(sorted((Path(output_dir) / f"sub-{subject}").rglob(ERROR_TABLE_PATTERN)))


def participant_report_path(output_dir: Path | str, subject: str) -> Path:
    """``output_dir/sub-<s>.html`` (fMRIPrep's place for the subject report)."""
    return Path(output_dir) / f"sub-{subject}.html"


def participant_figure_path(output_dir: Path | str, subject: str, session: str | None, modality: str,
                            reference_session: str | None, figure: str) -> Path:
    """``output_dir/sub-<s>/figures/sub-<s>[_ses-<i>]_desc-<modality>error[ref<r>]_<figure>.png`` (``figure``
    alphanumeric, e.g. ``D11``, ``errormaps``): fMRIPrep's place, so one subject's folder is self-contained.
    ``.bidsignore`` lists ``sub-*/figures/**`` for the BIDS validator 3.x."""
    name = bids_filename(figure, ".png", subject=subject, session=session,
                         description=evaluation_desc(modality, reference_session))
    return Path(output_dir) / f"sub-{subject}" / FIGURES_FOLDER / name


def group_errors_path(output_dir: Path | str) -> Path:
    """Long-format table of every participant's error statistics: ``group/group_errors.tsv``."""
    return group_dir(Path(output_dir)) / GROUP_ERRORS_NAME


def group_summary_path(output_dir: Path | str) -> Path:
    """Summary over subjects per modality, tissue and metric: ``group/group_summary.tsv``."""
    return group_dir(Path(output_dir)) / GROUP_SUMMARY_NAME


def group_report_path(output_dir: Path | str) -> Path:
    """``group/group_report.html``."""
    return group_dir(Path(output_dir)) / GROUP_REPORT_NAME


def group_figure_path(output_dir: Path | str, figure: str) -> Path:
    """``group/figures/<figure>.png`` (``figure`` alphanumeric or with ``-``/``_``)."""
    if not figure.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"figure name {figure!r} must be alphanumeric")
    return group_dir(Path(output_dir)) / FIGURES_FOLDER / f"{figure}.png"
