"""The cached, resumable per-subject preprocessing workflow (nipype) and its entry point.

One nipype workflow per subject, ``base_dir`` = the run's work directory. Nodes are Function nodes
wrapping the steps of :mod:`bssfp2dt.preprocessing.steps`; each writes its files into its own node
folder ``<work_dir>/preproc_sub_<label>/<node>/``. The T1w nodes exist once per distinct T1w image
(usually one per subject, shared by all sessions); bSSFP, DWI and summary nodes once per session.

Caching: nipype reruns a node only when the hash of its inputs changes. Inputs that are paths of
existing files are hashed with ``hash_method = "content"`` (md5 of the file), not ``"timestamp"``
(size + mtime): raw datasets are often copied or re-bound into containers, which changes mtimes but
not content, and a rerun upstream node that writes identical bytes then does not invalidate its
children. Settings are plain dicts, hashed by value. A rerun with the same work directory therefore
executes no finished node again; a crash resumes from the failed node. Crash files go to
``output_dir/sub-<label>/log/<run-uuid>/`` (nipype's ``crashdump_dir``).

The session types it returns live in :mod:`bssfp2dt.preprocessing.sessions`, the ``--write-preproc``
writer in :mod:`bssfp2dt.preprocessing.derivatives`.

Execution: ``MultiProc`` with ``n_procs = --nprocs`` (``Linear`` when 1). nipype's own loggers stay
at WARNING unless ``-v``; one INFO line per step (with its run time, or "cached") is logged here.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np

from bssfp2dt import modalities
from bssfp2dt.errors import MissingInputError
from bssfp2dt.preprocessing.derivatives import write_preprocessed
from bssfp2dt.preprocessing.node_errors import is_dwi_node, node_failures, node_label, preprocessing_error
from bssfp2dt.preprocessing.sessions import PreprocessedSubject, read_summary
from bssfp2dt.preprocessing.steps import PreprocSettings, check_settings

logger = logging.getLogger(__name__)

HASH_METHOD = "content"
NIPYPE_LOGGERS = ("nipype.workflow", "nipype.interface", "nipype.utils")


# --------------------------------------------------------------------------- node functions
# nipype runs Function nodes from their source text, so each imports what it needs itself.
def _t1w_mask_node(t1w, prior_mask):
    from bssfp2dt.preprocessing.steps import t1w_mask
    return t1w_mask(t1w, prior_mask)


def _t1w_grid_node(t1w, mask, voxel_mm):
    from bssfp2dt.preprocessing.steps import t1w_to_grid
    return t1w_to_grid(t1w, mask, voxel_mm)


def _tissue_node(t1w_grid, mask_grid, gm, wm, csf):
    from bssfp2dt.preprocessing.steps import tissue_maps
    return tissue_maps(t1w_grid, mask_grid, gm, wm, csf)


def _bssfp_prepare_node(magnitude, phase, phase_units, settings, cycle_order):
    from bssfp2dt.preprocessing.steps import prepare_bssfp
    return prepare_bssfp(magnitude, phase, phase_units, settings, cycle_order=cycle_order)


def _register_node(t1w, moving, settings, what):
    from bssfp2dt.preprocessing.steps import register_to_t1w
    return register_to_t1w(t1w, moving, settings, what)


def _bssfp_grid_node(complex_path, transform_json, t1w_grid, mask_grid, settings):
    from bssfp2dt.preprocessing.steps import bssfp_to_grid
    return bssfp_to_grid(complex_path, transform_json, t1w_grid, mask_grid, settings)


def _dwi_prepare_node(dwi, bval, bvec, settings, reverse_pe_b0=None):
    from bssfp2dt.preprocessing.steps import preprocess_dwi
    return preprocess_dwi(dwi, bval, bvec, settings, reverse_pe_b0=reverse_pe_b0)


def _tensor_fit_node(dwi, bval, bvec, mask):
    from bssfp2dt.preprocessing.steps import fit_dwi_tensor
    return fit_dwi_tensor(dwi, bval, bvec, mask)


def _tensor_grid_node(tensor, transform_json, t1w_grid, mask_grid):
    from bssfp2dt.preprocessing.steps import tensor_to_grid
    return tensor_to_grid(tensor, transform_json, t1w_grid, mask_grid)


def _collect_node(subject, session, t1w_session, t1w, brain_mask, gm, wm, csf, bssfp, tensor, provenance, inputs):
    from bssfp2dt.preprocessing.steps import collect_session
    outputs = {"t1w": t1w, "brain_mask": brain_mask, "gm": gm, "wm": wm, "csf": csf, "bssfp": bssfp,
               "tensor": tensor, "t1w_session": t1w_session}
    return collect_session(subject, session, outputs, provenance, inputs)


# --------------------------------------------------------------------------- building
def _function_node(function, inputs: dict[str, Any], outputs: Sequence[str], name: str, mem_gb: float = 0.5):
    from nipype.interfaces.utility import Function
    from nipype.pipeline.engine import Node

    node = Node(Function(input_names=list(inputs), output_names=list(outputs), function=function), name=name,
                mem_gb=mem_gb)
    for key, value in inputs.items():
        if value is not _CONNECTED:
            setattr(node.inputs, key, value)
    return node


_CONNECTED = object()  # marks an input that an edge fills


def memory_estimate_gb(image: str | Path, bytes_per_value: int, copies: float) -> float:
    """A node's memory estimate for nipype's MultiProc scheduler (``--mem``): ``copies`` arrays of the image's
    voxels x volumes at ``bytes_per_value`` (from the header, nothing read), plus 0.5 GB of interpreter and
    libraries."""
    values = float(np.prod(nib.load(str(image)).shape))
    return round(0.5 + values * bytes_per_value * copies / 2 ** 30, 2)


def workflow_name(subject: str) -> str:
    """Folder of the subject's workflow under the work directory."""
    return f"preproc_sub_{node_label(subject)}"


def build_workflow(subject_inputs, settings: PreprocSettings, work_dir: Path, crash_dir: Path,
                   stop_on_first_crash: bool = False):
    """The nipype workflow of one subject (not run).

    Args:
        subject_inputs: :class:`bssfp2dt.io.bids.SubjectInputs`.
        settings: preprocessing choices.
        work_dir: the cache folder (``base_dir``).
        crash_dir: where nipype writes crash files.
    Returns:
        ``(workflow, collect)``: the workflow and ``{session label: summary node name}``.
    """
    from nipype.interfaces.utility import Merge
    from nipype.pipeline.engine import Node, Workflow

    check_settings(settings)
    options = settings.node_options()
    workflow = Workflow(name=workflow_name(subject_inputs.subject), base_dir=str(work_dir))
    workflow.config["execution"] = {"crashdump_dir": str(crash_dir), "hash_method": HASH_METHOD,
                                    "stop_on_first_crash": str(stop_on_first_crash).lower(),
                                    "crashfile_format": "txt", "remove_unnecessary_outputs": "false",
                                    "create_report": "false"}
    t1w_nodes: dict[Path, tuple[Any, Any]] = {}
    collect: dict[str | None, str] = {}
    for session in subject_inputs.sessions:
        if session.t1w is None:
            logger.warning("sub-%s ses-%s has no T1w: not preprocessed", session.subject, session.session)
            continue
        t1w_path = Path(session.t1w.image)
        if t1w_path not in t1w_nodes:
            t1w_nodes[t1w_path] = _t1w_branch(workflow, session, len(t1w_nodes), settings.voxel_mm)
        grid, tissue = t1w_nodes[t1w_path]
        tag = node_label(session.session)
        merge = Node(Merge(3), name=f"provenance_ses{tag}")
        workflow.connect(grid, "provenance", merge, "in1")
        workflow.connect(tissue, "provenance", merge, "in2")
        collector = _function_node(_collect_node, {
            "subject": session.subject, "session": session.session, "t1w_session": session.t1w.session,
            "t1w": _CONNECTED, "brain_mask": _CONNECTED, "gm": _CONNECTED, "wm": _CONNECTED, "csf": _CONNECTED,
            "bssfp": None, "tensor": None, "provenance": _CONNECTED, "inputs": _raw_inputs(session)},
            ["summary"], f"collect_ses{tag}")
        workflow.connect([(grid, collector, [("t1w_grid", "t1w"), ("mask_grid", "brain_mask")]),
                          (tissue, collector, [("gm", "gm"), ("wm", "wm"), ("csf", "csf")]),
                          (merge, collector, [("out", "provenance")])])
        extra = []
        if session.bssfp is not None:
            extra.append(_bssfp_branch(workflow, session, tag, options, grid, collector))
        if session.dwi is not None:
            extra.append(_dwi_branch(workflow, session, tag, options, grid, collector))
        if extra:
            more = Node(Merge(len(extra) * 3), name=f"provenance_steps_ses{tag}")
            for index, (node, field) in enumerate(step for branch in extra for step in branch):
                workflow.connect(node, field, more, f"in{index + 1}")
            workflow.connect(more, "out", merge, "in3")
        else:
            merge.inputs.in3 = []
        collect[session.session] = collector.name
    if not collect:
        raise MissingInputError(f"sub-{subject_inputs.subject} has no session with a T1w; add one")
    return workflow, collect


def _raw_inputs(session) -> list[str]:
    """The session's raw input files, T1w first (it is the outputs' spatial reference)."""
    files = [session.t1w.image]
    if session.bssfp is not None:
        files += [session.bssfp.magnitude, session.bssfp.phase]
    if session.dwi is not None:
        files += [session.dwi.image, session.dwi.bval, session.dwi.bvec]
    return [str(path) for path in files]


def _t1w_branch(workflow, session, index: int, voxel_mm: float):
    priors = session.priors
    mask = _function_node(_t1w_mask_node, {"t1w": str(session.t1w.image),
                                           "prior_mask": str(priors.brain_mask) if priors.brain_mask else None},
                          ["mask", "provenance"], f"t1w_mask_{index}")
    grid = _function_node(_t1w_grid_node, {"t1w": str(session.t1w.image), "mask": _CONNECTED, "voxel_mm": voxel_mm},
                          ["t1w_grid", "mask_grid", "provenance"], f"t1w_grid_{index}")
    tissue = _function_node(_tissue_node, {"t1w_grid": _CONNECTED, "mask_grid": _CONNECTED,
                                           **{name: str(getattr(priors, name)) if getattr(priors, name) else None
                                              for name in ("gm", "wm", "csf")}},
                            ["gm", "wm", "csf", "provenance"], f"tissue_{index}")
    workflow.connect([(mask, grid, [("mask", "mask")]),
                      (grid, tissue, [("t1w_grid", "t1w_grid"), ("mask_grid", "mask_grid")])])
    return grid, tissue


def _bssfp_branch(workflow, session, tag: str, options: dict, grid, collector):
    from bssfp2dt.preprocessing.bssfp import cycle_order

    bssfp = session.bssfp
    prepare = _function_node(_bssfp_prepare_node, {"magnitude": str(bssfp.magnitude), "phase": str(bssfp.phase),
                                                   "phase_units": bssfp.phase_units, "settings": options,
                                                   "cycle_order": list(cycle_order(bssfp.phase_increments_deg))},
                             ["complex_path", "reference", "provenance"], f"bssfp_prepare_ses{tag}",
                             mem_gb=memory_estimate_gb(bssfp.magnitude, 16, 6))  # complex128 and its copies
    register = _function_node(_register_node, {"t1w": str(session.t1w.image), "moving": _CONNECTED,
                                               "settings": options, "what": "bssfp"},
                              ["transform", "provenance"], f"bssfp_register_ses{tag}")
    to_grid = _function_node(_bssfp_grid_node, {"complex_path": _CONNECTED, "transform_json": _CONNECTED,
                                                "t1w_grid": _CONNECTED, "mask_grid": _CONNECTED, "settings": options},
                             ["channels", "provenance"], f"bssfp_grid_ses{tag}")
    workflow.connect([(prepare, register, [("reference", "moving")]),
                      (prepare, to_grid, [("complex_path", "complex_path")]),
                      (register, to_grid, [("transform", "transform_json")]),
                      (grid, to_grid, [("t1w_grid", "t1w_grid"), ("mask_grid", "mask_grid")]),
                      (to_grid, collector, [("channels", "bssfp")])])
    return [(prepare, "provenance"), (register, "provenance"), (to_grid, "provenance")]


def _dwi_branch(workflow, session, tag: str, options: dict, grid, collector):
    dwi = session.dwi
    prepare = _function_node(_dwi_prepare_node, {"dwi": str(dwi.image), "bval": str(dwi.bval), "bvec": str(dwi.bvec),
                                                 "settings": options, "reverse_pe_b0": (
                                                     str(dwi.reverse_pe_b0) if dwi.reverse_pe_b0 else None)},
                             ["dwi", "bvec", "mask", "mean_b0", "provenance"], f"dwi_prepare_ses{tag}",
                             mem_gb=memory_estimate_gb(dwi.image, 8, 5))  # float64 series, corrected copy
    fit = _function_node(_tensor_fit_node, {"dwi": _CONNECTED, "bval": str(dwi.bval), "bvec": _CONNECTED,
                                            "mask": _CONNECTED}, ["tensor", "provenance"], f"dwi_tensor_ses{tag}")
    register = _function_node(_register_node, {"t1w": str(session.t1w.image), "moving": _CONNECTED,
                                               "settings": options, "what": "dwi"},
                              ["transform", "provenance"], f"dwi_register_ses{tag}")
    to_grid = _function_node(_tensor_grid_node, {"tensor": _CONNECTED, "transform_json": _CONNECTED,
                                                 "t1w_grid": _CONNECTED, "mask_grid": _CONNECTED},
                             ["tensor", "provenance"], f"dwi_grid_ses{tag}")
    workflow.connect([(prepare, fit, [("dwi", "dwi"), ("bvec", "bvec"), ("mask", "mask")]),
                      (prepare, register, [("mean_b0", "moving")]),
                      (fit, to_grid, [("tensor", "tensor")]),
                      (register, to_grid, [("transform", "transform_json")]),
                      (grid, to_grid, [("t1w_grid", "t1w_grid"), ("mask_grid", "mask_grid")]),
                      (to_grid, collector, [("tensor", "tensor")])])
    return [(prepare, "provenance"), (register, "provenance"), (to_grid, "provenance")]


# --------------------------------------------------------------------------- running
def configure_nipype(verbosity: int = 0) -> None:
    """Quiet nipype (WARNING unless ``-v``) and switch off its online version check (no network)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = "DEBUG" if verbosity >= 2 else ("INFO" if verbosity >= 1 else "WARNING")
    nipype_config.set("logging", "workflow_level", level)
    nipype_config.set("logging", "interface_level", level)
    nipype_config.set("logging", "utils_level", level)
    nipype_config.set("execution", "check_version", "false")
    nipype_logging.update_logging(nipype_config)
    for name in NIPYPE_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # A failed node is reported as one line by run_preprocessing; its traceback only with -vv (and in
    # the crash file), so nipype's error records (which carry it) are dropped below that.
    for name in NIPYPE_LOGGERS:
        nipype_logger = logging.getLogger(name)
        for old in [f for f in nipype_logger.filters if isinstance(f, _NodeErrorFilter)]:
            nipype_logger.removeFilter(old)
        if verbosity < 2:
            nipype_logger.addFilter(_NodeErrorFilter())


class _NodeErrorFilter(logging.Filter):
    """Drops nipype's node-failure records (error, traceback, "[Node] Error on") below ``-vv``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (record.levelno >= logging.ERROR or "Traceback" in text or text.startswith("[Node] Error")
                    or "Storing result file without outputs" in text)


def settings_from_config(config) -> PreprocSettings:
    """Preprocessing settings implied by a run :class:`bssfp2dt.config.Config`."""
    from bssfp2dt.preprocessing.dwi import check_denoise_method
    from bssfp2dt.preprocessing.steps import motion_settings, registration_settings
    from bssfp2dt.preprocessing.unringing import resolve_method

    options = config.preprocessing
    gibbs = options.unringing_method != "none"
    backend = getattr(options, "registration_backend", "ants")
    return PreprocSettings(single_bssfp=modalities.get(config.selection.input_modality).single_cycle, gibbs=gibbs,
                           unringing=resolve_method(options.unringing_method if gibbs else "auto"),
                           denoise=check_denoise_method(getattr(options, "denoise_method", "none")),
                           motion_correction=options.hmc_model != "none",
                           registration=registration_settings(backend), motion_registration=motion_settings(backend),
                           omp_nthreads=config.resources.omp_nthreads)


@contextmanager
def threads_for_nodes(omp_nthreads: int, nprocs: int = 1) -> Iterator[None]:
    """Set ``THREADS_ENV`` and ``NPROCS_ENV`` for the nodes run inside (MultiProc workers inherit them),
    then restore them."""
    from bssfp2dt.preprocessing.steps import NPROCS_ENV, THREADS_ENV

    values = {THREADS_ENV: str(int(omp_nthreads)), NPROCS_ENV: str(int(nprocs))}
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_preprocessing(plan_or_config, subject_inputs, settings: PreprocSettings | None = None) -> PreprocessedSubject:
    """Preprocess one subject through the cached workflow; write ``desc-preproc`` outputs on request.

    Args:
        plan_or_config: :class:`bssfp2dt.pipeline.plan.RunPlan` or :class:`bssfp2dt.config.Config` (work dir,
            output dir, run uuid, ``--nprocs``, ``--write-preproc``, verbosity).
        subject_inputs: :class:`bssfp2dt.io.bids.SubjectInputs` of the subject.
        settings: preprocessing choices (default: :func:`settings_from_config`).
    Returns:
        :class:`PreprocessedSubject` with the paths in the work directory.
    """
    config = getattr(plan_or_config, "config", plan_or_config)
    settings = settings or settings_from_config(config)
    from bssfp2dt.io.derivatives import subject_log_dir

    configure_nipype(config.run.verbosity)
    crash_dir = subject_log_dir(config.paths.output_dir, subject_inputs.subject, config.run.run_uuid)
    workflow, collect = build_workflow(subject_inputs, settings, config.paths.work_dir, crash_dir,
                                       config.run.stop_on_first_crash)
    nprocs = config.resources.nprocs
    started = time.time()
    logger.info("sub-%s: preprocessing (%d session(s), work dir %s, %s)", subject_inputs.subject, len(collect),
                config.paths.work_dir, f"MultiProc n_procs={nprocs}" if nprocs > 1 else "Linear")
    try:
        with threads_for_nodes(settings.omp_nthreads, nprocs):
            if nprocs > 1:
                graph = workflow.run(plugin="MultiProc", plugin_args=multiproc_args(nprocs, config.resources.mem_mb))
            else:
                graph = workflow.run(plugin="Linear")
    except RuntimeError:
        failures = node_failures(crash_dir, started)
        has_dwi = any(session.dwi is not None for session in subject_inputs.sessions)
        if has_dwi and failures and all(is_dwi_node(f.node) for f in failures) and not _dwi_required(config):
            # The DWI is only the evaluation's reference: predict without it rather than lose the subject.
            logger.warning("sub-%s: the DWI cannot give a tensor (%s: %s); the prediction is still made, its "
                           "evaluation is skipped", subject_inputs.subject, failures[0].node, failures[0].message)
            return run_preprocessing(plan_or_config, _without_dwi(subject_inputs), settings)
        raise preprocessing_error(subject_inputs, failures, crash_dir) from None
    _log_steps(graph, subject_inputs.subject, started)
    folder = Path(config.paths.work_dir) / workflow.name
    summaries = (next((folder / name).glob("*_preproc.json")) for name in collect.values())
    subject = PreprocessedSubject(subject_inputs.subject, tuple(read_summary(path) for path in summaries))
    if config.model.write_preproc:
        write_preprocessed(subject, config)
    return subject


def _dwi_required(config) -> bool:
    """Training and ``--input-modality dwi-tensor`` need the DWI; otherwise it is optional."""
    training = getattr(getattr(config, "training", None), "stage", None)
    return bool(training) or modalities.get(config.selection.input_modality).needs_dwi


def _without_dwi(subject_inputs):
    import dataclasses

    return dataclasses.replace(subject_inputs, sessions=tuple(dataclasses.replace(session, dwi=None)
                                                              for session in subject_inputs.sessions))


def multiproc_args(nprocs: int, mem_mb: int | None) -> dict[str, Any]:
    """nipype MultiProc arguments: ``--nprocs`` processes and, with ``--mem``, its memory in GB (as fMRIPrep)."""
    arguments: dict[str, Any] = {"n_procs": int(nprocs), "raise_insufficient": False}
    if mem_mb:
        arguments["memory_gb"] = round(int(mem_mb) / 1024, 3)
    return arguments


def _log_steps(graph, subject: str, started: float) -> None:
    for node in graph.nodes():
        result_file = Path(node.output_dir()) / f"result_{node.name}.pklz"  # executed copies know their folder
        cached = result_file.is_file() and result_file.stat().st_mtime < started
        try:
            duration = float(node.result.runtime.duration)
        except (AttributeError, TypeError, FileNotFoundError):
            duration = float("nan")
        logger.info("sub-%s %s: %.1f s%s", subject, node.name, duration, " (cached)" if cached else "")
