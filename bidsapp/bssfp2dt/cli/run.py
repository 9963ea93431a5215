"""``bssfp2dt bids_dir output_dir {participant,group}``: check everything, then hand over to a pipeline.

Order: parse -> consistency checks -> BIDS validation -> input discovery and checks (headers, then
content) -> (dry run: print and stop) -> the pipeline's own checks (participant: device and model) ->
work-dir lock -> output dataset + per-subject config TOML -> pipeline. Nothing is written to
output_dir before every input has been checked. Heavy modules (pybids, torch) load lazily, so
``--help`` and ``--version`` stay instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import uuid
from typing import Callable, Sequence

from bssfp2dt.cli.common import run_reporting_errors, setup_logging
from bssfp2dt.cli.parser import PROGRAM, parse_args
from bssfp2dt.errors import Bssfp2dtError, MissingInputError

logger = logging.getLogger(__name__)

# (module, function) of each pipeline, imported only once every check has passed.
PIPELINES = {
    "participant": ("bssfp2dt.pipeline.participant", "run_participant"),
    "group": ("bssfp2dt.pipeline.group", "run_group"),
    "training": ("bssfp2dt.pipeline.training", "run_training"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the BIDS execution-spec exit code (usage errors exit 64 directly)."""
    args = parse_args(argv, describe=_descriptor)
    setup_logging(args.verbose)
    return run_reporting_errors(lambda: run(args), args.verbose, PROGRAM)


def _descriptor() -> str:
    """The Boutiques descriptor ``--bids-exec-spec`` prints (imported only when asked for)."""
    from bssfp2dt.cli.platforms import descriptor_json

    return descriptor_json()


def new_run_uuid() -> str:
    """``YYYYMMDD-HHMMSS_<uuid4>`` (NiPreps style: sortable by time, unique)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}"


def run(args: argparse.Namespace) -> int:
    """Check, discover and dispatch; raises :class:`Bssfp2dtError` subclasses for user errors."""
    from bssfp2dt.config import config_from_args
    from bssfp2dt.pipeline.plan import RunPlan
    from bssfp2dt.io import bids as bids_io
    from bssfp2dt.io.content_checks import check_subjects
    from bssfp2dt.io.derivatives import check_output_dataset

    config = config_from_args(args, new_run_uuid(), bids_io.DEFAULT_QUERIES)
    check_output_dataset(config.paths.output_dir)
    subjects = bids_io.select_subjects(bids_io.list_subjects(config.paths.bids_dir),
                                       config.selection.participant_labels, config.paths.bids_dir)
    if not config.run.skip_bids_validation:
        from bssfp2dt.io.validation import validate

        validate(config.paths.bids_dir, subjects)
    if config.selection.analysis_level == "group":
        plan = RunPlan(config=config, participant_results=_participant_results(config, subjects))
    else:
        inputs = bids_io.discover(config)
        bids_io.require_inputs(inputs, config.selection.input_modality, training=config.training.stage is not None)
        inputs = check_subjects(inputs, config.selection.input_modality, training=config.training.stage is not None)
        plan = RunPlan(config=config, subjects=inputs)
    if config.run.dry_run:
        print(describe_plan(plan))
        return 0
    pipeline = load_pipeline(_pipeline_name(config))
    prepared = check_pipeline(_pipeline_name(config), plan)  # device, model...: checked before writing
    with _exclusive_work_dir(config):
        write_run_records(plan)
        outcome = pipeline(plan, **prepared)
    return 0 if outcome is None else int(outcome)


def _exclusive_work_dir(config):
    """The work dir's lock for the participant level; the group level does not use the work dir, and training
    holds the lock only while it preprocesses (``pipeline.training.prepare_data``), so several trainings on one
    work dir (e.g. one per modality) can share its cache once it is filled."""
    from contextlib import nullcontext

    from bssfp2dt.io.workdir_lock import work_dir_lock

    if config.selection.analysis_level == "group" or config.training.stage:
        return nullcontext()
    return work_dir_lock(config.paths.work_dir)


def _pipeline_name(config) -> str:
    return "training" if config.training.stage else config.selection.analysis_level


def _participant_results(config, subjects: Sequence[str]) -> dict:
    from bssfp2dt.io.derivatives import find_participant_results
    from bssfp2dt.pipeline.completion import incomplete_subjects as subjects_incomplete

    results = find_participant_results(config.paths.output_dir, subjects)
    if not results and subjects_incomplete(config.paths.output_dir, subjects):
        return results  # the group level names the incomplete subjects and how to finish them
    if not results:
        raise MissingInputError(f"output_dir {config.paths.output_dir} has no participant results "
                                "(*_param-diffusivity_dwimap.nii.gz); run the participant level first")
    return results


def load_pipeline(name: str) -> Callable:
    """Import a pipeline entry point lazily; a build without it is a one-line error (exit 1)."""
    module_name, function_name = PIPELINES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the pipeline module itself being absent is expected; a missing dependency inside it is a bug.
        if error.name not in (module_name, module_name.rpartition(".")[0]):
            raise
        raise Bssfp2dtError(f"this build of {PROGRAM} has no {name} pipeline ({module_name}); "
                            "use a release that includes it") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise Bssfp2dtError(f"this build of {PROGRAM} has no {name} pipeline ({module_name}.{function_name}); "
                            "use a release that includes it")
    return function


def check_pipeline(name: str, plan) -> dict:
    """Run the pipeline module's ``check_<name>(plan)`` when it has one; its result is passed to the pipeline."""
    module_name, _ = PIPELINES[name]
    check = getattr(importlib.import_module(module_name), f"check_{name}", None)
    return dict(check(plan)) if check is not None else {}


def write_run_records(plan) -> None:
    """Create the derivatives dataset and save the resolved config TOML per subject (group: under log/)."""
    from bssfp2dt.config import save_toml
    from bssfp2dt.errors import OutputError
    from bssfp2dt.io.derivatives import initialise_dataset, run_config_path

    config = plan.config
    paths = config.paths
    initialise_dataset(paths.output_dir, paths.bids_dir)
    labels = [subject.subject for subject in plan.subjects] or list(plan.participant_results)
    try:
        if config.selection.analysis_level == "group":
            save_toml(config, run_config_path(paths.output_dir, None, config.run.run_uuid))
        else:
            for label in labels:
                save_toml(config.for_subject(label), run_config_path(paths.output_dir, label, config.run.run_uuid))
    except OSError as error:
        raise OutputError(f"cannot write the run configuration under {paths.output_dir} ({error.strerror}); "
                          "check free space and permissions") from None


def describe_plan(plan) -> str:
    """Human-readable summary of what a run would read (printed by ``--dry-run``)."""
    config = plan.config
    lines = [f"{PROGRAM} {config.run.version} dry run: {config.selection.analysis_level} level, "
             f"input modality {config.selection.input_modality}"
             + (f", training stage {config.training.stage}" if config.training.stage else ""),
             f"bids_dir:   {config.paths.bids_dir}", f"output_dir: {config.paths.output_dir}",
             f"work_dir:   {config.paths.work_dir}"]
    for subject in plan.subjects:
        for session in subject.sessions:
            lines.append(session.describe())
    for label, files in plan.participant_results.items():
        lines.append(f"sub-{label}: {len(files)} participant result(s)")
        lines.extend(f"  {path}" for path in files)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
