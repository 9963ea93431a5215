"""Where does the bSSFP orientation signal go? Per-voxel probes of the fibre's angle to B0, stage by stage.

The modality benchmark (``bench_modalities.py``) asks whether a network fed pc-bSSFP tells a white-matter
fibre's inclination to B0 better than one fed a T1w. When it does not, the signal may be lost in the simulator
(too weak against noise), in preprocessing (resampling, masking, global-phase removal) or in training. This
benchmark fits simple per-voxel regressors of cos^2(inclination) on

1. ``simulator``: pure-WM voxel signals drawn with the simulator's own sampling and signal code
   (``bench_md_identifiability.simulate``, 12 phase cycles, the regime's orientation gain and SNR), noiseless
   and noisy, for the ``easy`` and ``realistic`` regimes: what one voxel of the acquisition carries;
2. ``preprocessed``: the network input of the modality benchmark's setting (a) (``--work``: the preprocessed
   pc-bSSFP on the 2 mm common grid of 8 training and 3 held-out subjects), WM voxels (true WM probability
   > 0.8, inside the pipeline's brain mask), truth from the simulator's noiseless DWI fit and B0 from the
   recorded poses (``evaluation.truth``): what reaches the network.

Features: ``magnitudes / their mean`` (the 12 magnitudes over their mean), ``cycle invariants`` (the configuration-mode
features of ``models.generator.PhaseCycleProfile``, free of gain, common phase and cycle turns) and, on the
preprocessed input, ``raw channels`` (magnitude over the training median and phase in rad, what a network
without the profile features sees). Regressors (scikit-learn): ridge on quadratic features and gradient
boosting of cos^2, and gradient boosting of the axis' in-plane dyadic (sin^2, sin cos, cos^2; the angle read
from the principal axis of the prediction, as from a network's tensor turned to azimuth 0), fitted on training
subjects (simulator: the first half) and scored on the others: median absolute inclination error in degrees,
next to a constant (the training median) and uniformly random axes.

Run: ``PYTHONPATH=bidsapp .venv/bin/python benchmarks/bench_orientation_probe.py --work build/modalities``
(about 5 minutes on 2 cores; ``--tiny``: the simulator stage only, small, for a test).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))


def inclination_deg(cos2: np.ndarray) -> np.ndarray:
    """Angle to B0 (degrees, 0-90) from cos^2 of it, clipped to [0, 1]."""
    return np.degrees(np.arccos(np.sqrt(np.clip(cos2, 0.0, 1.0))))


def axis_dyadic(cos2: np.ndarray) -> np.ndarray:
    """(N, 3) in-plane dyadic (sin^2, sin cos, cos^2) of an axis at the given cos^2 of its angle to B0: what a
    network that outputs a tensor turned to azimuth 0 regresses (``training.losses.canonical_azimuth``)."""
    cos = np.sqrt(np.clip(cos2, 0.0, 1.0))
    sin = np.sqrt(1.0 - cos ** 2)
    return np.stack([sin * sin, sin * cos, cos * cos], axis=1)


def dyadic_inclination(dyadic: np.ndarray) -> np.ndarray:
    """Angle to B0 (degrees, 0-90) of the principal axis of predicted in-plane dyadics (N, 3)."""
    matrices = np.stack([dyadic[:, [0, 1]], dyadic[:, [1, 2]]], axis=1)
    axis = np.linalg.eigh(matrices)[1][:, :, -1]
    return np.degrees(np.arccos(np.clip(np.abs(axis[:, 1]), 0.0, 1.0)))


def cycle_invariants(signal: np.ndarray) -> np.ndarray:
    """The configuration-mode features (N, 29) of complex cycles (N, 12) (``PhaseCycleProfile`` without its level
    channel), through the app's module on a one-voxel-per-row grid."""
    import torch

    from bssfp2dt.models.generator import PhaseCycleProfile
    from bssfp2dt.preprocessing.bssfp import interleave_channels

    high = float(np.abs(signal).max()) or 1.0
    module = PhaseCycleProfile(2 * signal.shape[1]).double()
    module.magnitude_range.copy_(torch.tensor([0.0, high]))
    channels = interleave_channels(np.abs(signal) / high, (np.angle(signal) + np.pi) / (2 * np.pi))
    with torch.no_grad():
        features = module(torch.from_numpy(channels.T[None, :, :, None, None].copy()))
    return features[0, :-1, :, 0, 0].T.numpy()


def profile_over_mean(signal: np.ndarray) -> np.ndarray:
    magnitude = np.abs(signal)
    return magnitude / np.maximum(magnitude.mean(axis=-1, keepdims=True), 1e-12)


def regressors(seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    return {"ridge (quadratic)": lambda: make_pipeline(StandardScaler(), PolynomialFeatures(2), StandardScaler(),
                                                       RidgeCV(np.logspace(-3, 3, 7))),
            "gradient boosting": lambda: HistGradientBoostingRegressor(max_iter=300, random_state=seed)}


def score(train_x, train_y, tests: list[tuple[np.ndarray, np.ndarray]], seed: int, fit_limit: int) -> dict:
    """Median |inclination error| (deg) per test group for every regressor, the constant and random axes."""
    rng = np.random.default_rng(seed)
    rows = {}
    if len(train_y) > fit_limit:
        chosen = rng.choice(len(train_y), fit_limit, replace=False)
        train_x, train_y = train_x[chosen], train_y[chosen]
    for name, make in regressors(seed).items():
        model = make().fit(train_x, train_y)
        rows[name] = [float(np.median(np.abs(inclination_deg(model.predict(x)) - inclination_deg(y))))
                      for x, y in tests]
    dyadic = [regressors(seed)["gradient boosting"]().fit(train_x, column) for column in axis_dyadic(train_y).T]
    rows["gradient boosting (axis dyadic)"] = [
        float(np.median(np.abs(dyadic_inclination(np.stack([m.predict(x) for m in dyadic], axis=1))
                               - inclination_deg(y)))) for x, y in tests]
    constant = np.median(train_y)
    rows["constant (training median)"] = [float(np.median(np.abs(inclination_deg(np.full_like(y, constant))
                                                                  - inclination_deg(y)))) for _, y in tests]
    rows["random axes"] = [float(np.median(np.abs(inclination_deg(rng.uniform(0, 1, y.shape) ** 2)
                                                  - inclination_deg(y)))) for _, y in tests]
    return rows


def simulator_stage(regime: str, n_subjects: int, n_voxels: int, seed: int) -> dict:
    """Pure-WM voxels of ``regime``: {noise: {features: {regressor: [error]}}}, fitted on half the subjects."""
    import bench_md_identifiability as identifiability

    data = identifiability.simulate(n_subjects, n_voxels, seed, regime)
    m, half = int(data["n_voxels"]), n_subjects // 2
    cos2 = 1.0 - data["sin2"]
    result = {}
    for noise in ("noiseless", "noisy"):
        signal = data["bssfp_clean" if noise == "noiseless" else "bssfp_noisy"][:, :m]
        result[noise] = {}
        for name, make in (("magnitudes / their mean", profile_over_mean), ("cycle invariants", cycle_invariants)):
            x = make(signal.reshape(-1, signal.shape[-1])).reshape(n_subjects, m, -1)
            rows = score(x[:half].reshape(-1, x.shape[-1]), cos2[:half].reshape(-1),
                         [(x[half:].reshape(-1, x.shape[-1]), cos2[half:].reshape(-1))], seed, 60000)
            result[noise][name] = {key: value[0] for key, value in rows.items()}
    return result


def preprocessed_voxels(work: Path, split: str, subject: str):
    """(complex cycles (N, 12), cos^2 of the true inclination to B0 (N,)) of one preprocessed subject's WM."""
    import nibabel as nib

    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.evaluation.truth import b0_direction, on_grid, probseg_path, truth_paths

    folder = work / f"work-{split}" / f"preproc_sub_{subject}"
    image = nib.load(folder / "bssfp_grid_ses1" / "bssfp_channels.nii.gz")
    channels = np.asarray(image.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(folder / "t1w_grid_0" / "brain_mask_grid.nii.gz").dataobj) > 0
    bids = work / f"{split}-bids"
    tensor = on_grid(truth_paths(bids, subject)[0], channels.shape[:3], image.affine)
    region = mask & (on_grid(probseg_path(bids, subject, "WM"), channels.shape[:3], image.affine) > 0.8)
    v1 = tensor_maps(tensor, region)["v1"][region]
    voxels = channels[region]
    return voxels[:, 0::2] * np.exp(1j * voxels[:, 1::2]), (v1 @ b0_direction(bids, subject)) ** 2


def preprocessed_stage(work: Path, seed: int) -> dict:
    """Setting (a)'s network input: {features: {regressor: [error per held-out subject]}}."""
    def labels(split):
        return sorted(p.name.removeprefix("preproc_sub_") for p in (work / f"work-{split}").glob("preproc_sub_*"))

    train = [preprocessed_voxels(work, "train", s) for s in labels("train")]
    tests = [preprocessed_voxels(work, "heldout", s) for s in labels("heldout")]
    scale = float(np.median(np.concatenate([np.abs(s).mean(axis=1) for s, _ in train])))
    features = {"raw channels": lambda s: np.concatenate([np.abs(s) / scale, np.angle(s)], axis=1),
                "magnitudes / their mean": profile_over_mean, "cycle invariants": cycle_invariants}
    result = {}
    for name, make in features.items():
        train_x = np.concatenate([make(s) for s, _ in train])
        train_y = np.concatenate([y for _, y in train])
        result[name] = score(train_x, train_y, [(make(s), y) for s, y in tests], seed, 100000)
    return result


def markdown(result: dict) -> str:
    lines = ["Median |inclination error| to B0 of per-voxel probes, degrees (white matter).", "",
             "| stage | data | features | ridge (quadratic) | gradient boosting | gradient boosting, axis dyadic "
             "| constant | random axes |",
             "|---|---|---|---|---|---|---|---|"]

    def cells(row):
        def fmt(value):
            return " / ".join(f"{v:.1f}" for v in value) if isinstance(value, list) else f"{value:.1f}"
        return " | ".join(fmt(row[k]) for k in ("ridge (quadratic)", "gradient boosting",
                                                "gradient boosting (axis dyadic)", "constant (training median)",
                                                "random axes"))

    for regime, by_noise in result["simulator"].items():
        for noise, by_features in by_noise.items():
            for name, row in by_features.items():
                lines.append(f"| simulator voxels | {regime}, {noise} | {name} | {cells(row)} |")
    for name, row in result.get("preprocessed", {}).items():
        lines.append(f"| network input, 2 mm grid (per held-out subject) | setting (a) | {name} | {cells(row)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "modalities",
                        help="bench_modalities.py's work folder (its easy-random-fibres setting is probed)")
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--voxels", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (and the markdown next to it)")
    parser.add_argument("--tiny", action="store_true", help="simulator stage only, 20 subjects x 8 voxels")
    args = parser.parse_args(argv)
    if args.tiny:
        args.subjects, args.voxels = 20, 8
    started = time.perf_counter()
    result = {"simulator": {regime: simulator_stage(regime, args.subjects, args.voxels, args.seed)
                            for regime in ("easy", "realistic")}}
    setting = args.work / "easy-random-fibres"
    if not args.tiny and (setting / "work-heldout").is_dir():
        result["preprocessed"] = preprocessed_stage(setting, args.seed)
    result["seconds"] = time.perf_counter() - started
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
