"""Helpers shared by the test modules (fixtures live in conftest.py): small simulated datasets, synthetic
preprocessed subjects, a tiny checkpoint, run configurations and an offline-HTML check.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in pyproject.toml), so test modules ``import helpers``.
"""
from __future__ import annotations

import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np

from bssfp2dt.config import Config, ModelSettings, PathSettings, ResourceSettings, RunSettings, SelectionSettings
from bssfp2dt.io import bids as bids_io
from bssfp2dt.preprocessing.steps import PreprocSettings
from bssfp2dt.preprocessing.sessions import PreprocessedSession, PreprocessedSubject
from bssfp2dt.simulation.dataset import SimulationConfig

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- simulated datasets and models
def tiny_config(**overrides) -> SimulationConfig:
    """The configuration of ``bssfp2dt-simulate --tiny`` with optional overrides."""
    settings = dict(n_subjects=1, bssfp_sessions=1, dwi_sessions=1, seed=0, anatomy="procedural",
                    phantom_scale=0.3, margin_mm=4.0, dwi_directions=(30, 30))
    settings.update(overrides)
    return SimulationConfig(**settings)


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


# --------------------------------------------------------------------------- preprocessing runs
#: Gibbs removal and DWI motion correction off: ~40 s on the shared 2-core machine, and the simulator has no
#: within-scan motion to correct (the benchmark runs the full chain).
FAST = PreprocSettings(gibbs=False, motion_correction=False)


def make_config(bids_dir: Path, root: Path, run_uuid: str = "run1", write_preproc: bool = True) -> Config:
    """A participant-level config for ``bids_dir`` with output and work folders under ``root``."""
    return Config(paths=PathSettings(bids_dir=bids_dir, output_dir=root / "out", work_dir=root / "work"),
                  selection=SelectionSettings(analysis_level="participant",
                                              bids_queries=json.dumps(bids_io.DEFAULT_QUERIES)),
                  resources=ResourceSettings(nprocs=1, omp_nthreads=1), run=RunSettings(run_uuid=run_uuid),
                  model=ModelSettings(write_preproc=write_preproc))


# --------------------------------------------------------------------------- synthetic preprocessed subjects
SHAPE = (20, 18, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save_image(array: np.ndarray, path: Path, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), AFFINE), str(path))
    return path


def synthetic_subject(root: Path, label: str, bssfp_sessions: int, dwi_sessions: int, seed: int,
                      scale: float = 1.0) -> PreprocessedSubject:
    """A subject as ``run_preprocessing`` returns it: session k has bSSFP if k <= bssfp_sessions, a tensor if
    k <= dwi_sessions; one T1w (session 1) shared by all sessions; an ellipsoid brain mask on a 20x18x16 grid.
    ``scale`` multiplies every intensity (to tell subjects apart in the normalisation)."""
    rng = np.random.default_rng(seed)
    folder = root / f"sub-{label}"
    folder.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"), axis=-1)
    mask = (np.sum(grid ** 2, axis=-1) < 0.6).astype(np.uint8)
    mask_path = save_image(mask, folder / "mask.nii.gz", np.uint8)
    t1w = save_image(scale * (100 + 50 * rng.random(SHAPE)) * mask, folder / "t1w.nii.gz")
    tissue = save_image(mask / 3.0, folder / "tissue.nii.gz")
    sessions = []
    for k in range(1, max(bssfp_sessions, dwi_sessions) + 1):
        bssfp = tensor = None
        if k <= bssfp_sessions:
            magnitude = scale * (10 + 5 * rng.random(SHAPE + (12,)))
            phase = rng.uniform(-np.pi, np.pi, SHAPE + (12,))
            channels = np.stack([magnitude, phase], axis=-1).reshape(SHAPE + (24,)) * mask[..., None]
            bssfp = save_image(channels, folder / f"bssfp_ses{k}.nii.gz")
        if k <= dwi_sessions:
            values = rng.random(SHAPE + (6,))
            values[..., [0, 3, 5]] = scale * (0.5e-3 + 2e-3 * values[..., [0, 3, 5]])
            values[..., [1, 2, 4]] = scale * (-2e-4 + 4e-4 * values[..., [1, 2, 4]])
            tensor = save_image(values * mask[..., None], folder / f"tensor_ses{k}.nii.gz")
        sessions.append(PreprocessedSession(subject=label, session=str(k), t1w_session="1", t1w=t1w,
                                            brain_mask=mask_path, gm=tissue, wm=tissue, csf=tissue, bssfp=bssfp,
                                            tensor=tensor, provenance=folder / "provenance.json"))
    return PreprocessedSubject(label, tuple(sessions))


# --------------------------------------------------------------------------- reports
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])


def check_offline_html(report: Path) -> list[Path]:
    """No external resource in the page; every image is a decodable PNG next to it. Returns the image paths."""
    import matplotlib.image

    text = report.read_text()
    parser = _Links()
    parser.feed(text)
    assert not [link for link in parser.links if re.match(r"(?i)(https?:)?//", link)]
    assert "<script" not in text and "@import" not in text and "url(" not in text
    images = []
    for source in parser.images:
        path = (report.parent / source).resolve()
        assert path.is_file(), source
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.01  # not a blank canvas
        images.append(path)
    return images


# --------------------------------------------------------------------------- scripts
def load_script(name: str):
    """The module ``scripts/<name>.py`` (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
