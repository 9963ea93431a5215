"""Generator, discriminator and release checkpoints: sizes, shapes, contracts, round trips, damaged files."""
from __future__ import annotations

import pytest
import torch

import bssfp2dt
from bssfp2dt.errors import EXIT_MISSING_INPUT, MissingInputError
from bssfp2dt.models.checkpoint import (CheckpointMetadata, io_contract, load_release_checkpoint,
                                       save_release_checkpoint, sha256_file)
from bssfp2dt.models.discriminator import build_discriminator
from bssfp2dt.models.generator import (
    GENERATOR_SIZES, MODALITY_CHANNELS, Generator, InputHead, build_generator, count_parameters,
)

ALL_MODALITIES = list(MODALITY_CHANNELS)


def _conv_parameters(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel ** 3 + c_out


def test_reference_size_is_the_published_51_million_parameters_counted_without_memory():
    with torch.device("meta"):
        generator = build_generator("reference", ALL_MODALITIES)
    assert next(generator.parameters()).is_meta
    assert 50_000_000 <= count_parameters(generator) <= 52_000_000


def test_small_and_tiny_sizes_fit_their_budgets():
    with torch.device("meta"):
        assert 1_000_000 <= count_parameters(build_generator("small", ALL_MODALITIES)) <= 3_000_000
        assert count_parameters(build_generator("tiny", ALL_MODALITIES)) < 100_000


@pytest.mark.parametrize("c_in", [24, 6])
def test_head_parameter_count_matches_three_convolutions_instance_norm_and_projection(c_in):
    hidden = 24
    expected = (_conv_parameters(c_in, hidden, 3) + _conv_parameters(hidden, hidden, 3)
                + _conv_parameters(hidden, 24, 3) + 2 * (hidden + hidden + 24))
    if c_in != 24:
        expected += _conv_parameters(c_in, 24, 1)
    assert count_parameters(InputHead(c_in, hidden)) == expected


def test_every_head_maps_a_32_cube_patch_to_the_six_tensor_channels():
    torch.manual_seed(0)
    generator = build_generator("tiny", ALL_MODALITIES).eval()
    for modality, channels in MODALITY_CHANNELS.items():
        with torch.no_grad():
            out = generator(torch.rand(2, channels, 32, 32, 32), modality)
        assert out.shape == (2, 6, 32, 32, 32)
        assert torch.isfinite(out).all()


def test_generator_rejects_wrong_channels_patch_sides_and_unknown_heads():
    generator = build_generator("tiny", ["t1w"])
    with pytest.raises(ValueError, match="multiples of 16"):
        generator(torch.rand(1, 6, 24, 32, 32), "t1w")
    with pytest.raises(ValueError, match=r"\(B, 6, X, Y, Z\)"):
        generator(torch.rand(1, 24, 16, 16, 16), "t1w")
    with pytest.raises(ValueError, match="no head"):
        generator(torch.rand(1, 24, 16, 16, 16), "pc-bssfp")
    with pytest.raises(ValueError, match="unknown modality"):
        generator.add_head("flair")


def test_add_head_keeps_an_existing_head_and_adds_a_new_one():
    generator = build_generator("tiny", ["dwi-tensor"])
    existing = generator.heads["dwi-tensor"]
    assert generator.add_head("dwi-tensor") is existing
    generator.add_head("bssfp")
    assert generator.modalities == ("dwi-tensor", "bssfp")
    assert generator.heads["bssfp"].body[0].in_channels == 24


def test_frozen_batch_norm_stays_in_eval_mode_after_train():
    generator = build_generator("tiny", ["t1w"])
    name = "backbone.conv_0.conv_0.adn.N"
    generator.freeze_batch_norm([name])
    generator.train()
    modules = dict(generator.named_modules())
    assert not modules[name].training
    assert modules["backbone.conv_0.conv_1.adn.N"].training


@pytest.mark.parametrize("modality, channels", [("pc-bssfp", 30), ("bssfp", 30), ("t1w", 12), ("dwi-tensor", 12)])
def test_discriminator_takes_source_plus_tensor_channels_and_returns_a_patch_map(modality, channels):
    discriminator = build_discriminator("tiny", [modality])
    assert discriminator.first_layers[modality][0].in_channels == channels
    convolutions = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convolutions) == 5
    logits = discriminator(torch.rand(2, MODALITY_CHANNELS[modality], 16, 16, 16), torch.rand(2, 6, 16, 16, 16),
                           modality)
    assert logits.shape == (2, 1, 2, 2, 2)


def _trained_like_generator() -> Generator:
    torch.manual_seed(3)
    generator = build_generator("tiny", ["t1w", "dwi-tensor"])
    with torch.no_grad():  # move the batch-norm statistics away from their defaults
        generator(torch.rand(2, 6, 16, 16, 16), "t1w")
    return generator.eval()


def _save(path, generator):
    return save_release_checkpoint(path, generator, config={"training": {"patch": (16, 16, 16), "lr": 1e-4}},
                                   stage="direct", modality="t1w",
                                   normalization={"tensor": {"diagonal": [0.0, 3e-3], "offdiagonal": [-1e-3, 1e-3]}})


def test_release_checkpoint_round_trips_with_weights_only_load(tmp_path):
    generator = _trained_like_generator()
    path = _save(tmp_path / "model.pt", generator)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind

    raw = torch.load(path, weights_only=True)
    assert "discriminator" not in raw and "optimizer" not in str(raw.keys())
    loaded, metadata = load_release_checkpoint(path, expected_sha256=sha256_file(path))
    x = torch.rand(1, 6, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, "t1w"), generator(x, "t1w"))
    assert metadata["contract"] == {"input_channels": 6, "output_channels": 6, "patch_multiple": 16,
                                    "units": "mm^2/s", "component_order": "D11 D12 D13 D22 D23 D33"}
    assert metadata["version"] == bssfp2dt.__version__
    assert metadata["stage"] == "direct" and metadata["modality"] == "t1w"
    assert metadata["config"]["training"]["patch"] == [16, 16, 16]
    assert metadata["normalization"]["tensor"]["diagonal"] == [0.0, 3e-3]
    assert metadata["generator"]["modalities"] == ["t1w", "dwi-tensor"]



def test_checkpoint_metadata_is_typed(tmp_path):
    generator = _trained_like_generator()
    path = save_release_checkpoint(tmp_path / "model.pt", generator,
                                   config={"patch_size": 32, "training": {"recipe": "log-euclidean"}},
                                   stage="direct", modality="t1w", normalization={"tensor": {"diagonal": [0, 1]}})
    _, metadata = load_release_checkpoint(path)
    assert isinstance(metadata, CheckpointMetadata)
    assert (metadata.stage, metadata.modality, metadata.version) == ("direct", "t1w", bssfp2dt.__version__)
    assert metadata.size == generator.size and metadata.size_name == generator.size.name
    assert metadata.modalities == ("t1w", "dwi-tensor")
    assert (metadata.patch_size, metadata.recipe, metadata.patch_multiple) == (32, "log-euclidean", 16)
    assert (metadata.input_channels, metadata.output_channels) == (6, 6)
    assert metadata.normalization == {"tensor": {"diagonal": [0, 1]}}
    assert metadata["stage"] == "direct" and "state_dict" not in metadata.payload  # the dict interface stays


def test_checkpoint_metadata_of_an_old_checkpoint_takes_defaults():
    old = {"generator": {"name": "small", "features": [8, 16, 32, 64, 128, 8], "head_hidden": 16, "dropout": 0.1},
           "modality": "pc-bssfp", "state_dict": {}}
    metadata = CheckpointMetadata.from_dict(old)
    assert metadata.size == GENERATOR_SIZES["small"]  # norm "batch", no structure scales
    assert metadata.modalities == ("pc-bssfp",) and metadata.stage is None and metadata.version is None
    assert metadata.patch_size is None and metadata.recipe is None
    assert metadata.contract == io_contract("pc-bssfp") and metadata.input_channels == 24
    assert metadata.config == {} and metadata.normalization == {}

def test_sha256_mismatch_is_a_missing_input_error_naming_the_file(tmp_path):
    path = _save(tmp_path / "model.pt", _trained_like_generator())
    with pytest.raises(MissingInputError) as raised:
        load_release_checkpoint(path, expected_sha256="0" * 64)
    assert raised.value.exit_code == EXIT_MISSING_INPUT == 66
    assert str(path) in raised.value.message and "\n" not in raised.value.message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_or_absent_checkpoint_is_a_one_line_missing_input_error(tmp_path, damage):
    path = _save(tmp_path / "model.pt", _trained_like_generator())
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        path.unlink()
    with pytest.raises(MissingInputError) as raised:
        load_release_checkpoint(path)
    assert raised.value.exit_code == 66
    assert str(path) in raised.value.message and "\n" not in raised.value.message


def test_checkpoint_of_another_kind_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(MissingInputError, match="not a bssfp2dt release checkpoint"):
        load_release_checkpoint(path)


def test_config_with_objects_that_weights_only_cannot_read_is_refused(tmp_path):
    with pytest.raises(TypeError, match="config.when"):
        save_release_checkpoint(tmp_path / "m.pt", _trained_like_generator(), config={"when": object()},
                                stage="direct", modality="t1w", normalization={})
    assert not any(tmp_path.iterdir())


def test_output_offset_is_what_a_network_with_silent_features_predicts():
    generator = build_generator("tiny", ["t1w"]).eval()
    offset = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    generator.set_output_offset(offset)
    torch.nn.init.zeros_(generator.backbone.final_conv.weight)
    with torch.no_grad():
        prediction = generator(torch.rand(1, 6, 16, 16, 16), "t1w")
    assert torch.allclose(prediction, torch.tensor(offset).reshape(1, 6, 1, 1, 1).expand_as(prediction))
