"""Shared fixtures: tiny simulated BIDS datasets (procedural phantom, a few seconds each)."""
from pathlib import Path

import pytest

from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op torch thread per test: on a shared 2-core machine (and with 2 pytest workers) OpenMP
    spin-waiting makes 2 threads up to 10x slower. Imported lazily so non-torch tests stay light."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> SimulationConfig:
    """The configuration of ``bssfp2dt-simulate --tiny`` with optional overrides."""
    settings = dict(n_subjects=1, bssfp_sessions=1, dwi_sessions=1, seed=0, anatomy="procedural",
                    phantom_scale=0.3, margin_mm=4.0, dwi_directions=(30, 30))
    settings.update(overrides)
    return SimulationConfig(**settings)


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


def tiny_pcbssfp_model(bids_dir: Path, path: Path, mag_high: float = 1.5):
    """A tiny untrained pc-bSSFP generator (seeded) saved as a release checkpoint at ``path``.

    Its magnitude range is ``mag_high`` x the dataset's raw magnitude maximum, so normalised magnitudes stay
    inside (0, 1). Returns ``(checkpoint path, Normalization)``.
    """
    import nibabel as nib
    import numpy as np
    import torch

    from bssfp2dt.models.checkpoint import save_release_checkpoint
    from bssfp2dt.models.generator import build_generator
    from bssfp2dt.preprocessing.normalization import Normalization, Range

    magnitude = next(Path(bids_dir).rglob("*_part-mag_T2w.nii.gz"))
    high = mag_high * float(np.asarray(nib.load(magnitude).dataobj).max())
    normalization = Normalization(magnitude=Range(0.0, high), phase=Range(-np.pi, np.pi),
                                  tensor_diagonal=Range(0.0, 3e-3), tensor_offdiagonal=Range(-1e-3, 1e-3))
    torch.manual_seed(0)
    model = save_release_checkpoint(path, build_generator("tiny", ["pc-bssfp"]), config={"size": "tiny"},
                                    stage="direct", modality="pc-bssfp", normalization=normalization.to_dict())
    return model, normalization
