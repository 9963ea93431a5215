"""The packaged-model registry and the choice of checkpoint (``resolve_model``); digests against hashlib."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from bssfp2dt.errors import MissingInputError
from bssfp2dt.models.checkpoint import load_release_checkpoint, save_release_checkpoint
from bssfp2dt.models.generator import build_generator
from bssfp2dt.models.registry import REGISTRY_FILE, load_registry, read_sha256_file, resolve_model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def registry(tmp_path):
    """A registry folder with one packaged pc-bssfp model; returns (registry file, checkpoint)."""
    torch.manual_seed(0)
    checkpoint = save_release_checkpoint(tmp_path / "models" / "bssfp2dt-pcbssfp-tiny-1.pt",
                                         build_generator("tiny", ["pc-bssfp"]), config={}, stage="finetune",
                                         modality="pc-bssfp", normalization={})
    registry_file = tmp_path / "models" / "models.toml"
    registry_file.write_text(f"""format_version = 1
[models.pc-bssfp]
id = "bssfp2dt-pcbssfp-tiny"
version = "1.0"
file = "{checkpoint.name}"
sha256 = "{sha256(checkpoint).upper()}"
size = "tiny"
[models.pc-bssfp.training]
stages = ["autoencoder", "head", "finetune"]
[models.pc-bssfp.contract]
input_channels = 24
""")
    return registry_file, checkpoint


def test_the_packaged_registry_lists_only_present_files_with_their_sha256():
    assert REGISTRY_FILE.is_file()
    for modality, entry in load_registry().items():
        assert entry.path.is_file(), entry.path
        assert sha256(entry.path) == entry.sha256, modality
        _, metadata = load_release_checkpoint(entry.path, entry.sha256)
        assert metadata["modality"] == modality


def test_registry_entries_are_read(registry):
    registry_file, checkpoint = registry
    entry = load_registry(registry_file)["pc-bssfp"]
    assert (entry.id, entry.version, entry.size, entry.path) == ("bssfp2dt-pcbssfp-tiny", "1.0", "tiny", checkpoint)
    assert entry.sha256 == sha256(checkpoint)  # stored upper case, compared lower case
    assert entry.training["stages"] == ["autoencoder", "head", "finetune"] and entry.contract["input_channels"] == 24


def test_the_packaged_model_is_chosen_and_verified(registry):
    registry_file, checkpoint = registry
    path, expected, model_id = resolve_model("pc-bssfp", registry_file=registry_file)
    assert (path, expected, model_id) == (checkpoint, sha256(checkpoint), "bssfp2dt-pcbssfp-tiny")
    load_release_checkpoint(path, expected)


def test_no_packaged_model_names_the_modality_and_the_way_out(registry):
    registry_file, checkpoint = registry
    with pytest.raises(MissingInputError, match=r"t1w.*--model PATH.*--train-stage") as raised:
        resolve_model("t1w", registry_file=registry_file)
    assert raised.value.exit_code == 66
    checkpoint.unlink()
    with pytest.raises(MissingInputError, match="missing from this installation"):
        resolve_model("pc-bssfp", registry_file=registry_file)
    with pytest.raises(MissingInputError, match="--model"):
        resolve_model("pc-bssfp", registry_file=registry_file.with_name("absent.toml"))


def test_a_user_model_is_checked_against_a_sha256_file_next_to_it(registry, tmp_path):
    registry_file, checkpoint = registry
    user = tmp_path / "mine.pt"
    shutil.copy(checkpoint, user)
    assert resolve_model("pc-bssfp", user, registry_file) == (user, None, "file:mine.pt")
    (tmp_path / "mine.pt.sha256").write_text(f"{sha256(user)}  mine.pt\n")  # sha256sum format
    path, expected, model_id = resolve_model("pc-bssfp", user, registry_file)
    assert (expected, model_id) == (sha256(user), "file:mine.pt")
    load_release_checkpoint(path, expected)
    (tmp_path / "mine.pt.sha256").write_text("f" * 64 + "\n")
    _, expected, _ = resolve_model("pc-bssfp", user, registry_file)
    with pytest.raises(MissingInputError, match="sha256") as raised:
        load_release_checkpoint(user, expected)
    assert raised.value.exit_code == 66
    (tmp_path / "mine.pt.sha256").write_text("not a digest\n")
    with pytest.raises(MissingInputError, match="no sha256 hex digest"):
        resolve_model("pc-bssfp", user, registry_file)


def test_a_copy_of_a_packaged_model_is_checked_against_its_entry(registry, tmp_path):
    registry_file, checkpoint = registry
    copy = tmp_path / checkpoint.name
    shutil.copy(checkpoint, copy)
    assert resolve_model("pc-bssfp", copy, registry_file) == (copy, sha256(checkpoint), "bssfp2dt-pcbssfp-tiny")
    copy.write_bytes(copy.read_bytes()[:-10])  # a damaged copy
    _, expected, _ = resolve_model("pc-bssfp", copy, registry_file)
    with pytest.raises(MissingInputError, match="sha256"):
        load_release_checkpoint(copy, expected)


def test_a_malformed_registry_is_reported(tmp_path):
    broken = tmp_path / "models.toml"
    broken.write_text("[models.pc-bssfp\n")
    with pytest.raises(MissingInputError, match="cannot be read"):
        load_registry(broken)
    broken.write_text('[models.t1w]\nid = "x"\nversion = "1"\n')
    with pytest.raises(MissingInputError, match="lacks file, sha256"):
        load_registry(broken)
    broken.write_text("format_version = 99\n")
    with pytest.raises(MissingInputError, match="newer"):
        load_registry(broken)


def test_sha256_file_formats(tmp_path):
    digest = "A" * 64
    (tmp_path / "a").write_text(digest)
    assert read_sha256_file(tmp_path / "a") == "a" * 64
