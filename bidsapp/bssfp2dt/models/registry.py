"""Packaged default models: ``data/models/models.toml`` and the choice of the checkpoint a run uses.

The registry file holds one ``[models.<input-modality>]`` table per modality with the model's ``id``,
``version``, checkpoint ``file`` (relative to the registry folder), ``sha256``, generator ``size`` and
summaries of its training, input/output contract and evaluation. :func:`resolve_model` decides which
checkpoint a run loads and which sha256 it must have; :func:`bssfp2dt.models.checkpoint.load_release_checkpoint`
checks that sha256 on load (a mismatch is exit 66).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bssfp2dt.errors import MissingInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

REGISTRY_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
REGISTRY_FILE = REGISTRY_DIR / "models.toml"
REGISTRY_FORMAT_VERSION = 1
SHA256_SUFFIX = ".sha256"
_REQUIRED_FIELDS = ("id", "version", "file", "sha256")


@dataclass(frozen=True)
class ModelEntry:
    """One packaged model.

    ``path``: absolute checkpoint path; ``sha256``: lower-case hex; ``training``, ``contract`` and
    ``evaluation``: the free-form summary tables of the registry entry.
    """

    modality: str
    id: str
    version: str
    path: Path
    sha256: str
    size: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    contract: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Mapping[str, Any] = field(default_factory=dict)


def load_registry(registry_file: Path | str = REGISTRY_FILE) -> dict[str, ModelEntry]:
    """Input modality -> :class:`ModelEntry` of every model listed in ``registry_file``.

    A missing registry file means no packaged model (empty dict); a malformed one is a
    MissingInputError naming the file, since the installation is then damaged.
    """
    registry_file = Path(registry_file)
    if not registry_file.is_file():
        return {}
    try:
        content = tomllib.loads(registry_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise MissingInputError(f"model registry {registry_file} cannot be read ({error}); "
                                "reinstall bssfp2dt") from None
    if content.get("format_version", REGISTRY_FORMAT_VERSION) > REGISTRY_FORMAT_VERSION:
        raise MissingInputError(f"model registry {registry_file} has format version {content['format_version']}, "
                                f"newer than this bssfp2dt reads; update bssfp2dt")
    entries = {}
    for modality, table in content.get("models", {}).items():
        missing = [name for name in _REQUIRED_FIELDS if not isinstance(table, dict) or name not in table]
        if missing:
            raise MissingInputError(f"model registry {registry_file}: [models.{modality}] lacks "
                                    f"{', '.join(missing)}; reinstall bssfp2dt")
        entries[modality] = ModelEntry(
            modality=modality, id=str(table["id"]), version=str(table["version"]),
            path=(registry_file.parent / table["file"]).resolve(), sha256=str(table["sha256"]).lower(),
            size=table.get("size"), training=dict(table.get("training", {})),
            contract=dict(table.get("contract", {})), evaluation=dict(table.get("evaluation", {})))
    return entries


def read_sha256_file(path: Path | str) -> str:
    """The hex digest in a ``sha256sum``-style file (``<hex>  <name>`` or just ``<hex>``), lower case."""
    path = Path(path)
    try:
        words = path.read_text().split()
    except (OSError, UnicodeDecodeError) as error:
        raise MissingInputError(f"checksum file {path} cannot be read ({error}); fix or delete it") from None
    digest = words[0].lower() if words else ""
    if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
        raise MissingInputError(f"checksum file {path} holds no sha256 hex digest; fix or delete it")
    return digest


def resolve_model(modality: str, model_path: Path | str | None = None,
                  registry_file: Path | str = REGISTRY_FILE) -> tuple[Path, str | None, str]:
    """The checkpoint to load for ``modality``, the sha256 it must have (None: unchecked) and its model id.

    Without ``model_path`` the packaged model of ``modality`` is used (MissingInputError, exit 66, when
    there is none or its file is absent). A user ``model_path`` (``--model``) is checked against
    ``<file>.sha256`` when that file sits next to it, else against the registry entry whose checkpoint
    has the same file name (a copy of a packaged model); otherwise it is not checked and its id is
    ``file:<name>``.
    """
    entries = load_registry(registry_file)
    if model_path is None:
        entry = entries.get(modality)
        if entry is None:
            raise MissingInputError(
                f"no packaged model for --input-modality {modality} in this build; give a checkpoint with "
                f"--model PATH, or train one with --train-stage (autoencoder, head, finetune)")
        if not entry.path.is_file():
            raise MissingInputError(f"packaged model {entry.id} ({entry.path}) is missing from this installation; "
                                    f"reinstall bssfp2dt or give a checkpoint with --model PATH")
        return entry.path, entry.sha256, entry.id
    model_path = Path(model_path).expanduser().resolve()
    checksum = model_path.with_name(model_path.name + SHA256_SUFFIX)
    matching = next((entry for entry in entries.values() if entry.path.name == model_path.name), None)
    if checksum.is_file():
        expected = read_sha256_file(checksum)
        identifier = matching.id if matching is not None and matching.sha256 == expected else f"file:{model_path.name}"
        return model_path, expected, identifier
    if matching is not None:
        return model_path, matching.sha256, matching.id
    logger.info("--model %s: no %s file next to it and no packaged model of that name, so its sha256 is not "
                "checked", model_path, SHA256_SUFFIX)
    return model_path, None, f"file:{model_path.name}"
