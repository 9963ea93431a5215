"""Training data: session cross-pairing, the subject split, normalisation on training subjects only, the
network channels of each modality and the seeded TorchIO queues, on small synthetic preprocessed sessions."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from helpers import AFFINE, SHAPE, save_image, synthetic_subject

from bssfp2dt.errors import UsageError
from bssfp2dt.preprocessing.sessions import PreprocessedSubject
from bssfp2dt.training import data

@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> list[PreprocessedSubject]:
    root = tmp_path_factory.mktemp("preproc")
    return [synthetic_subject(root, "01", 3, 4, seed=1), synthetic_subject(root, "02", 1, 2, seed=2),
            synthetic_subject(root, "03", 2, 1, seed=3, scale=5.0)]


# --------------------------------------------------------------------------- pairing
@pytest.mark.parametrize("modality, expected", [("pc-bssfp", 3 * 4 + 1 * 2 + 2 * 1), ("bssfp", 16),
                                                ("t1w", 1 * 4 + 1 * 2 + 1 * 1), ("dwi-tensor", 4 + 2 + 1)])
def test_pair_count_is_input_sessions_times_dwi_sessions_per_subject(subjects, modality, expected):
    pairs = data.pair_subjects(subjects, modality)
    assert len(pairs) == expected
    assert len(set(pairs)) == len(pairs)  # no duplicate pair
    for pair in pairs:
        assert pair.input_path.exists() and pair.target_path.name.startswith("tensor_ses")
        assert f"sub-{pair.subject}" == pair.target_path.parent.name == pair.input_path.parent.name
        if modality == "dwi-tensor":
            assert pair.input_path == pair.target_path  # the autoencoder reproduces its input


def test_dove_subject_gives_twelve_pairs_covering_every_session_combination(subjects):
    pairs = data.pair_sessions(subjects[0], "pc-bssfp")
    assert sorted((p.input_session, p.target_session) for p in pairs) == \
        sorted((str(i), str(j)) for i in range(1, 4) for j in range(1, 5))


# --------------------------------------------------------------------------- split
def test_split_is_disjoint_complete_and_reproducible():
    labels = [f"{i:02d}" for i in range(20)]
    split = data.split_subjects(labels, seed=7)
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert [len(p) for p in parts] == [14, 3, 3]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert set().union(*parts) == set(labels)
    assert data.split_subjects(list(reversed(labels)), seed=7) == split  # order of discovery is irrelevant
    assert len({data.split_subjects(labels, seed=s).train for s in range(5)}) > 1
    assert data.Split.from_dict(json.loads(json.dumps(split.to_dict()))) == split


@pytest.mark.parametrize("n, sizes", [(1, (1, 1, 0)), (2, (1, 1, 0)), (3, (2, 1, 0)), (4, (2, 1, 1)),
                                      (7, (5, 1, 1))])
def test_small_splits_keep_one_training_and_one_validation_subject(n, sizes):
    split = data.split_subjects([f"s{i}" for i in range(n)], seed=0)
    assert (len(split.train), len(split.validation), len(split.test)) == sizes
    if n == 1:
        assert split.validation == split.train  # documented: validation reuses the only subject
    else:
        assert not set(split.train) & set(split.validation + split.test)


def test_bad_fractions_are_a_usage_error():
    with pytest.raises(UsageError):
        data.split_subjects(["a", "b"], 0, (0.5, 0.4, 0.4))
    with pytest.raises(UsageError):
        data.split_subjects([], 0)


# --------------------------------------------------------------------------- normalisation
def _in_mask(subject, attribute, channels=None):
    values = []
    for session in subject.sessions:
        path = getattr(session, attribute)
        if path is None:
            continue
        mask = np.asarray(nib.load(session.brain_mask).dataobj) > 0
        volume = np.asarray(nib.load(path).dataobj)[mask]
        values.append(volume if channels is None else volume[:, channels])
    return np.concatenate([v.ravel() for v in values])


def test_normalisation_is_the_min_max_over_training_subjects_only(subjects):
    fitted = data.fit_training_normalization(subjects[:2])
    train = subjects[:2]
    magnitude = np.concatenate([_in_mask(s, "bssfp", slice(0, 24, 2)) for s in train])
    diagonal = np.concatenate([_in_mask(s, "tensor", [0, 3, 5]) for s in train])
    off = np.concatenate([_in_mask(s, "tensor", [1, 2, 4]) for s in train])
    t1w = np.concatenate([_in_mask(s, "t1w") for s in train])
    assert (fitted.magnitude.low, fitted.magnitude.high) == pytest.approx((magnitude.min(), magnitude.max()))
    assert (fitted.tensor_diagonal.low, fitted.tensor_diagonal.high) == pytest.approx((diagonal.min(), diagonal.max()))
    assert (fitted.tensor_offdiagonal.low, fitted.tensor_offdiagonal.high) == pytest.approx((off.min(), off.max()))
    assert (fitted.t1w.low, fitted.t1w.high) == pytest.approx((t1w.min(), t1w.max()))
    # Subject 03 (5x intensities) is outside the training set, so it must not widen any range.
    assert data.fit_training_normalization(subjects).magnitude.high > 2 * fitted.magnitude.high


def test_ranges_of_the_starting_checkpoint_are_kept(subjects):
    from bssfp2dt.preprocessing.normalization import Normalization, Range

    base = Normalization(tensor_diagonal=Range(0.0, 1.0), tensor_offdiagonal=Range(-1.0, 1.0))
    fitted = data.fit_training_normalization(subjects[:1], base)
    assert fitted.tensor_diagonal == base.tensor_diagonal and fitted.tensor_offdiagonal == base.tensor_offdiagonal
    assert fitted.magnitude is not None and fitted.t1w is not None


# --------------------------------------------------------------------------- network channels
@pytest.mark.parametrize("modality", ["pc-bssfp", "bssfp", "t1w", "dwi-tensor"])
def test_subject_channels_are_the_normalised_volumes_cropped_to_the_mask(subjects, modality):
    normalization = data.fit_training_normalization(subjects)
    pair = data.pair_sessions(subjects[0], modality)[0]
    subject = data.pair_subject(pair, modality, normalization, patch_size=16)
    subject.load()
    mask = np.asarray(nib.load(pair.mask_paths[0]).dataobj) > 0
    box = data.mask_bounding_box(mask)
    crop = tuple(slice(a, b) for a, b in box)
    source = np.asarray(nib.load(pair.input_path).dataobj, dtype=np.float64)[crop]
    in_mask = mask[crop]
    padded = subject["input"].data.numpy()
    # The crop is zero-padded at the far end to a multiple of 16, so whole volumes pass through the network.
    assert padded.shape[1:] == tuple(-(-(b - a) // 16) * 16 for a, b in box)
    network_input = padded[(slice(None),) + tuple(slice(0, b - a) for a, b in box)]
    assert not padded.any(axis=0).sum() - network_input.any(axis=0).sum()
    assert network_input.shape[0] == {"pc-bssfp": 24, "bssfp": 24, "t1w": 6, "dwi-tensor": 6}[modality]
    assert np.all(network_input[:, ~in_mask] == 0)
    if modality == "pc-bssfp":
        magnitude = normalization.magnitude
        np.testing.assert_allclose(network_input[0][in_mask], (source[..., 0][in_mask] - magnitude.low)
                                   / (magnitude.high - magnitude.low), rtol=1e-5)
        phase = normalization.phase
        np.testing.assert_allclose(network_input[23][in_mask], (source[..., 23][in_mask] - phase.low)
                                   / (phase.high - phase.low), rtol=1e-5, atol=1e-6)
    elif modality == "bssfp":  # the first cycle's magnitude and phase repeated 12 times
        np.testing.assert_array_equal(network_input[0::2], np.repeat(network_input[:1], 12, axis=0))
        np.testing.assert_array_equal(network_input[1::2], np.repeat(network_input[1:2], 12, axis=0))
    elif modality == "t1w":
        t1w = normalization.t1w
        expected = (source[in_mask] - t1w.low) / (t1w.high - t1w.low)
        for channel in network_input:
            np.testing.assert_allclose(channel[in_mask], expected, rtol=1e-5)
    target = subject["target"].data.numpy()[(slice(None),) + tuple(slice(0, b - a) for a, b in box)]
    diagonal = normalization.tensor_diagonal
    truth = np.asarray(nib.load(pair.target_path).dataobj, dtype=np.float64)[crop]
    np.testing.assert_allclose(target[3][in_mask], (truth[..., 3][in_mask] - diagonal.low)
                               / (diagonal.high - diagonal.low), rtol=1e-5)
    if modality == "dwi-tensor":
        np.testing.assert_array_equal(network_input, target)
    # The affine follows the crop: voxel (0, 0, 0) of the crop is voxel box[:, 0] of the grid.
    np.testing.assert_allclose(subject["input"].affine[:3, 3], AFFINE[:3, :3] @ [a for a, _ in box])


def test_volumes_smaller_than_the_patch_are_padded(subjects):
    normalization = data.fit_training_normalization(subjects)
    pair = data.pair_sessions(subjects[1], "t1w")[0]
    subject = data.pair_subject(pair, "t1w", normalization, patch_size=32)
    assert subject["input"].shape[1:] == (32, 32, 32) and subject["mask"].shape == (1, 32, 32, 32)


def test_patch_size_must_be_a_multiple_of_16():
    assert data.check_patch_size(32) == 32
    for bad in (0, 24, 40):
        with pytest.raises(UsageError, match="--patch-size"):
            data.check_patch_size(bad)


# --------------------------------------------------------------------------- queues
def _module(subjects, **options) -> data.TrainingData:
    normalization = data.fit_training_normalization(subjects[:2])
    return data.TrainingData(data.pair_subjects(subjects[:2], "pc-bssfp"), data.pair_subjects(subjects[2:], "pc-bssfp"),
                             "pc-bssfp", normalization, patch_size=16, batch_size=4, seed=3, **options)


def test_training_queue_yields_batches_of_patches_and_is_seeded_by_epoch(subjects):
    module = _module(subjects, samples_per_volume=2)
    batches = list(module.train_dataloader())
    assert len(batches) == 14 * 2 // 4  # 14 pairs x 2 patches, batch 4
    assert batches[0]["input"].shape == (4, 24, 16, 16, 16) and batches[0]["target"].shape == (4, 6, 16, 16, 16)
    torch.manual_seed(999)  # the global random state must not matter
    again = list(module.train_queue(0))
    assert all(torch.equal(a[key][tio.DATA], b[key][tio.DATA]) for a, b in zip(again, module.train_queue(0))
               for key in ("input", "target"))
    assert torch.equal(torch.stack([p["target"][tio.DATA] for p in again[:4]]), batches[0]["target"])
    other = list(module.train_queue(1))
    assert not all(torch.equal(a["target"][tio.DATA], b["target"][tio.DATA]) for a, b in zip(again, other))


def test_target_patches_are_crops_of_the_normalised_target_and_augmentation_spares_them(subjects):
    module = _module(subjects, samples_per_volume=2)
    full = {}
    for pair in module.train_pairs:
        subject = data.pair_subject(pair, "pc-bssfp", module.normalization, 16)
        subject.load()
        full[(pair.subject, str(pair.input_session), str(pair.target_session))] = subject
    changed = 0
    for patch in module.train_queue(0):
        source = full[(patch["subject"], patch["input_session"], patch["target_session"])]
        i, j, k, *_ = patch[tio.LOCATION].tolist()
        crop = (slice(None), slice(i, i + 16), slice(j, j + 16), slice(k, k + 16))
        assert torch.equal(patch["target"][tio.DATA], source["target"].data[crop])
        assert torch.equal(patch["mask"][tio.DATA], source["mask"].data[crop])
        changed += not torch.equal(patch["input"][tio.DATA], source["input"].data[crop])
    assert 0 < changed < 28  # augmentation (p 0.25 each) touches some inputs, not all


def test_validation_patches_are_the_same_every_epoch(subjects):
    module = _module(subjects)
    first = list(module.val_dataloader())
    torch.manual_seed(5)
    second = list(module.val_dataloader())
    assert len(first) == 2 * 4 // 4  # subject 03 has 2 pairs, 4 patches each
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(first, second))


def test_sessions_on_different_grids_are_not_paired(tmp_path, subjects, caplog):
    import dataclasses

    subject = subjects[1]  # bSSFP in session 1, DWI in sessions 1 and 2
    other_mask = save_image(np.ones((SHAPE[0] + 2,) + SHAPE[1:]), tmp_path / "other_mask.nii.gz", np.uint8)
    moved = dataclasses.replace(subject.sessions[1], brain_mask=other_mask)
    changed = PreprocessedSubject(subject.subject, (subject.sessions[0], moved))
    pairs = data.pair_sessions(changed, "pc-bssfp")
    assert [(p.input_session, p.target_session) for p in pairs] == [("1", "1")]
    assert "different grids" in caplog.text


def test_cached_subjects_give_the_same_patches_and_stay_unaugmented(subjects):
    cached, lazy = _module(subjects, samples_per_volume=2), _module(subjects, samples_per_volume=2, cache_mb=0)
    for epoch in (0, 1):
        for a, b in zip(cached.train_queue(epoch), lazy.train_queue(epoch)):
            assert all(torch.equal(a[key][tio.DATA], b[key][tio.DATA]) for key in ("input", "target", "mask"))
    assert len(cached._cache) == len(cached.train_pairs) and not lazy._cache
    for pair, subject in cached._cache.items():  # augmentation worked on copies
        fresh = data.pair_subject(pair, "pc-bssfp", cached.normalization, 16)
        fresh.load()
        assert torch.equal(subject["input"].data, fresh["input"].data)
        assert data.volume_bytes(subject) == data.estimated_bytes(fresh)


def test_cache_keeps_only_what_fits_its_budget(subjects):
    probe = _module(subjects)
    sizes = [data.estimated_bytes(subject) for subject in probe.subjects(probe.train_pairs[:1])]
    module = _module(subjects, cache_mb=2.5 * sizes[0] / 2 ** 20)
    module.subjects(module.train_pairs)
    assert len(module._cache) == 2


def test_mean_normalised_target_is_the_in_mask_mean_of_each_component(subjects):
    from bssfp2dt.preprocessing.normalization import normalize_tensor

    normalization = data.fit_training_normalization(subjects[:2])
    pairs = data.pair_subjects(subjects[:2], "pc-bssfp")
    sessions = [s for subject in subjects[:2] for s in subject.sessions if s.tensor is not None]
    values = []
    for session in sessions:
        mask = np.asarray(nib.load(session.brain_mask).dataobj) > 0
        tensor = np.asarray(nib.load(session.tensor).dataobj, dtype=np.float32)
        values.append(normalize_tensor(tensor, normalization, mask)[mask])
    expected = np.concatenate(values).mean(axis=0)
    assert np.allclose(data.mean_normalised_target(pairs, normalization), expected, atol=1e-6)
    assert len({pair.target_path for pair in pairs}) == len(sessions) < len(pairs)  # each DWI session once
