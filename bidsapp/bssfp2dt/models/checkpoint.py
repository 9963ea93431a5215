"""Self-describing release checkpoints: everything inference needs, nothing it does not.

A release checkpoint is a plain dict of tensors, str, int, float, bool, None, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without executing code. It holds the generator weights
(discriminator and optimiser states are dropped), the generator size and heads, the resolved run
configuration, the training stage, the input modality, the normalisation parameters (owned by
preprocessing, stored verbatim) and the input/output contract (channels, patch multiple, units, component
order) plus the package version that wrote it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bssfp2dt import __version__
from bssfp2dt.errors import MissingInputError
from bssfp2dt.messages import path_problem
from bssfp2dt.models.generator import (
    MODALITY_CHANNELS, PATCH_MULTIPLE, TENSOR_CHANNELS, Generator, GeneratorSize, check_modality,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "bssfp2dt-release"
CHECKPOINT_FORMAT_VERSION = 1
TENSOR_UNITS = "mm^2/s"
COMPONENT_ORDER = "D11 D12 D13 D22 D23 D33"
_REQUIRED_KEYS = ("format", "format_version", "generator", "state_dict", "config", "stage", "modality",
                  "normalization", "contract", "version")


def io_contract(modality: str) -> dict[str, Any]:
    """The input/output contract of a generator fed with ``modality``: channel counts, the patch multiple
    (voxels), the units of the denormalised tensor and its component order."""
    return {"input_channels": check_modality(modality), "output_channels": TENSOR_CHANNELS,
            "patch_multiple": PATCH_MULTIPLE, "units": TENSOR_UNITS, "component_order": COMPONENT_ORDER}


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_release_checkpoint(path: Path | str, generator: Generator, *, config: dict[str, Any], stage: str,
                            modality: str, normalization: dict[str, Any]) -> Path:
    """Write ``generator`` (weights moved to CPU) and its metadata to ``path`` atomically; return ``path``.

    ``config``: the resolved run configuration; ``normalization``: preprocessing's normalisation
    parameters. Both must hold only plain values (tuples become lists); TypeError otherwise.
    """
    from bssfp2dt.io.atomic import atomic_path

    if modality not in generator.heads:
        raise ValueError(f"generator has no head for {modality!r}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "generator": {**_plain(dataclasses.asdict(generator.size), "generator size"),
                      "modalities": list(generator.modalities)},
        "state_dict": {key: value.detach().cpu().clone() for key, value in generator.state_dict().items()},
        "config": _plain(config, "config"),
        "stage": str(stage),
        "modality": modality,
        "normalization": _plain(normalization, "normalization"),
        "contract": io_contract(modality),
        "version": __version__,
    }
    with atomic_path(path) as temp_path:
        torch.save(payload, temp_path)
    logger.info("wrote release checkpoint %s (stage %s, modality %s)", path, stage, modality)
    return Path(path)


def load_release_checkpoint(path: Path | str, expected_sha256: str | None = None,
                            map_location: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Read a release checkpoint; return the generator (eval mode) and the metadata (every key but the weights).

    Raises MissingInputError (exit 66) with a one-line message when the file is absent, its sha256 differs
    from ``expected_sha256`` (hex), or it is truncated, corrupt or not a bssfp2dt release checkpoint.
    """
    path = Path(path)
    problem = path_problem(path, "file")
    if problem is not None:
        advice = "" if ";" in problem else "; give the path of a bssfp2dt release checkpoint file"
        raise MissingInputError(f"model checkpoint {path} {problem}{advice}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.lower():
            raise MissingInputError(f"model checkpoint {path} has sha256 {actual}, expected {expected_sha256}; "
                                    f"the file is corrupt or a different model: replace it")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise _load_error(path, error) from None
    _check_payload(path, payload)
    spec = payload["generator"]
    size = GeneratorSize(name=spec["name"], features=tuple(spec["features"]), head_hidden=spec["head_hidden"],
                         dropout=spec["dropout"], norm=spec.get("norm", "batch"),
                         structure_scales=tuple(spec.get("structure_scales", ())))
    generator = Generator(size, spec["modalities"])
    try:
        generator.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise MissingInputError(f"model checkpoint {path} does not match its own generator description "
                                f"({first_line}); replace the file") from None
    generator.to(map_location).eval()
    metadata = {key: value for key, value in payload.items() if key != "state_dict"}
    return generator, metadata


def _load_error(path: Path, error: Exception) -> MissingInputError:
    """The one-line error for a checkpoint torch cannot load with ``weights_only=True``.

    A file that holds Python objects beyond tensors and plain values (which unpickling could turn into
    running code) is refused as unsafe, naming the object; torch's own hint to load it without
    ``weights_only`` is not repeated. Anything else is a truncated or corrupt file.
    """
    text = str(error).strip()
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if text.startswith("Weights only load failed") and found:
        return MissingInputError(f"model checkpoint {path} is unsafe: it holds Python code objects "
                                 f"({found.group(1)}) besides weights, and bssfp2dt never loads those; use a "
                                 "checkpoint exported by bssfp2dt from a source you trust")
    # torch's own advice (load without weights_only) must not reach the user: keep only the cause.
    hints = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(hints)]
    reason = lines[0] if lines else type(error).__name__
    return MissingInputError(f"model checkpoint {path} cannot be read (truncated or corrupt: {reason}); "
                             f"replace the file")


def _check_payload(path: Path, payload: Any) -> None:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise MissingInputError(f"model checkpoint {path} is not a bssfp2dt release checkpoint; "
                                f"export one with the training mode")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise MissingInputError(f"model checkpoint {path} lacks {', '.join(missing)}; replace the file")
    if payload["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise MissingInputError(f"model checkpoint {path} has format version {payload['format_version']}, newer "
                                f"than this bssfp2dt ({__version__}) reads; update bssfp2dt")
    if payload["modality"] not in MODALITY_CHANNELS:
        raise MissingInputError(f"model checkpoint {path} names an unknown modality {payload['modality']!r}")


def _plain(value: Any, where: str) -> Any:
    """``value`` with tuples turned into lists; TypeError naming the key for anything not weights_only-safe."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {key!r}")
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, np.generic):  # preprocessing may hand over numpy scalars
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights_only checkpoint; "
                    f"convert it to plain values")
