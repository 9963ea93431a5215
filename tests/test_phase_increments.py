"""The bSSFP cycles feed the network in phase-increment order, whatever order the series stores them in.

The sidecar's ``PhaseIncrements`` list each stored volume's RF phase increment; the preprocessing sorts the
cycles by increment (ascending, modulo 360 degrees) before anything else, so a dataset written in another
cycle order gives, bit for bit, the network input of the same data written in order.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import FAST, make_config

from bssfp2dt.io import bids as bids_io
from bssfp2dt.preprocessing import steps
from bssfp2dt.preprocessing.bssfp import cycle_order
from bssfp2dt.preprocessing.normalization import Normalization, Range
from bssfp2dt.preprocessing.workflow import run_preprocessing
from bssfp2dt.pipeline.participant import network_input

SHUFFLE = (7, 2, 11, 0, 5, 9, 1, 4, 10, 3, 8, 6)  # stored volume k holds the cycle SHUFFLE[k] of the ordered series


def test_cycle_order_sorts_by_increment_modulo_360():
    assert cycle_order([30.0 * k for k in range(12)]) == tuple(range(12))
    assert cycle_order([90, 0, 270, 180]) == (1, 0, 3, 2)
    assert cycle_order([-90, 0, 90, 180]) == (1, 2, 3, 0)  # -90 is 270
    assert cycle_order([360, 30, 60]) == (0, 1, 2)  # 360 is 0
    shuffled = [30.0 * k for k in SHUFFLE]
    assert [shuffled[i] for i in cycle_order(shuffled)] == [30.0 * k for k in range(12)]


def shuffled_copy(bids_dir: Path, root: Path) -> Path:
    """The dataset with each bSSFP series' volumes stored in ``SHUFFLE`` order (sidecars to match); no DWI."""
    copy = root / "bids"
    shutil.copytree(bids_dir, copy, ignore=shutil.ignore_patterns("dwi", "derivatives"))
    for path in sorted(copy.rglob("*_acq-pcbssfp_part-*_T2w.nii.gz")):
        image = nib.load(path)
        data = np.asarray(image.dataobj)[..., list(SHUFFLE)]
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
        sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
        meta = json.loads(sidecar.read_text())
        meta["PhaseIncrements"] = [meta["PhaseIncrements"][k] for k in SHUFFLE]
        sidecar.write_text(json.dumps(meta))
    return copy


@pytest.fixture(scope="module")
def shuffled_run(preprocessed_run, tmp_path_factory):
    bids_dir, _, ordered_inputs, ordered = preprocessed_run
    root = tmp_path_factory.mktemp("shuffled")
    config = make_config(shuffled_copy(bids_dir, root), root, write_preproc=False)
    inputs = bids_io.discover(config)[0]
    return ordered_inputs, ordered, inputs, run_preprocessing(config, inputs, FAST)


def test_a_series_stored_in_another_cycle_order_gives_the_same_network_input(shuffled_run):
    ordered_inputs, ordered, inputs, shuffled = shuffled_run
    raw = inputs.sessions[0].bssfp
    assert raw.phase_increments_deg == tuple(30.0 * k for k in SHUFFLE)
    stored = np.asarray(nib.load(raw.magnitude).dataobj)
    reference = np.asarray(nib.load(ordered_inputs.sessions[0].bssfp.magnitude).dataobj)
    assert not np.array_equal(stored, reference)  # the files really differ
    np.testing.assert_array_equal(stored[..., list(cycle_order(raw.phase_increments_deg))], reference)

    first, second = ordered.session("1"), shuffled.session("1")
    mask = np.asarray(nib.load(first.brain_mask).dataobj) > 0
    np.testing.assert_array_equal(mask, np.asarray(nib.load(second.brain_mask).dataobj) > 0)
    normalization = Normalization(magnitude=Range(0.0, float(reference.max())), phase=Range(-np.pi, np.pi),
                                  tensor_diagonal=Range(0.0, 3e-3), tensor_offdiagonal=Range(-1e-3, 1e-3))
    for modality in ("pc-bssfp", "bssfp"):
        np.testing.assert_array_equal(network_input(second, modality, normalization, mask),
                                      network_input(first, modality, normalization, mask))
    records = {step["step"]: step for step in json.loads(second.provenance.read_text())["steps"]}
    assert records["prepare_bssfp"]["cycle_order"] == list(cycle_order(raw.phase_increments_deg))
    ordered_steps = {step["step"]: step for step in json.loads(first.provenance.read_text())["steps"]}
    assert "cycle_order" not in ordered_steps["prepare_bssfp"]  # an ordered series' record is unchanged


def test_without_the_ordering_the_channels_would_be_permuted(shuffled_run, tmp_path):
    """What the ordering prevents: the stored order reaching the network (the step run as stored)."""
    ordered_inputs, _, inputs, _ = shuffled_run
    options = FAST.node_options()

    def prepared(raw, order, folder):
        folder.mkdir()
        path = steps.prepare_bssfp(str(raw.magnitude), str(raw.phase), raw.phase_units, options, str(folder),
                                      cycle_order=order)[0]
        return np.asarray(nib.load(path).dataobj)

    raw, reference = inputs.sessions[0].bssfp, ordered_inputs.sessions[0].bssfp
    expected = prepared(reference, None, tmp_path / "ordered")
    np.testing.assert_array_equal(prepared(raw, cycle_order(raw.phase_increments_deg), tmp_path / "sorted"), expected)
    as_stored = prepared(raw, None, tmp_path / "as_stored")
    assert not np.allclose(as_stored, expected)
    np.testing.assert_array_equal(as_stored, expected[..., list(SHUFFLE)])  # stored volume k is cycle SHUFFLE[k]
