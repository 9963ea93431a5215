"""Self-describing release checkpoints: everything inference needs, nothing it does not.

A release checkpoint is a plain dict of tensors, str, int, float, bool, None, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without executing code. It holds the generator weights
(discriminator and optimiser states are dropped), the generator size and heads, the resolved run
configuration, the training stage, the input modality, the normalisation parameters (owned by
preprocessing, stored verbatim) and the input/output contract (channels, patch multiple, units, component
order) plus the package version that wrote it. :func:`load_release_checkpoint` returns that metadata as a
:class:`CheckpointMetadata`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a release checkpoint says about itself (every key but the weights), as typed fields.

    ``stage``: the training stage that wrote it (None when unknown); ``modality``: the input modality it was
    trained on; ``size``: the generator's :class:`GeneratorSize`; ``modalities``: its input heads;
    ``config``: the resolved run configuration (plain values: the run TOML plus ``split`` and ``patch_size``);
    ``normalization``: preprocessing's normalisation parameters (plain values); ``contract``: the input/output
    contract (:func:`io_contract`); ``version``: the package version that wrote it; ``payload``: the metadata
    dict as stored, which ``metadata[key]`` still reads.
    """

    stage: str | None
    modality: str
    size: GeneratorSize
    modalities: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    normalization: Mapping[str, Any] = field(default_factory=dict)
    contract: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None
    format_version: int = CHECKPOINT_FORMAT_VERSION
    payload: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "CheckpointMetadata":
        """Read stored metadata (``state_dict`` is ignored). Keys older checkpoints lack take defaults:
        no stage or version (None), the generator's norm ``"batch"`` and no structure scales, heads = the
        modality, empty config and normalisation, and the contract of this package's :func:`io_contract`.
        KeyError for a missing ``modality`` or generator description."""
        spec = payload["generator"]
        modality = payload["modality"]
        size = GeneratorSize(name=spec["name"], features=tuple(spec["features"]), head_hidden=spec["head_hidden"],
                             dropout=spec["dropout"], norm=spec.get("norm", "batch"),
                             structure_scales=tuple(spec.get("structure_scales", ())),
                             cycle_profile=bool(spec.get("cycle_profile", False)),
                             input_shortcut=bool(spec.get("input_shortcut", False)))
        contract = payload.get("contract")
        if contract is None:
            contract = io_contract(modality) if modality in MODALITY_CHANNELS else {}
        version = payload.get("version")
        return cls(stage=payload.get("stage"), modality=modality, size=size,
                   modalities=tuple(spec.get("modalities", (modality,))), config=dict(payload.get("config") or {}),
                   normalization=dict(payload.get("normalization") or {}), contract=dict(contract),
                   version=None if version is None else str(version),
                   format_version=int(payload.get("format_version", CHECKPOINT_FORMAT_VERSION)),
                   payload={key: value for key, value in payload.items() if key != "state_dict"})

    def __getitem__(self, key: str) -> Any:
        """The stored metadata value of ``key`` (the dict interface of earlier versions)."""
        return self.payload[key]

    @property
    def size_name(self) -> str:
        """The generator size's name (``"small"``, ``"reference"``...)."""
        return self.size.name

    @property
    def patch_size(self) -> int | None:
        """The patch edge (voxels) the model was trained on; None when the checkpoint does not say."""
        value = self.config.get("patch_size")
        return None if value is None else int(value)

    @property
    def recipe(self) -> str | None:
        """The training recipe (``training.recipes``) that made it; None when the checkpoint does not say."""
        return (self.config.get("training") or {}).get("recipe")

    @property
    def patch_multiple(self) -> int:
        """The multiple (voxels) every patch edge must be: the backbone's pooling factor; at least 1."""
        return max(int(self.contract.get("patch_multiple", 1)), 1)

    @property
    def input_channels(self) -> int:
        """Channels of the network input (C of (B, C, X, Y, Z))."""
        return int(self.contract.get("input_channels", MODALITY_CHANNELS.get(self.modality, 0)))

    @property
    def output_channels(self) -> int:
        """Channels of the network output: the tensor components."""
        return int(self.contract.get("output_channels", TENSOR_CHANNELS))


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
                            map_location: str | torch.device = "cpu") -> tuple[Generator, CheckpointMetadata]:
    """Read a release checkpoint; return the generator (eval mode) and its metadata (every key but the weights).

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
    metadata = CheckpointMetadata.from_dict(payload)
    generator = Generator(metadata.size, payload["generator"]["modalities"])
    try:
        generator.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise MissingInputError(f"model checkpoint {path} does not match its own generator description "
                                f"({first_line}); replace the file") from None
    generator.to(map_location).eval()
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
