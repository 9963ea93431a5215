"""The participant level's exit status from its subjects' failures.

A subject that fails does not stop the others; once all have run, the failures decide the exit code:
none -> 0; all of them user-facing errors (:class:`~bssfp2dt.errors.Bssfp2dtError`) -> that error is
raised again as one line, with its own exit code (66 for a data error, as discovery's checks give) when
they all share it; any internal error -> 1 (its traceback is in the subject's crash file).
"""
from __future__ import annotations

from typing import Mapping

from bssfp2dt.errors import EXIT_FAILURE, Bssfp2dtError
from bssfp2dt.messages import capped


def exit_status(failures: Mapping[str, BaseException]) -> int:
    """0 without failures, 1 when one is internal; raises a :class:`Bssfp2dtError` when all are user errors."""
    if not failures:
        return 0
    if not all(isinstance(error, Bssfp2dtError) for error in failures.values()):
        return EXIT_FAILURE
    errors = list(failures.values())
    codes = {error.exit_code for error in errors}
    if len(errors) == 1:
        raise errors[0]
    labels = capped(f"sub-{label}" for label in failures)
    combined = Bssfp2dtError(f"{len(errors)} subjects failed ({labels}); the first: {errors[0].message}")
    combined.exit_code = codes.pop() if len(codes) == 1 else EXIT_FAILURE
    raise combined
