#!/usr/bin/env python3
"""Write boutiques/descriptor.json from the CLI parser (``--check``: exit 1 if the file is out of date).

    python scripts/make_boutiques.py            # regenerate after changing cli/parser.py
    python scripts/make_boutiques.py --check    # CI: fail when the checked-in file is stale
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bssfp2dt.cli.platforms import descriptor_json

DESCRIPTOR = Path(__file__).resolve().parents[1] / "boutiques" / "descriptor.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--output", type=Path, default=DESCRIPTOR, help="descriptor path (default: %(default)s)")
    args = parser.parse_args(argv)
    text = descriptor_json()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date: run python scripts/make_boutiques.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
