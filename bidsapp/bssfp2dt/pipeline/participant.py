"""The participant level: preprocess, predict the tensor, compute its maps, write derivatives, evaluate.

Per subject (a failing subject does not stop the others unless ``--stop-on-first-crash``) and per
session that has the model's input modality:

1. preprocessing through the cached nipype workflow (a rerun with the same work dir executes nothing);
2. network input on the common grid: ``pc-bssfp`` 24 normalised interleaved channels, ``bssfp`` the
   first cycle x 12, ``t1w`` 6 replicated channels, ``dwi-tensor`` the normalised DWI tensor;
3. sliding-window prediction (patch edge from ``--patch-size``, overlap 0.5, Gaussian blending);
4. denormalisation to mm^2/s, zero outside the brain mask, FA/MD/AD/RD/colour-FA/angles;
5. every file of the naming table with sidecars naming the model (id, version, sha256);
6. when the subject has a reference tensor (any DWI session): the evaluation of every
   (input session, DWI session) pair on the same grid;
7. for every subject, with or without DWI: QC figures, the report ``sub-<label>.html``
   (:mod:`bssfp2dt.pipeline.reporting`); after all subjects, ``logs/CITATION.md``.

The model is loaded once, before any subject, so a missing or damaged checkpoint is one exit-66 line.
Each failed subject leaves a crash file in ``sub-<label>/log/<run_uuid>/``; once every subject has run,
:func:`bssfp2dt.pipeline.outcome.exit_status` decides the exit: 0 when all succeeded, the failures' own
one-line error (exit 66 for a data error) when they are all user errors, else 1.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import Bssfp2dtError, MissingInputError, UsageError
from bssfp2dt.training.recipes import RECIPES

if TYPE_CHECKING:
    from bssfp2dt.models.checkpoint import CheckpointMetadata

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.5  # fraction of the patch edge shared by neighbouring patches
#: Patch edge (voxels) for checkpoints that do not record their training patch: they predate the recipes, so the
#: reference method's.
DEFAULT_PATCH_SIZE = RECIPES["reference"].patch_size
PROBE_EDGE = 16  # voxels: edge of the patch whose forward pass sizes the sliding-window batch
LOG_NAME = "participant.log"
#: Stems (name before the first dot) of the dataset-level files: dataset_description.json, README.md, .bidsignore.
DATASET_FILE_STEMS = ("dataset_description", "README", "")
MODEL_URL = "https://github.com/bssfp2dt/bssfp2dt"


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready for inference.

    ``modality``: the input modality the generator is fed; ``normalization``: a
    :class:`~bssfp2dt.preprocessing.normalization.Normalization`; ``metadata``: the checkpoint's
    :class:`~bssfp2dt.models.checkpoint.CheckpointMetadata`.
    """

    generator: Any
    modality: str
    normalization: Any
    id: str
    version: str
    sha256: str
    path: Path
    metadata: CheckpointMetadata

    def description(self) -> dict[str, Any]:
        """The ``Model`` object of the prediction sidecars."""
        return {"Description": f"bssfp2dt generator {self.id} (version {self.version}), "
                               f"{self.metadata.size_name} size, stage {self.metadata.stage}, "
                               f"fed with {self.modality}",
                "URL": MODEL_URL,
                "Parameters": self.parameters()}

    def parameters(self) -> dict[str, Any]:
        """Identity of the checkpoint (recorded in the tensor's ``Model.Parameters``)."""
        return {"ModelId": self.id, "ModelVersion": self.version, "ModelSha256": self.sha256,
                "TrainingStage": self.metadata.stage, "GeneratorSize": self.metadata.size_name}


# --------------------------------------------------------------------------- entry point
def check_participant(plan) -> dict[str, Any]:
    """Resolve the device, load the model and prepare the template spaces: the checks that must pass before
    anything is written. Returns the keyword arguments of :func:`run_participant` (``device``, ``model``);
    nothing for ``--reports-only``, which needs neither.
    """
    from bssfp2dt.inference.device import configure_cpu_threads, resolve_device
    from bssfp2dt.preprocessing.workflow import settings_from_config
    from bssfp2dt.spaces.normalize import prepare_templates

    config = plan.config
    if config.run.reports_only:
        return {}
    settings_from_config(config)  # a tool the options ask for but the PATH lacks (dwidenoise, mrdegibbs): exit 64
    configure_cpu_threads(config.resources.omp_nthreads)
    device = resolve_device(config.resources.device)
    model = load_model(config.selection.input_modality, config.model.model, device)
    inference_patch_size(config, model)  # a patch the model cannot take stops the run before anything is written
    prepare_templates(config)  # --output-spaces: a template missing offline stops here, before any subject
    return {"device": device, "model": model}


def run_participant(plan, device=None, model: LoadedModel | None = None) -> int:
    """Process every subject of ``plan`` (:class:`bssfp2dt.pipeline.plan.RunPlan`); 0 when all succeeded.

    ``device`` and ``model`` come from :func:`check_participant` (run here when not given).
    """
    from bssfp2dt.io.derivatives import initialise_dataset
    from bssfp2dt.pipeline import reporting
    from bssfp2dt.pipeline.completion import mark_complete, mark_started
    from bssfp2dt.pipeline.outcome import exit_status

    config = plan.config
    if config.run.reports_only:  # rebuild sub-<label>.html and logs/CITATION.md from the output folder alone
        return reporting.rebuild_reports(config, [subject.subject for subject in plan.subjects])
    if model is None or device is None:
        prepared = check_participant(plan)
        device, model = prepared["device"], prepared["model"]
    if not (config.paths.output_dir / "dataset_description.json").is_file():
        initialise_dataset(config.paths.output_dir, config.paths.bids_dir)
    succeeded, failed, errors = [], [], {}
    for subject_inputs in plan.subjects:
        label = subject_inputs.subject
        started = time.perf_counter()
        try:
            mark_started(config.paths.output_dir, label, config.run.run_uuid)
            with SubjectLog(config, label):
                written = process_subject(plan, subject_inputs, model, device)
            mark_complete(config.paths.output_dir, label, config.run.run_uuid, written)
        except Exception as error:  # noqa: BLE001 - one subject's failure must not lose the others
            failed.append(label)
            errors[label] = error
            _mark_failed(config, label, error)
            crash = write_crash_file(config, label, error)
            reporting.report_failed_subject(config, label)
            logger.error("sub-%s failed after %.1f s: %s (crash file %s)", label, time.perf_counter() - started,
                         getattr(error, "message", None) or f"{type(error).__name__}: {error}", crash)
            if config.run.stop_on_first_crash:
                logger.error("--stop-on-first-crash: not processing the remaining subjects")
                break
        else:
            succeeded.append(label)
            logger.info("sub-%s finished in %.1f s", label, time.perf_counter() - started)
    reporting._guarded("logs/CITATION.md", reporting.write_citation, config)
    not_run = [s.subject for s in plan.subjects if s.subject not in succeeded and s.subject not in failed]
    logger.info("participant level: %d subject(s) succeeded%s, %d failed%s%s", len(succeeded),
                f" ({', '.join(succeeded)})" if succeeded else "", len(failed),
                f" ({', '.join(failed)})" if failed else "",
                f", {len(not_run)} not run ({', '.join(not_run)})" if not_run else "")
    return exit_status(errors)


def _mark_failed(config, label: str, error: BaseException) -> None:
    from bssfp2dt.pipeline.completion import mark_failed

    try:
        mark_failed(config.paths.output_dir, label, config.run.run_uuid,
                    getattr(error, "message", None) or f"{type(error).__name__}: {error}")
    except OSError:  # the crash file and the log report the failure; the status stays "incomplete"
        pass


def load_model(modality: str, model_path: Path | None, device) -> LoadedModel:
    """Resolve (:func:`bssfp2dt.models.registry.resolve_model`), verify and load the generator for ``modality``.

    MissingInputError (exit 66) when the checkpoint is absent, damaged, has the wrong sha256, lacks a
    head or normalisation for ``modality``.
    """
    from bssfp2dt.models.checkpoint import load_release_checkpoint, sha256_file
    from bssfp2dt.models.registry import load_registry, resolve_model
    from bssfp2dt.preprocessing.normalization import Normalization

    path, expected, model_id = resolve_model(modality, model_path)
    started = time.perf_counter()
    generator, metadata = load_release_checkpoint(path, expected, map_location=device)
    if modality not in generator.heads:
        raise MissingInputError(f"model checkpoint {path} has no input head for {modality} (it was trained for "
                                f"{', '.join(generator.modalities)}); give a {modality} model with --model or "
                                f"choose that --input-modality")
    try:
        normalization = Normalization.from_dict(metadata.normalization)
        _require_normalization(normalization, modality)
    except UsageError as error:
        raise MissingInputError(f"model checkpoint {path}: {error.message}; re-export the checkpoint") from None
    registered = next((entry for entry in load_registry().values() if entry.id == model_id), None)
    version = registered.version if registered is not None else str(metadata.version)
    model = LoadedModel(generator=generator, modality=modality, normalization=normalization, id=model_id,
                        version=version, sha256=expected or sha256_file(path), path=path, metadata=metadata)
    logger.info("model %s (version %s, sha256 %s..., %s size, stage %s) loaded from %s in %.1f s", model.id,
                model.version, model.sha256[:12], metadata.size_name, metadata.stage,
                path, time.perf_counter() - started)
    return model


def _require_normalization(normalization, modality: str) -> None:
    for group in modalities.get(modality).groups + modalities.TENSOR_GROUPS:
        normalization.require(group)


# --------------------------------------------------------------------------- one subject
def process_subject(plan, subject_inputs, model: LoadedModel, device) -> list[Path]:
    """Preprocess, predict, write and evaluate one subject; return the written prediction images."""
    from bssfp2dt.io.content_checks import check_registered_bssfp
    from bssfp2dt.preprocessing.workflow import run_preprocessing
    from bssfp2dt.spaces.normalize import write_template_outputs

    config = plan.config
    label = subject_inputs.subject
    remove_interrupted_writes(config.paths.output_dir, label)
    started = time.perf_counter()
    preprocessed = run_preprocessing(plan, subject_inputs)
    logger.info("sub-%s: preprocessing done in %.1f s", label, time.perf_counter() - started)
    raw_sessions = {session.session: session for session in subject_inputs.sessions}
    predictions: dict[str | None, tuple[np.ndarray, Path]] = {}
    template_steps: dict[str | None, list] = {}
    written: list[Path] = []
    for session in preprocessed.sessions:
        if not _has_input(session, model.modality):
            logger.info("sub-%s ses-%s: no %s input, nothing to predict", label, session.session, model.modality)
            continue
        if modalities.get(model.modality).reads_bssfp:
            check_registered_bssfp(session, raw_sessions[session.session].bssfp)
        tensor, files = predict_session(config, session, raw_sessions[session.session], model, device)
        predictions[session.session] = (tensor, files.diffusivity)
        written.extend(files.all())
        template_steps[session.session] = write_template_outputs(config, session, raw_sessions[session.session],
                                                                 tensor, model)  # --output-spaces
    if not predictions:
        raise MissingInputError(f"sub-{label}: no session has a preprocessed {model.modality} input; check the "
                                "inputs with --dry-run")
    evaluate_subject(config, preprocessed, raw_sessions, predictions, model)
    from bssfp2dt.pipeline.reporting import report_subject

    report_subject(plan, subject_inputs, preprocessed, model, template_steps)  # every subject, with or without DWI
    return written


def remove_interrupted_writes(output_dir: Path, label: str) -> list[Path]:
    """Delete the temporary files a killed earlier run left for this subject (or the dataset files).

    Looks in ``sub-<label>/`` (recursively), ``figures/`` and ``output_dir`` itself; only names of this
    subject (``sub-<label>_*``, ``sub-<label>.html``) and of the dataset-level files are touched, and
    never a file a live process is writing (see :func:`bssfp2dt.io.atomic.remove_stale_temporaries`).
    """
    from bssfp2dt.io.atomic import remove_stale_temporaries

    output_dir = Path(output_dir)
    prefix = f"sub-{label}"

    def owned(stem: str) -> bool:
        return stem == prefix or stem.startswith(prefix + "_") or stem in DATASET_FILE_STEMS

    removed = (remove_stale_temporaries(output_dir / prefix, owned)
               + remove_stale_temporaries(output_dir / "figures", owned, recursive=False)
               + remove_stale_temporaries(output_dir, owned, recursive=False))
    if removed:
        logger.info("sub-%s: removed %d unfinished file(s) of an interrupted run: %s", label, len(removed),
                    ", ".join(path.name for path in removed))
    return removed


def _has_input(session, modality: str) -> bool:
    return getattr(session, modalities.get(modality).source) is not None


def network_input(session, modality: str, normalization, mask: np.ndarray) -> np.ndarray:
    """The generator's input (C, X, Y, Z) float32 from a preprocessed session, zero outside ``mask``
    (:func:`bssfp2dt.preprocessing.network_input.network_channels`, which training uses too)."""
    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.preprocessing.network_input import network_channels

    return network_channels(load_nifti(modality_image(session, modality))[0], modality, normalization, mask)


def modality_image(session, modality: str) -> Path:
    """The preprocessed image of ``session`` that feeds ``modality``; UsageError for an unknown modality."""
    if modality not in modalities.BY_NAME:
        raise UsageError(f"--input-modality {modality!r} has no network input")
    return getattr(session, modalities.BY_NAME[modality].source)


def predict_tensor(config, session, model: LoadedModel, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict one session's tensor: returns ``(tensor (X, Y, Z, 6) mm^2/s float64, mask (X, Y, Z) bool, affine)``.

    The tensor is zero outside the brain mask. The sliding-window batch is ``--batch-size`` bounded by the
    memory left (:func:`bssfp2dt.inference.predict.choose_batch_size`); a CUDA out-of-memory error retries
    with half the batch, then runs on the CPU (:func:`bssfp2dt.inference.predict.predict_with_oom_fallback`).
    """
    import torch

    from bssfp2dt.inference.predict import choose_batch_size, predict_auto, predict_with_oom_fallback
    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.preprocessing.normalization import denormalize_tensor

    mask_data, affine = load_nifti(session.brain_mask)
    mask = np.asarray(mask_data) > 0
    patch_size = inference_patch_size(config, model)
    volume = network_input(session, model.modality, model.normalization, mask)
    generator = model.generator
    out_channels = model.metadata.output_channels
    multiple = model.metadata.patch_multiple
    probe_size = min(-(-PROBE_EDGE // multiple) * multiple, patch_size)  # small, yet a multiple the network takes

    def predictor_on(target: torch.device):
        generator.to(target)  # no-op unless a CUDA out-of-memory error moved the prediction to the CPU
        return lambda patches: generator(patches, model.modality)

    def batch_on(target: torch.device) -> int:
        return choose_batch_size(predictor_on(target), volume.shape, out_channels, requested=config.model.batch_size,
                                 patch_size=patch_size, probe_size=probe_size, mem_mb=config.resources.mem_mb,
                                 device=target)

    def run(batch_size: int, target: torch.device) -> np.ndarray:
        return predict_auto(predictor_on(target), volume, network=generator, multiple=multiple, probe_size=probe_size,
                            mem_mb=config.resources.mem_mb, patch_size=patch_size, overlap=DEFAULT_OVERLAP,
                            batch_size=batch_size, device=target, mask=mask, out_channels=out_channels,
                            progress=config.run.verbosity >= 1)

    normalised = predict_with_oom_fallback(run, batch_on(device), device,
                                           cpu_batch_size=lambda: batch_on(torch.device("cpu")))
    tensor = denormalize_tensor(np.moveaxis(normalised, 0, -1), model.normalization, mask)
    return tensor, mask, affine


def inference_patch_size(config, model: LoadedModel) -> int:
    """Sliding-window patch edge (voxels): ``--patch-size``, else the patch the model was trained on (part of
    its contract: a network sees the context it learned with), else 64; UsageError (exit 64) when the
    model cannot take it."""
    multiple = model.metadata.patch_multiple
    patch_size = int(config.model.patch_size or model.metadata.patch_size or DEFAULT_PATCH_SIZE)
    if patch_size % multiple:
        raise UsageError(f"--patch-size {patch_size} is not a multiple of {multiple}, which this model needs; "
                         f"use e.g. {max(multiple, patch_size // multiple * multiple)}")
    return patch_size


def predict_session(config, session, raw_session, model: LoadedModel, device):
    """Predict one session and write every file of the naming table; return ``(tensor, OutputPaths)``."""
    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.io import derivatives
    from bssfp2dt.io.nifti import load_nifti

    where = f"sub-{session.subject}" + (f" ses-{session.session}" if session.session else "")
    started = time.perf_counter()
    tensor, mask, affine = predict_tensor(config, session, model, device)
    logger.info("%s: prediction (%d brain voxels) in %.1f s", where, int(mask.sum()), time.perf_counter() - started)
    started = time.perf_counter()
    maps = tensor_maps(tensor, mask, dtype=np.float32)
    logger.info("%s: tensor maps in %.1f s", where, time.perf_counter() - started)
    started = time.perf_counter()
    bids_dir = config.paths.bids_dir
    paths = derivatives.tensor_map_paths(session.subject, session.session, model.modality, config.paths.output_dir)
    spatial_reference = derivatives.bids_uri(raw_session.t1w.image, bids_dir)
    sources = _sources(raw_session, model.modality, bids_dir)
    model_object = model.description()
    images = {"diffusivity": (tensor, derivatives.tensor_sidecar(
        sources, spatial_reference, model.modality, model_parameters=model.parameters()))}
    for param in derivatives.SCALAR_UNITS:
        images[param] = (maps[param], {**derivatives.scalar_sidecar(param, sources, spatial_reference),
                                       "Model": model_object})
    images["colour_fa"] = (maps["rgb"], {**derivatives.colour_fa_sidecar(sources, spatial_reference),
                                         "Model": model_object})
    for name, (data, sidecar) in images.items():
        derivatives.write_image(data, affine, getattr(paths, name), sidecar)
    tissues = {name: load_nifti(getattr(session, name))[0] for name in ("gm", "wm", "csf")}
    tissue_sources = [spatial_reference]
    derivatives.write_tensor_outputs(paths, {**tissues, "brain_mask": mask.astype(np.uint8)}, affine,
                                     tissue_sources, spatial_reference, model.modality)
    logger.info("%s: wrote %d images in %.1f s", where, len(paths.all()), time.perf_counter() - started)
    return tensor, paths


def _sources(raw_session, modality: str, bids_dir: Path) -> list[str]:
    """BIDS URIs of the raw inputs a prediction is computed from (the T1w defines the grid and mask)."""
    from bssfp2dt.io.derivatives import bids_uri

    files = [raw_session.t1w.image]
    spec = modalities.get(modality)
    if spec.reads_bssfp and raw_session.bssfp is not None:
        files += [raw_session.bssfp.magnitude, raw_session.bssfp.phase]
    if spec.needs_dwi and raw_session.dwi is not None:
        files += [raw_session.dwi.image, raw_session.dwi.bval, raw_session.dwi.bvec]
    uris = []
    for path in files:
        try:
            uris.append(bids_uri(path, bids_dir))
        except ValueError:  # an input outside bids_dir (a --derivatives file) has no raw URI
            continue
    return uris


# --------------------------------------------------------------------------- evaluation
def evaluate_subject(config, preprocessed, raw_sessions, predictions, model: LoadedModel) -> None:
    """Evaluate every (input session, DWI session) pair on the same grid against the DWI tensor."""
    import nibabel as nib

    from bssfp2dt.evaluation.report import evaluate_participant
    from bssfp2dt.evaluation.statistics import EvaluationEntities
    from bssfp2dt.io import derivatives
    from bssfp2dt.io.content_checks import reference_overlaps

    references = [session for session in preprocessed.sessions if session.tensor is not None
                  and reference_overlaps(session.tensor, session.brain_mask, preprocessed.subject, session.session)]
    if not references:
        logger.info("sub-%s: no DWI session, so no evaluation", preprocessed.subject)
        return
    output_dir = config.paths.output_dir
    for input_label, (tensor, tensor_path) in predictions.items():
        session = preprocessed.session(input_label)
        grid = nib.load(str(session.brain_mask))
        for reference in references:
            reference_image = nib.load(str(reference.tensor))
            if reference_image.shape[:3] != grid.shape[:3] or not np.allclose(reference_image.affine, grid.affine,
                                                                                atol=1e-4):
                logger.warning("sub-%s: DWI ses-%s is on another T1w grid than ses-%s; pair not evaluated",
                               preprocessed.subject, reference.session, input_label)
                continue
            started = time.perf_counter()
            raw_reference = raw_sessions[reference.session].dwi
            sources = [f"bids::{tensor_path.relative_to(output_dir).as_posix()}"]
            if raw_reference is not None:
                try:
                    sources.append(derivatives.bids_uri(raw_reference.image, config.paths.bids_dir))
                except ValueError:
                    pass
            entities = EvaluationEntities(subject=preprocessed.subject, input_session=input_label,
                                          dwi_session=reference.session, modality=model.modality)
            evaluate_participant(tensor, reference.tensor, {"gm": session.gm, "wm": session.wm, "csf": session.csf},
                                 session.brain_mask, grid.affine, entities, output_dir,
                                 normalization=model.normalization, sources=sources)
            logger.info("sub-%s: evaluation of ses-%s against DWI ses-%s in %.1f s", preprocessed.subject,
                        input_label, reference.session, time.perf_counter() - started)


# --------------------------------------------------------------------------- logs and crashes
class SubjectLog:
    """Context manager: copy the package's log records to ``sub-<label>/log/<run_uuid>/participant.log``."""

    def __init__(self, config, label: str):
        from bssfp2dt.messages import LOG_DATE_FORMAT, LOG_FORMAT
        from bssfp2dt.io.derivatives import subject_log_dir

        folder = subject_log_dir(config.paths.output_dir, label, config.run.run_uuid)
        folder.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(folder / LOG_NAME, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATE_FORMAT))
        self.handler.setLevel(logging.DEBUG if config.run.verbosity >= 1 else logging.INFO)

    def __enter__(self):
        logging.getLogger("bssfp2dt").addHandler(self.handler)
        return self

    def __exit__(self, *exc_info):
        logging.getLogger("bssfp2dt").removeHandler(self.handler)
        self.handler.close()
        return False


def write_crash_file(config, label: str, error: BaseException) -> Path:
    """Write the error and its traceback to ``sub-<label>/log/<run_uuid>/crash-<time>-participant.txt``."""
    from bssfp2dt.io.derivatives import subject_log_dir
    from bssfp2dt.io.atomic import write_text

    folder = subject_log_dir(config.paths.output_dir, label, config.run.run_uuid)
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-sub-{label}-participant.txt"
    summary = error.message if isinstance(error, Bssfp2dtError) else f"{type(error).__name__}: {error}"
    text = (f"sub-{label} failed at the participant level\n{summary}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    try:
        return write_text(text, path)
    except OSError as write_error:
        logger.error("cannot write the crash file %s (%s)", path, write_error.strerror)
        return path
