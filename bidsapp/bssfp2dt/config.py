"""Resolved run settings as frozen dataclasses, checked once after parsing and saved as TOML per run.

``config_from_args`` turns the argparse namespace into a :class:`Config` (paths resolved, labels
stripped, resources filled in) and performs every check that needs no BIDS indexing; nothing is
written. ``save_toml`` / ``load_toml`` round-trip a config to an equal object. TOML has no null, so
``None`` values are left out on writing and restored on reading; the BIDS queries (which may contain
null) are kept as a canonical JSON string.

Every default setting is written once, as a dataclass default here; the command line reads them with
:func:`field_default`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bssfp2dt import __version__, modalities
from bssfp2dt.errors import (AnalysisLevelError, InvalidBIDSError, MissingInputError, OutputError,
                             UsageError)
from bssfp2dt.training.recipes import DEFAULT_RECIPE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ANALYSIS_LEVELS = ("participant", "group")


@dataclass(frozen=True)
class DerivativeSource:
    """A precomputed derivatives dataset given as ``--derivatives NAME=PATH``."""

    name: str
    path: Path


@dataclass(frozen=True)
class PathSettings:
    """Absolute, resolved folders (the work dir holds the cache; reruns reuse finished steps)."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    bids_filter_file: Path | None = None
    derivatives: tuple[DerivativeSource, ...] = ()


@dataclass(frozen=True)
class SelectionSettings:
    """What to process. Empty label tuples mean all; ``bids_queries`` is the merged JSON of pybids queries."""

    analysis_level: str
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    input_modality: str = modalities.DEFAULT.name
    bids_queries: str = "{}"

    @property
    def queries(self) -> dict[str, dict[str, Any]]:
        """The per-kind pybids queries (``None``: entity absent, ``"*"``: any value)."""
        return json.loads(self.bids_queries)


@dataclass(frozen=True)
class ResourceSettings:
    """CPU processes, threads per process, memory limit (MB, None = no limit) and torch device."""

    nprocs: int
    omp_nthreads: int
    mem_mb: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class ModelSettings:
    """Checkpoint (None = the packaged model), network size and patch geometry (voxels; None = the model's
    training patch for inference, the recipe's for training)."""

    model: Path | None = None
    model_size: str | None = None
    patch_size: int | None = None
    batch_size: int = 1
    write_preproc: bool = False
    output_spaces: tuple[str, ...] = ("T1w",)


@dataclass(frozen=True)
class PreprocessingOptions:
    """Optional preprocessing steps (QSIPrep's option names): Gibbs-ringing removal of bSSFP and DWI
    (``auto``: MRtrix3's ``mrdegibbs`` when on the PATH, else ``dipy``; ``mrdegibbs``, ``dipy`` or ``none``),
    DWI denoising (``dwidenoise``: MRtrix3's MP-PCA, or ``none``: the packaged models were trained on
    non-denoised DWI targets), DWI head-motion correction (``rigid`` or ``none``) and the registration back end
    (``ants`` or ``dipy``)."""

    unringing_method: str = "auto"
    denoise_method: str = "none"
    hmc_model: str = "rigid"
    registration_backend: str = "ants"


@dataclass(frozen=True)
class TrainingSettings:
    """Training stage (None = inference), starting weights, epoch bound, seed, learning rate (None: the
    stage's) and its schedule ("constant" or "cosine"), the recipe (``training.recipes``), early-stopping
    patience (epochs) and the train/validation/test subject fractions."""

    stage: str | None = None
    init_checkpoint: Path | None = None
    max_epochs: int = 100
    seed: int = 0
    perceptual_weights: Path | None = None
    learning_rate: float | None = None
    lr_schedule: str = "constant"
    recipe: str = DEFAULT_RECIPE
    patience: int = 5
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class RunSettings:
    """Identity and control of one invocation."""

    run_uuid: str
    version: str = __version__
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    dry_run: bool = False
    verbosity: int = 0
    reports_only: bool = False


@dataclass(frozen=True)
class Config:
    """Every resolved setting of one run."""

    paths: PathSettings
    selection: SelectionSettings
    resources: ResourceSettings
    run: RunSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    preprocessing: PreprocessingOptions = field(default_factory=PreprocessingOptions)

    def for_subject(self, label: str) -> "Config":
        """The same config restricted to one participant (what is saved in that subject's log)."""
        return dataclasses.replace(self, selection=dataclasses.replace(self.selection, participant_labels=(label,)))


def field_default(settings: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``settings`` (e.g. ``TrainingSettings``,
    ``"max_epochs"``); ValueError when the field does not exist or has no default."""
    for item in dataclasses.fields(settings):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            break
    raise ValueError(f"{settings.__name__}.{name} has no default")


# --------------------------------------------------------------------------- TOML round trip
def save_toml(config: Config, path: Path | str) -> Path:
    """Write ``config`` as TOML (atomically); ``load_toml`` gives back an equal object."""
    import tomli_w  # small, but only needed when writing

    from bssfp2dt.io.atomic import write_text

    return write_text(tomli_w.dumps(_to_toml(config)), path)


def load_toml(path: Path | str) -> Config:
    """Read a config written by :func:`save_toml`."""
    with open(path, "rb") as handle:
        return _from_toml(Config, tomllib.load(handle))


def _to_toml(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {item.name: _to_toml(getattr(value, item.name)) for item in dataclasses.fields(value)
                if getattr(value, item.name) is not None}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_to_toml(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _to_toml(item) for key, item in value.items()}
    return value


def _from_toml(kind: Any, value: Any) -> Any:
    """Rebuild ``value`` (parsed TOML) as type ``kind``, driven by the dataclass type hints."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return None if value is None else _from_toml(options[0], value)
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        return tuple(_from_toml(item_kind, item) for item in value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        arguments = {item.name: _from_toml(hints[item.name], value[item.name])
                     for item in dataclasses.fields(kind) if item.name in value}
        for item in dataclasses.fields(kind):
            optional = type(None) in typing.get_args(hints[item.name])
            if item.name not in value and optional and item.default is dataclasses.MISSING:
                arguments[item.name] = None
        return kind(**arguments)
    if kind is Path:
        return Path(value)
    return kind(value)


# --------------------------------------------------------------------------- from the command line
def config_from_args(args: argparse.Namespace, run_uuid: str,
                     default_queries: Mapping[str, Mapping[str, Any]]) -> Config:
    """Resolve and check the parsed arguments; raise the matching :mod:`bssfp2dt.errors` class.

    ``default_queries`` are the pybids queries per input kind that ``--bids-filter-file`` overrides.
    Writes nothing.
    """
    if args.analysis_level not in ANALYSIS_LEVELS:
        raise AnalysisLevelError(f"unknown analysis level {args.analysis_level!r}; use participant or group")
    bids_dir = _check_bids_dir(Path(args.bids_dir))
    output_dir = _check_output_dir(Path(args.output_dir), bids_dir)
    work_dir = _check_work_dir(args.work_dir, bids_dir, output_dir)
    filter_file = _existing_file(args.bids_filter_file, "--bids-filter-file")
    queries = merge_queries(default_queries, _read_filter_file(filter_file) if filter_file else {}, filter_file)
    _check_training(args)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    nprocs = args.nprocs or available
    omp_nthreads = args.omp_nthreads or min(8, nprocs)
    if omp_nthreads > nprocs:
        raise UsageError(f"--omp-nthreads {omp_nthreads} exceeds --nprocs {nprocs}; lower --omp-nthreads")
    return Config(
        paths=PathSettings(bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir,
                           bids_filter_file=filter_file, derivatives=_derivative_sources(args.derivatives)),
        selection=SelectionSettings(
            analysis_level=args.analysis_level,
            participant_labels=participant_labels(args.participant_label or ()),
            session_labels=_labels(args.session_label or (), "ses", "--session-label"),
            input_modality=args.input_modality,
            bids_queries=json.dumps(queries, sort_keys=True)),
        resources=ResourceSettings(nprocs=nprocs, omp_nthreads=omp_nthreads, mem_mb=args.mem, device=args.device),
        model=ModelSettings(model=_existing_file(args.model, "--model"), model_size=args.model_size,
                            patch_size=args.patch_size, batch_size=args.batch_size, write_preproc=args.write_preproc,
                            output_spaces=output_spaces(getattr(args, "output_spaces", None))),
        training=TrainingSettings(stage=args.train_stage,
                                  init_checkpoint=_existing_file(args.init_checkpoint, "--init-checkpoint"),
                                  max_epochs=args.max_epochs, seed=args.seed,
                                  learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                                  recipe=args.recipe,
                                  patience=args.patience,
                                  split_fractions=tuple(args.split_fractions),
                                  perceptual_weights=_existing_file(args.perceptual_weights, "--perceptual-weights")),
        run=RunSettings(run_uuid=run_uuid, skip_bids_validation=args.skip_bids_validation,
                        stop_on_first_crash=args.stop_on_first_crash, dry_run=args.dry_run,
                        verbosity=args.verbose, reports_only=getattr(args, "reports_only", False)),
        preprocessing=PreprocessingOptions(unringing_method=args.unringing_method,
                                           denoise_method=args.denoise_method, hmc_model=args.hmc_model,
                                           registration_backend=args.registration_backend),
    )


def output_spaces(values) -> tuple[str, ...]:
    """``--output-spaces`` values (TemplateFlow names), T1w always first; unknown names are exit 64."""
    from bssfp2dt.spaces.templates import check_output_spaces

    return check_output_spaces(values or ("T1w",))


def participant_labels(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Labels without ``sub-``; a value naming an existing file contributes one label per line."""
    expanded: list[str] = []
    for value in values:
        candidate = Path(value)
        if candidate.is_file():
            expanded.extend(line.strip() for line in candidate.read_text().splitlines() if line.strip())
        else:
            expanded.append(value)
    return _labels(expanded, "sub", "--participant-label")


def _labels(values: tuple[str, ...] | list[str], prefix: str, flag: str) -> tuple[str, ...]:
    labels: list[str] = []
    for value in values:
        label = value[len(prefix) + 1:] if value.startswith(prefix + "-") else value
        if not label.isalnum() or not label.isascii():
            raise UsageError(f"{flag} {value!r} is not a BIDS label (letters and digits only) nor a label file")
        if label not in labels:
            labels.append(label)
    return tuple(labels)


def merge_queries(defaults: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any],
                  filter_file: Path | None) -> dict[str, dict[str, Any]]:
    """Per input kind, the user's entities replace the defaults' (fMRIPrep's ``--bids-filter-file`` rule).

    The result shares no list with ``defaults`` or ``overrides`` (a deep copy), so editing it edits neither.
    """
    # Deep copies: the defaults hold lists (e.g. the NIfTI extensions) that must not be aliased.
    merged = {kind: copy.deepcopy(dict(query)) for kind, query in defaults.items()}
    for kind, query in overrides.items():
        if kind not in merged:
            raise UsageError(f"--bids-filter-file {filter_file}: unknown input kind {kind!r}; "
                             f"use one of {', '.join(sorted(merged))}")
        if not isinstance(query, dict):
            raise UsageError(f"--bids-filter-file {filter_file}: {kind!r} must map entities to values")
        for entity, value in query.items():
            if entity in ("subject", "session"):
                raise UsageError(f"--bids-filter-file {filter_file}: {kind}.{entity} is not allowed; select "
                                 f"with --{'participant' if entity == 'subject' else 'session'}-label")
            if not (value is None or isinstance(value, (str, int)) or
                    (isinstance(value, list) and all(isinstance(item, (str, int)) for item in value))):
                raise UsageError(f"--bids-filter-file {filter_file}: {kind}.{entity} must be a string, "
                                 "a list of strings, null or \"*\"")
        merged[kind].update(copy.deepcopy(query))
    return merged


def _read_filter_file(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON ({error}); fix the file") from None
    if not isinstance(content, dict):
        raise UsageError(f"--bids-filter-file {path} must hold a JSON object of queries per input kind")
    return content


def _check_bids_dir(bids_dir: Path) -> Path:
    from bssfp2dt.messages import path_problem

    problem = path_problem(bids_dir.expanduser(), "directory")
    if problem is not None and problem.startswith(("is a symbolic link", "is a broken", "cannot")):
        raise MissingInputError(f"bids_dir {bids_dir.expanduser().absolute()} {problem}")
    bids_dir = bids_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise MissingInputError(f"bids_dir {bids_dir} does not exist; give the root of a BIDS dataset")
    if not bids_dir.is_dir():
        raise MissingInputError(f"bids_dir {bids_dir} is not a directory; give the root of a BIDS dataset")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InvalidBIDSError(f"bids_dir {bids_dir} has no dataset_description.json, so it is not a BIDS "
                               "dataset; give the dataset root")
    return bids_dir


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_output_dir(output_dir: Path, bids_dir: Path) -> Path:
    output_dir = output_dir.expanduser().resolve()
    if output_dir == bids_dir:
        raise UsageError(f"output_dir {output_dir} is bids_dir; write to e.g. {bids_dir / 'derivatives' / 'bssfp2dt'}")
    derivatives = bids_dir / "derivatives"
    if _is_within(output_dir, bids_dir) and derivatives not in output_dir.parents:
        raise UsageError(f"output_dir {output_dir} is inside bids_dir; use a folder outside it or "
                         f"{derivatives / 'bssfp2dt'}")
    check_writable(output_dir, "output_dir")
    return output_dir


def _check_work_dir(work_dir: Path | None, bids_dir: Path, output_dir: Path) -> Path:
    work_dir = (work_dir or default_work_dir()).expanduser().resolve()
    if _is_within(work_dir, bids_dir):
        raise UsageError(f"--work-dir {work_dir} is inside bids_dir; put the cache outside the input dataset")
    if _is_within(work_dir, output_dir):
        raise UsageError(f"--work-dir {work_dir} is inside output_dir, which must stay a valid BIDS-Derivatives "
                         "dataset; put the cache elsewhere")
    check_writable(work_dir, "--work-dir")
    return work_dir


def default_work_dir() -> Path:
    """``$TMPDIR/bssfp2dt_work``: /tmp is writable in a read-only container, unlike the current directory."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / "bssfp2dt_work"


def check_writable(folder: Path, what: str) -> None:
    """Raise :class:`OutputError` unless ``folder`` is, or can be created as, a writable directory.

    Creates nothing: walks up to the nearest existing ancestor, which must be a writable directory.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {existing} is not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder} cannot be created: {existing} is not writable; choose another path")
    # root passes os.access everywhere; a read-only mount (e.g. `docker run --read-only` without a
    # bound output folder) is still caught here.
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"{what} {folder} cannot be created: {existing} is on a read-only file system; "
                          "bind a writable folder")


def _existing_file(path: Path | None, flag: str) -> Path | None:
    if path is None:
        return None
    from bssfp2dt.messages import path_problem

    path = Path(path).expanduser()
    problem = path_problem(path, "file")
    if problem == "does not exist":
        raise MissingInputError(f"{flag} {path.absolute()} does not exist; check the path")
    if problem is not None:
        advice = "" if ";" in problem else "; give the path of the file itself"
        raise MissingInputError(f"{flag} {path.absolute()} {problem}{advice}")
    return path.resolve()


def _derivative_sources(values: list[tuple[str, Path]]) -> tuple[DerivativeSource, ...]:
    sources: list[DerivativeSource] = []
    for name, path in values:
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise MissingInputError(f"--derivatives {name}={path} is not a directory; check the path")
        if any(source.name == name for source in sources):
            raise UsageError(f"--derivatives name {name!r} is given twice; use distinct names")
        sources.append(DerivativeSource(name=name, path=path))
    return tuple(sources)


def _check_training(args: argparse.Namespace) -> None:
    if args.train_stage and args.analysis_level != "participant":
        raise UsageError("--train-stage works at the participant level only; use 'participant'")
    if args.init_checkpoint and not args.train_stage:
        raise UsageError("--init-checkpoint needs --train-stage; for inference use --model")
