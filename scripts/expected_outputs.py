#!/usr/bin/env python3
"""Print the sorted relative file list of an output tree, or compare it with a checked-in list.

Run-specific folder names (the ``YYYYMMDD-HHMMSS_<uuid4>`` of ``log/<run>/``) become ``<run>``, so two
runs of the same dataset give the same list. Standard library only (CI runs it outside the image).

    python scripts/expected_outputs.py OUTPUT_DIR > .circleci/expected_outputs.txt
    python scripts/expected_outputs.py OUTPUT_DIR --compare .circleci/expected_outputs.txt   # exit 1 on a difference
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

RUN_PLACEHOLDER = "<run>"
# bssfp2dt.cli.run.new_run_uuid(): time stamp, underscore, uuid4.
RUN_NAME = re.compile(r"^\d{8}-\d{6}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def normalise(relative: Path) -> str:
    """POSIX relative path with run-specific components replaced by ``<run>``."""
    return "/".join(RUN_PLACEHOLDER if RUN_NAME.match(part) else part for part in relative.parts)


def output_listing(root: Path, ignore: Iterable[str] = ()) -> list[str]:
    """Sorted, de-duplicated normalised paths of every file under ``root`` (symlinks count as files)."""
    root = Path(root)
    patterns = tuple(ignore)
    names = {normalise(path.relative_to(root)) for path in root.rglob("*") if path.is_file() or path.is_symlink()}
    return sorted(name for name in names if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns))


def compare(actual: Sequence[str], expected: Sequence[str]) -> list[str]:
    """Lines describing the differences (``- missing`` / ``+ unexpected``); empty when equal."""
    actual_set, expected_set = set(actual), set(expected)
    return ([f"- {name}" for name in sorted(expected_set - actual_set)]
            + [f"+ {name}" for name in sorted(actual_set - expected_set)])


def read_listing(path: Path) -> list[str]:
    """The non-empty, non-comment lines of an expected-outputs file."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--compare", type=Path, metavar="EXPECTED", help="exit 1 if the tree differs from this list")
    parser.add_argument("--ignore", nargs="*", default=[], metavar="GLOB", help="leave out matching paths")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"expected_outputs: {args.output_dir} is not a folder", file=sys.stderr)
        return 66
    listing = output_listing(args.output_dir, args.ignore)
    if args.compare is None:
        print("\n".join(listing))
        return 0
    differences = compare(listing, read_listing(args.compare))
    if differences:
        print(f"{args.output_dir} differs from {args.compare} (- missing, + unexpected):", file=sys.stderr)
        print("\n".join(differences), file=sys.stderr)
        return 1
    print(f"{args.output_dir}: {len(listing)} files, as in {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
