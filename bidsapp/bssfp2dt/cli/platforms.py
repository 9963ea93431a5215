"""Machine-readable descriptions of the ``bssfp2dt`` command line for platforms (Boutiques).

The Boutiques descriptor is derived from :func:`bssfp2dt.cli.parser.build_parser`, so it cannot drift
from the real options; ``bssfp2dt --bids-exec-spec`` prints it and ``scripts/make_boutiques.py``
writes it to ``boutiques/descriptor.json``. Standard library only: it runs before any heavy import.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from bssfp2dt import __version__, errors
from bssfp2dt.cli.parser import (PROGRAM, PrintExecSpecAction, build_parser, memory_mb, non_negative_int,
                                 positive_int)

BOUTIQUES_SCHEMA_VERSION = "0.5"
DOCKER_REPOSITORY = "bssfp2dt/bssfp2dt"
SOURCE_URL = "https://github.com/bssfp2dt/bssfp2dt"
# Path options naming something that must already exist (Boutiques "File"); other paths are created.
EXISTING_PATH_OPTIONS = frozenset({"bids_dir", "bids_filter_file", "model", "init_checkpoint"})
EXIT_CODE_DESCRIPTIONS = {
    errors.EXIT_FAILURE: "processing failed (or this build lacks the requested pipeline)",
    errors.EXIT_INVALID_BIDS: "bids_dir is not a valid BIDS dataset",
    errors.EXIT_BAD_LEVEL: "unknown analysis level (use participant or group)",
    errors.EXIT_NO_FILES_SELECTED: "the participant/session labels or the filter file selected no files",
    errors.EXIT_USAGE: "command-line usage error",
    errors.EXIT_MISSING_INPUT: "a required input file is missing or unreadable",
    errors.EXIT_CANNOT_CREATE_OUTPUT: "output_dir or work_dir cannot be created or written",
    errors.EXIT_IO_ERROR: "reading or writing a file failed",
}
# Outputs as templates over the output_dir value key (the participant naming lives in io/derivatives.py).
OUTPUT_FILES = (
    ("derivatives_dataset", "BIDS-Derivatives dataset", "[OUTPUT_DIR]", False),
    ("dataset_description", "Derivatives dataset_description.json", "[OUTPUT_DIR]/dataset_description.json",
     False),
    ("group_outputs", "Group-level tables and report (group level)", "[OUTPUT_DIR]/group", True),
)


def descriptor_json() -> str:
    """The descriptor as the JSON text written to ``boutiques/descriptor.json`` (2-space indent, newline)."""
    return json.dumps(boutiques_descriptor(), indent=2) + "\n"


def boutiques_descriptor(parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Boutiques 0.5 descriptor (a JSON-able dict) of ``parser`` (default: the ``bssfp2dt`` parser)."""
    parser = parser or build_parser()
    inputs = [_input(action) for action in _described_actions(parser)]
    groups = _groups(parser)
    return {
        "name": PROGRAM,
        "tool-version": __version__,
        "schema-version": BOUTIQUES_SCHEMA_VERSION,
        "description": parser.description,
        "author": "bssfp2dt developers",
        "url": SOURCE_URL,
        "command-line": " ".join([PROGRAM] + [item["value-key"] for item in inputs]),
        "container-image": {"type": "docker", "image": f"{DOCKER_REPOSITORY}:{__version__}"},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{"id": ident, "name": name, "path-template": template, "optional": optional}
                         for ident, name, template, optional in OUTPUT_FILES],
        "error-codes": [{"code": code, "description": text} for code, text in sorted(EXIT_CODE_DESCRIPTIONS.items())],
        "suggested-resources": {"cpu-cores": 8, "ram": 16, "walltime-estimate": 3600},
        "tags": {"domain": ["neuroimaging", "mri", "diffusion", "bssfp", "bids-app", "deep-learning"]},
    }


def _described_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    # --help, --version and --bids-exec-spec print something and exit: they are not run parameters.
    skipped = (argparse._HelpAction, argparse._VersionAction, PrintExecSpecAction)
    return [action for action in parser._actions if not isinstance(action, skipped)]


def _input(action: argparse.Action) -> dict[str, Any]:
    """One Boutiques input from one argparse action."""
    entry: dict[str, Any] = {"id": action.dest, "name": action.dest.replace("_", " ").capitalize(),
                             "value-key": f"[{action.dest.upper()}]",
                             "description": _help_text(action), "optional": not action.required}
    if action.option_strings:
        entry["command-line-flag"] = _preferred_flag(action.option_strings)
    if action.nargs == 0:  # store_true and count (-v): present or absent
        entry["type"] = "Flag"
        return entry
    if action.nargs in ("+", "*"):
        entry["list"] = True
    entry.update(_value_type(action))
    if action.dest == "analysis_level":
        entry["value-choices"] = ["participant", "group"]
    elif action.choices:
        entry["value-choices"] = list(action.choices)
    if action.default not in (None, [], argparse.SUPPRESS):
        entry["default-value"] = action.default
    return entry


def _value_type(action: argparse.Action) -> dict[str, Any]:
    converters: dict[Callable | None, dict[str, Any]] = {
        positive_int: {"type": "Number", "integer": True, "minimum": 1},
        non_negative_int: {"type": "Number", "integer": True, "minimum": 0},
        memory_mb: {"type": "String"},
    }
    if action.type in converters:
        return dict(converters[action.type])
    if action.type is Path and action.dest in EXISTING_PATH_OPTIONS:
        return {"type": "File"}
    return {"type": "String"}


def _preferred_flag(option_strings: list[str]) -> str:
    # The first long dashed spelling (--participant-label), the canonical one in the docs.
    long_flags = [flag for flag in option_strings if flag.startswith("--")]
    return long_flags[0] if long_flags else option_strings[0]


def _help_text(action: argparse.Action) -> str:
    text = action.help or action.dest
    if "%(default)s" in text:
        text = text.replace("%(default)s", str(action.default))
    return text


def _groups(parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    groups = []
    skipped = set(map(id, _described_actions(parser)))
    for group in parser._action_groups:
        members = [action.dest for action in group._group_actions if id(action) in skipped]
        if members and group.title not in ("positional arguments", "options", "optional arguments"):
            ident = "".join(word.lower() if index == 0 else word.capitalize()
                            for index, word in enumerate(group.title.replace("(", "").replace(")", "").split()))
            groups.append({"id": ident, "name": group.title, "members": members})
    return groups
