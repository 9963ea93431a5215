"""``bssfp2dt-simulate``: write a simulated raw BIDS dataset with a known ground-truth tensor field."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from bssfp2dt import __version__
from bssfp2dt.cli.common import run_reporting_errors, setup_logging
from bssfp2dt.errors import EXIT_USAGE, OutputError, UsageError

PROGRAM = "bssfp2dt-simulate"
LOGGER = logging.getLogger("bssfp2dt.simulate")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's 2 is reserved by the BIDS-Apps spec: usage errors are 64
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description=(
        "Simulate a raw BIDS dataset of phase-cycled bSSFP, DWI and T1w with a known diffusion tensor "
        "field (ground truth in derivatives/bssfp2dt-truth)."))
    parser.add_argument("output_dir", type=Path, help="folder for the new BIDS dataset")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    design = parser.add_argument_group("dataset")
    design.add_argument("--subjects", type=int, default=1, help="number of subjects (default 1)")
    design.add_argument("--bssfp-sessions", type=int, default=3, help="pc-bSSFP sessions per subject (DOVE: 3)")
    design.add_argument("--dwi-sessions", type=int, default=4, help="DWI sessions per subject (DOVE: 4)")
    design.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    design.add_argument("--regime", default="realistic", choices=("realistic", "easy"),
                        help="realistic: physical fibre-orientation effect and noise; easy: orientation "
                             "effect x3-5 and high SNR")
    design.add_argument("--anatomy", default=None, choices=("mni", "procedural"),
                        help="MNI ICBM152 template (nilearn, the default) or a procedural geometric phantom")
    design.add_argument("--random-fibres", action="store_true",
                        help="random fibre direction per region (tells physics from anatomy)")
    design.add_argument("--phase-units", default="rad", choices=("rad", "arbitrary"),
                        help="store bSSFP phase in radians or as scanner integers 0..4095")
    design.add_argument("--phase-cycle-sign", type=int, default=1, choices=(1, -1),
                        help="direction of the scanner's phase cycling (-1 mirrors the profile)")
    design.add_argument("--no-reverse-pe", action="store_true", help="omit the reverse phase-encoding b0 in fmap/")
    size = parser.add_argument_group("size (for quick tests)")
    size.add_argument("--tiny", action="store_true",
                      help="a tiny dataset for tests: procedural phantom at scale 0.3, 4 mm margin, "
                           "30 DWI directions (about 20-30 voxels a side at 2 mm)")
    size.add_argument("--phantom-scale", type=float, default=None, help="size of the procedural phantom (1 = brain)")
    size.add_argument("--voxel-scale", type=float, default=1.0, help="multiply every voxel size (coarser grids)")
    size.add_argument("--margin-mm", type=float, default=None, help="field-of-view margin around the brain (mm)")
    run = parser.add_argument_group("run")
    run.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: tracebacks)")
    return parser


def config_from_args(args: argparse.Namespace):
    """Check the arguments and build a :class:`SimulationConfig` (raises UsageError)."""
    from bssfp2dt.simulation.dataset import SimulationConfig

    for flag, value, minimum in (("--subjects", args.subjects, 1), ("--bssfp-sessions", args.bssfp_sessions, 0),
                                 ("--dwi-sessions", args.dwi_sessions, 0)):
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--voxel-scale", args.voxel_scale), ("--phantom-scale", args.phantom_scale),
                        ("--margin-mm", args.margin_mm)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value}")
    if args.tiny and args.anatomy == "mni":
        raise UsageError("--tiny uses the procedural phantom; drop --anatomy mni or --tiny")
    anatomy = args.anatomy or ("procedural" if args.tiny else "mni")
    return SimulationConfig(
        n_subjects=args.subjects, bssfp_sessions=args.bssfp_sessions, dwi_sessions=args.dwi_sessions,
        seed=args.seed, regime=args.regime, anatomy=anatomy,
        phantom_scale=args.phantom_scale or (0.3 if args.tiny else 1.0), voxel_scale=args.voxel_scale,
        margin_mm=args.margin_mm or (4.0 if args.tiny else 10.0), phase_units=args.phase_units,
        phase_cycle_sign=args.phase_cycle_sign, random_fibres=args.random_fibres, reverse_pe=not args.no_reverse_pe,
        dwi_directions=(30, 30) if args.tiny else (30, 64))


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} exists and is not a folder: choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise OutputError(f"output folder {output_dir} is not empty: choose an empty one or add --overwrite")
    parent = output_dir.resolve().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True)
        except OSError as error:
            raise OutputError(f"cannot create {parent}: {error.strerror}; choose a writable output path") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def job() -> int:
        config = config_from_args(args)
        _check_output(args.output_dir, args.overwrite)
        from bssfp2dt.simulation.dataset import simulate_dataset

        started = time.perf_counter()
        path = simulate_dataset(args.output_dir, config, overwrite=args.overwrite, progress=not args.no_progress)
        LOGGER.info("wrote %d simulated subject(s) to %s in %.1f s (truth in %s)", config.n_subjects, path,
                    time.perf_counter() - started, path / "derivatives" / "bssfp2dt-truth")
        return 0

    return run_reporting_errors(job, args.verbose, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
