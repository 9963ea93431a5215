"""User-facing errors: each carries a one-line message and its BIDS execution-spec exit code.

The CLI turns these into the exit code and prints only the message (a traceback only with ``-vv``).
"""
from __future__ import annotations

# BIDS-Apps execution specification (recommended exit codes).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_BIDS = 16
EXIT_BAD_LEVEL = 17
EXIT_NO_FILES_SELECTED = 18
EXIT_USAGE = 64
EXIT_MISSING_INPUT = 66
EXIT_CANNOT_CREATE_OUTPUT = 73
EXIT_IO_ERROR = 74


class Bssfp2dtError(Exception):
    """Base class of every error a user can cause; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(Bssfp2dtError):
    """A bad command-line argument or combination of arguments."""

    exit_code = EXIT_USAGE


class InvalidBIDSError(Bssfp2dtError):
    """The input dataset failed BIDS validation."""

    exit_code = EXIT_INVALID_BIDS


class AnalysisLevelError(Bssfp2dtError):
    """An analysis level other than participant or group."""

    exit_code = EXIT_BAD_LEVEL


class NoFilesSelectedError(Bssfp2dtError):
    """The participant/session labels or the filter file selected no files."""

    exit_code = EXIT_NO_FILES_SELECTED


class MissingInputError(Bssfp2dtError):
    """The dataset is valid BIDS but a required file is missing or unreadable."""

    exit_code = EXIT_MISSING_INPUT


class OutputError(Bssfp2dtError):
    """The output (or work) directory cannot be created or written."""

    exit_code = EXIT_CANNOT_CREATE_OUTPUT


class InputOutputError(Bssfp2dtError):
    """Reading or writing a file failed for a reason outside the user's arguments."""

    exit_code = EXIT_IO_ERROR
