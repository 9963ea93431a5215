"""The ``bssfp2dt`` command line (BIDS-Apps 1.0 with the NiPreps option names users know).

Only the standard library is imported here, so ``--help`` and ``--version`` stay instant.
Usage errors exit 64 (the BIDS execution spec reserves argparse's default 2). Defaults are read from the
:mod:`bssfp2dt.config` dataclasses (:func:`default`), where each is written once.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from bssfp2dt import __version__, modalities
from bssfp2dt.config import (ModelSettings, PreprocessingOptions, ResourceSettings, RunSettings,
                             SelectionSettings, TrainingSettings, field_default)
from bssfp2dt.errors import EXIT_USAGE
from bssfp2dt.training.recipes import RECIPES

PROGRAM = "bssfp2dt"
ANALYSIS_LEVELS = ("participant", "group")
INPUT_MODALITIES = modalities.NAMES
TRAIN_STAGES = ("direct", "autoencoder", "head", "finetune")
LR_SCHEDULES = modalities.LR_SCHEDULES  # training.module implements them
MODEL_SIZES = modalities.MODEL_SIZES
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_MEMORY_UNIT_MB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 ** 2}


#: Option destination -> the settings dataclass and field whose default it takes.
DEFAULTS_FROM: dict[str, tuple[type, str]] = {
    "verbose": (RunSettings, "verbosity"),
    "input_modality": (SelectionSettings, "input_modality"),
    "skip_bids_validation": (RunSettings, "skip_bids_validation"),
    "device": (ResourceSettings, "device"),
    "batch_size": (ModelSettings, "batch_size"),
    "write_preproc": (ModelSettings, "write_preproc"),
    "unringing_method": (PreprocessingOptions, "unringing_method"),
    "denoise_method": (PreprocessingOptions, "denoise_method"),
    "hmc_model": (PreprocessingOptions, "hmc_model"),
    "registration_backend": (PreprocessingOptions, "registration_backend"),
    "max_epochs": (TrainingSettings, "max_epochs"),
    "lr_schedule": (TrainingSettings, "lr_schedule"),
    "recipe": (TrainingSettings, "recipe"),
    "patience": (TrainingSettings, "patience"),
    "split_fractions": (TrainingSettings, "split_fractions"),
    "seed": (TrainingSettings, "seed"),
    "stop_on_first_crash": (RunSettings, "stop_on_first_crash"),
    "dry_run": (RunSettings, "dry_run"),
    "reports_only": (RunSettings, "reports_only"),
}


def default(dest: str) -> Any:
    """The default of the option stored in ``dest``: its :mod:`bssfp2dt.config` dataclass field's."""
    settings, name = DEFAULTS_FROM[dest]
    return field_default(settings, name)


class BidsAppArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors exit with 64 (EX_USAGE) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class PrintExecSpecAction(argparse.Action):
    """``--bids-exec-spec``: print the Boutiques descriptor (JSON) and exit 0, like ``--version``.

    ``describe`` returns the descriptor's text; the application passes
    :func:`bssfp2dt.cli.platforms.descriptor_json`, which is derived from this parser (so this module does
    not import it).
    """

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,
                 describe: Callable[[], str] | None = None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)
        self.describe = describe

    def __call__(self, parser, namespace, values, option_string=None):
        if self.describe is None:
            parser.error(f"{option_string} is not available from this parser")
        sys.stdout.write(self.describe())
        parser.exit()


def memory_mb(text: str) -> int:
    """``'8G'``, ``'8GB'``, ``'8000M'``, ``'512MiB'`` -> megabytes (int). A bare number means MB, as in
    fMRIPrep's and QSIPrep's ``--mem``/``--mem-mb``."""
    match = _MEMORY_PATTERN.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; use e.g. 8G, 8GB or 8000M")
    value, unit = float(match.group(1)), (match.group(2) or "m").lower()
    megabytes = int(round(value * _MEMORY_UNIT_MB[unit]))
    if megabytes < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1 MB")
    return megabytes


def device_name(text: str) -> str:
    """Accept ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (case-insensitive), returned lower-case."""
    value = text.strip().lower()
    if not DEVICE_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def split_fractions(text: str) -> tuple[float, float, float]:
    """``TRAIN,VALIDATION,TEST`` subject fractions: three non-negative numbers summing to 1, TRAIN > 0."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers") from None
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or values[0] <= 0 \
            or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r} must be three non-negative fractions summing to 1, "
                                         "the first above 0 (e.g. 0.7,0.15,0.15)")
    return values  # type: ignore[return-value]


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be non-negative")
    return value


def derivative_source(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, path). A bare PATH is named after its folder."""
    name, separator, path = text.partition("=")
    if not separator:
        name, path = Path(text).name, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, Path(path)


def build_parser(describe: Callable[[], str] | None = None) -> BidsAppArgumentParser:
    """The argparse parser of ``bssfp2dt bids_dir output_dir {participant,group} [options]``; ``describe``
    gives the text ``--bids-exec-spec`` prints (see :class:`PrintExecSpecAction`)."""
    parser = BidsAppArgumentParser(
        prog=PROGRAM,
        description="Diffusion tensor, FA, MD, AD, RD and colour-FA maps predicted from phase-cycled bSSFP "
                    "(or T1w) MRI with a 3D conditional GAN, as a BIDS-App.",
        epilog="Exit codes: 0 ok, 1 failure, 16 invalid BIDS, 17 unknown analysis level, 18 filters selected "
               "no files, 64 usage error, 66 required input missing, 73 cannot create output.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the BIDS-Derivatives dataset is written")
    # No argparse `choices` here: an unknown level has its own exit code (17), checked after parsing.
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="participant: per-subject maps (or training with --train-stage); "
                             "group: aggregate the participant results")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    parser.add_argument("--bids-exec-spec", action=PrintExecSpecAction, describe=describe,
                        help="print the Boutiques descriptor of this command line (JSON) and exit")
    parser.add_argument("-v", "--verbose", dest="verbose", action="count", default=default("verbose"),
                        help="more log output (-v debug, -vv also tracebacks)")

    selection = parser.add_argument_group("Selecting inputs")
    selection.add_argument("--participant-label", "--participant_label", dest="participant_label",
                           nargs="+", metavar="LABEL",
                           help="subjects to process, with or without 'sub-', or a file with one label per "
                                "line (default: all)")
    selection.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                           metavar="LABEL", help="sessions to process, with or without 'ses-' (default: all)")
    selection.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=Path,
                           metavar="FILE",
                           help="JSON of pybids queries per input kind, merged over the defaults "
                                "(null: entity must be absent, \"*\": any value)")
    selection.add_argument("--derivatives", nargs="+", type=derivative_source, metavar="NAME=PATH",
                           default=[], help="precomputed tissue probability maps / brain masks (e.g. sMRIPrep)")
    selection.add_argument("--input-modality", "--input_modality", dest="input_modality",
                           choices=INPUT_MODALITIES, default=default("input_modality"),
                           help="which input the network reads")
    selection.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                           action="store_true", default=default("skip_bids_validation"),
                           help="do not run the BIDS validator on bids_dir")

    resources = parser.add_argument_group("Resources")
    resources.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path,
                           help="cache of intermediate results; reruns reuse finished steps "
                                "(default: <tmp>/bssfp2dt_work)")
    resources.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=positive_int,
                           help="processes in parallel (default: all CPUs)")
    resources.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=positive_int,
                           help="threads per process (default: min(8, nprocs))")
    resources.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem", type=memory_mb, metavar="SIZE",
                           help="memory limit, e.g. 16000 (MB, as in fMRIPrep), 8000M, 8G or 8GB")
    resources.add_argument("--device", type=device_name, default=default("device"),
                           help="auto, cpu, cuda or cuda:N (default: %(default)s)")

    model = parser.add_argument_group("Model and inference")
    model.add_argument("--model", type=Path, metavar="PATH",
                       help="checkpoint to use instead of the packaged model")
    model.add_argument("--model-size", "--model_size", dest="model_size", choices=MODEL_SIZES,
                       help="network width for training from scratch (default: from the checkpoint, "
                            f"else {modalities.DEFAULT_MODEL_SIZE})")
    model.add_argument("--patch-size", "--patch_size", dest="patch_size", type=positive_int,
                       help="cubic patch edge in voxels (training and sliding-window inference) (default: the "
                            "model's training patch for inference, the recipe's for training: "
                            f"{', '.join(f'{name} {recipe.patch_size}' for name, recipe in sorted(RECIPES.items()))})")
    model.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int,
                       default=default("batch_size"),
                       help="patches per batch (default: %(default)s)")
    model.add_argument("--write-preproc", "--write_preproc", dest="write_preproc", action="store_true",
                       default=default("write_preproc"), help="also write the preprocessed network inputs")
    model.add_argument("--output-spaces", "--output_spaces", dest="output_spaces", nargs="+", metavar="SPACE",
                       help="spaces of the outputs: T1w (always written) and TemplateFlow templates, e.g. "
                            "MNI152NLin2009cAsym (tensor resampled with reorientation; templates offline: see "
                            f"README) (default: {' '.join(field_default(ModelSettings, 'output_spaces'))})")

    preprocessing = parser.add_argument_group("Preprocessing")
    preprocessing.add_argument("--unringing-method", "--unringing_method", dest="unringing_method",
                               choices=("auto", "mrdegibbs", "dipy", "none"), default=default("unringing_method"),
                               help="Gibbs-ringing removal of bSSFP and DWI (sub-voxel shifts): MRtrix3's "
                                    "mrdegibbs (Debian package mrtrix3), dipy's, auto (mrdegibbs when on the PATH, "
                                    "else dipy) or none (data without ringing, e.g. simulated) (default: %(default)s)")
    preprocessing.add_argument("--denoise-method", "--denoise_method", dest="denoise_method",
                               choices=("dwidenoise", "none"), default=default("denoise_method"),
                               help="MP-PCA denoising of the DWI, the evaluation's reference: MRtrix3's dwidenoise "
                                    "(Debian package mrtrix3) or none; none by default because the packaged models "
                                    "were trained on non-denoised DWI targets (default: %(default)s)")
    preprocessing.add_argument("--hmc-model", "--hmc_model", dest="hmc_model", choices=("rigid", "none"),
                               default=default("hmc_model"),
                               help="DWI head-motion correction: rigid registration of every volume with "
                                    "b-vector rotation, or none (default: %(default)s)")
    preprocessing.add_argument("--registration-backend", "--registration_backend", dest="registration_backend",
                               choices=("ants", "dipy"), default=default("registration_backend"),
                               help="rigid registrations (bSSFP and b0 to T1w, DWI head motion): ANTs "
                                    "(antspyx) or dipy (slower) (default: %(default)s)")

    training = parser.add_argument_group("Training (instead of inference)")
    training.add_argument("--train-stage", "--train_stage", dest="train_stage", choices=TRAIN_STAGES,
                          help="train this stage on the selected subjects instead of predicting")
    training.add_argument("--init-checkpoint", "--init_checkpoint", dest="init_checkpoint", type=Path,
                          metavar="PATH", help="checkpoint whose weights start the stage")
    training.add_argument("--perceptual-weights", "--perceptual_weights", dest="perceptual_weights", type=Path,
                          metavar="PATH", help="MedicalNet ResNet-10 weights (.pth) for the perceptual loss "
                                               "(x1000); without it that term is off (nothing is downloaded)")
    training.add_argument("--max-epochs", "--max_epochs", dest="max_epochs", type=positive_int,
                          default=default("max_epochs"),
                          help="upper bound on epochs (early stopping may end sooner) (default: %(default)s)")
    training.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=positive_float,
                          metavar="LR", help="AdamW learning rate of generator and discriminator (default: the "
                                             "stage's: 1e-4, finetune 1e-5)")
    training.add_argument("--lr-schedule", "--lr_schedule", dest="lr_schedule", choices=LR_SCHEDULES,
                          default=default("lr_schedule"),
                          help="learning rate over the epochs: constant (the reference method), or a half cosine "
                               "from the rate down to 1 %% of it at --max-epochs (default: %(default)s)")
    training.add_argument("--recipe", choices=tuple(RECIPES), default=default("recipe"),
                          help="training recipe: log-euclidean (log-tensor targets, masked white-matter-weighted loss "
                               "with an anisotropy term, no batch norm, structure-tensor features, checkpoint chosen "
                               "by white-matter errors: learns on a CPU), log-euclidean-azimuth-free (the same without "
                               "the fibre's azimuth about B0 in the loss, with phase-cycle profile features: for "
                               "bSSFP where anatomy does not give the direction, docs/modalities.md), "
                               "log-euclidean-profile (the default plus phase-cycle profile features for pc-bSSFP: "
                               "the packaged pc-bSSFP model's recipe), "
                               "log-euclidean-input-shortcut (the output shortcut also sees the input: a DT -> DT "
                               "network starts as the identity; not for the autoencoder stage) or reference "
                               "(the published method: min/max targets, L1 + SSIM + GAN, batch norm) "
                               "(default: %(default)s)")
    training.add_argument("--early-stopping-patience", "--early_stopping_patience", dest="patience",
                          type=positive_int, default=default("patience"), metavar="EPOCHS",
                          help="stop after this many epochs without a lower validation loss (default: %(default)s)")
    training.add_argument("--split-fractions", "--split_fractions", dest="split_fractions", type=split_fractions,
                          default=",".join(str(value) for value in default("split_fractions")),
                          metavar="TRAIN,VAL,TEST",
                          help="subject fractions of the training, validation and test sets (validation keeps at "
                               "least one subject) (default: %(default)s)")
    training.add_argument("--seed", type=non_negative_int, default=default("seed"),
                          help="seed of the train/validation/test split, sampling and initialisation "
                               "(default: %(default)s)")

    run = parser.add_argument_group("Run control")
    run.add_argument("--stop-on-first-crash", "--stop_on_first_crash", dest="stop_on_first_crash",
                     action="store_true", default=default("stop_on_first_crash"),
                     help="abort at the first failing subject instead of continuing")
    run.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", default=default("dry_run"),
                     help="validate, discover and print the per-subject inputs; write nothing")
    run.add_argument("--reports-only", "--reports_only", dest="reports_only", action="store_true",
                     default=default("reports_only"),
                     help="only rebuild the participant reports (sub-<label>.html) and logs/CITATION.md from the "
                          "existing outputs")
    return parser


def parse_args(argv: Sequence[str] | None = None, describe: Callable[[], str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); usage errors raise ``SystemExit(64)``."""
    return build_parser(describe).parse_args(None if argv is None else list(argv))


