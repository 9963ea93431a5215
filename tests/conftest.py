"""Shared fixtures: tiny simulated BIDS datasets (procedural phantom, a few seconds each) and their
preprocessing. Helpers that are not fixtures live in helpers.py."""
from pathlib import Path

import pytest
from helpers import FAST, make_config, tiny_config

from bssfp2dt.io import bids as bids_io
from bssfp2dt.preprocessing.workflow import run_preprocessing
from bssfp2dt.simulation.dataset import simulate_dataset
from bssfp2dt.preprocessing.ants_registration import single_thread

# One ITK thread in every test process, before any test touches ITK: ITK reads the count once per process, and
# with more threads a seeded registration differs from run to run (preprocessing.ants_registration).
single_thread()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op torch thread per test: on a shared 2-core machine (and with 2 pytest workers) OpenMP
    spin-waiting makes 2 threads up to 10x slower. Imported lazily so non-torch tests stay light."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """One BLAS thread per test, for the same reason (a 512^2 eigh went from 0.1 s to 8 s with spin-waiting)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Two subjects, one pc-bSSFP and two DWI sessions each, realistic regime."""
    root = tmp_path_factory.mktemp("sim") / "bids"
    return simulate_dataset(root, tiny_config(n_subjects=2, dwi_sessions=2, seed=11), progress=False)


@pytest.fixture(scope="session")
def preprocessed_run(tmp_path_factory):
    """(bids_dir, config, SubjectInputs, PreprocessedSubject) of one tiny simulated subject (phantom scale 0.3),
    preprocessed with :data:`helpers.FAST`."""
    root = tmp_path_factory.mktemp("preproc")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    config = make_config(bids_dir, root)
    inputs = bids_io.discover(config)[0]
    return bids_dir, config, inputs, run_preprocessing(config, inputs, FAST)
