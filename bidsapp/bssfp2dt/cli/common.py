"""What every bssfp2dt command shares: logging set-up and turning errors into exit codes."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from bssfp2dt.errors import EXIT_FAILURE, Bssfp2dtError
from bssfp2dt.messages import LOG_DATE_FORMAT, LOG_FORMAT


def setup_logging(verbosity: int) -> None:
    """Configure stdlib logging once: 0 -> INFO for bssfp2dt (WARNING for others), >=1 -> DEBUG."""
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True)
    logging.getLogger("bssfp2dt").setLevel(level)


def run_reporting_errors(job: Callable[[], int], verbosity: int, program: str) -> int:
    """Run ``job`` and map failures to exit codes.

    A :class:`Bssfp2dtError` prints one line ``program: error: message``; any other exception is
    an internal error (exit 1). Tracebacks only with ``-vv`` (verbosity >= 2).
    """
    try:
        return job()
    except Bssfp2dtError as error:
        if verbosity >= 2:
            logging.getLogger("bssfp2dt").exception("traceback")
        print(f"{program}: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence of a CLI
        if verbosity >= 2:
            raise
        print(f"{program}: internal error: {type(error).__name__}: {error} (rerun with -vv for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
