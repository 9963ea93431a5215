"""How much of a simulated subject's white-matter MD the voxel signal of each input modality determines.

The simulator ties a subject's WM mean diffusivity to its WM water content ``w`` (which also sets the WM
T1 of the T1w and the intra/extra-axonal T1 of the three-pool bSSFP model); 15 % of the MD deviation is
independent of everything the inputs see. This benchmark measures, with the simulator's own sampling and
signal code and no image simulation, how well regressors fitted on the noiseless (and noisy) steady-state
voxel signals recover the subject's WM MD: what a voxel (or a simple summary of a few voxels) of each
modality determines, the reference a network fed that modality is measured against. (A network fitting
many voxels jointly could in principle also pin subject-level confounders, e.g. through the spread of B1;
the oracle rows bound that gain.)

What is simulated per subject (``sample_subject`` with the default ``SimulationConfig`` protocol and
regime, one pc-bSSFP session and the T1w; DWI plans are not drawn since they come after every subject
parameter and only cost time):

* ``--voxels`` white-matter positions drawn from the MNI template's pure-WM points (WM fraction > 0.95 on
  the anatomy's 3 mm brain sample) and as many pure-GM positions (GM fraction > 0.9). Template points are
  mapped to each scan's scanner frame through the subject's warp (inverted by fixed-point iteration)
  and the scan's head pose; fibre direction, FA and fibre volume fraction come from the anatomy's fibre
  field as ``imaging._add_tensors`` computes them, off-resonance from ``imaging.b0_field_hz`` (shim
  residual + susceptibility sources), B1, receive field and transmit/receive phase from the subject's
  and scan's fields at those points.
* At each WM position, pure WM, pure GM and pure CSF voxels ("perfect tissue knowledge": the other
  tissues' signals at the same B1, receive field and off-resonance); at each GM position, pure GM.
* pc-bSSFP: ``imaging.image_bssfp`` on a one-row-per-voxel grid, i.e. the simulator's complex signal
  (three-pool WM, single-pool GM/CSF, 12 phase cycles, receive field, scanner scale), noiseless and with
  the scan's complex noise (sigma = mean WM magnitude / SNR, drawn from the regime's range).
* T1w: ``imaging.image_t1w`` likewise (MP2RAGE UNI with the O'Brien regularisation); "noiseless" keeps
  the scan's regularisation (beta = 50 sigma^2) and only zeroes the noise.
* Not simulated: partial volume, point-spread / resampling to the common grid, Gibbs ringing,
  registration, and preprocessing's per-cycle global-phase removal (the complex features rotate all
  cycles by one common phase instead, which cancels the simulator's transmit/receive phase and the TE
  phase, both common to all cycles).

Feature sets are *scale-free* unless marked "absolute": a per-subject unknown global gain on magnitudes
cancels. The product's intensity normalisation (``preprocessing.normalization``) is dataset-wide, so
absolute intensities do reach the network (blurred only by the training-time bias-field augmentation);
the "absolute" rows show what they add. "Oracle" rows add simulator truths no input carries (voxel B1,
off-resonance, fibre angle, FVF; subject pool relaxation, g-ratio, FA scales; the water content itself)
to locate the loss.

Regressors are fitted on the first half of the subjects and evaluated on the other half; the error is
the median |pred - true| / true. "voxel": fitted on every voxel, error over test voxels; "subject":
each test subject's voxel predictions averaged. Fitted on "subject mean+std pooled": one row per subject,
the mean and standard deviation of its voxels' features (a permutation-invariant summary).

WM-vs-GM separability: |Cohen's d| on the test subjects of the single feature that separates best on the
training subjects, and of a Fisher linear discriminant (Ledoit-Wolf shrinkage) fitted on the training
subjects; WM voxels at WM positions against GM voxels at GM positions.

The full run (2000 subjects x 16 voxels) takes about 8 minutes on one core (BLAS limited to one thread).
Run: ``PYTHONPATH=bidsapp .venv/bin/python benchmarks/bench_md_identifiability.py [--tiny] [--out FILE]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

N_DEFAULT, N_TINY = 2000, 50
QUADRATIC_MAX_DIM = 24  # larger feature sets are reduced by PCA before the quadratic expansion


class _ZeroNoise:
    """A generator stand-in whose Gaussian draws are all zero: the simulator's noisy code path, noiseless."""

    @staticmethod
    def standard_normal(shape, dtype=np.float64):
        return np.zeros(shape, dtype=dtype)


def _invert_warp(warp, template_points: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Head points whose ``warp.to_template`` is ``template_points`` (fixed point; the displacement is smooth)."""
    inverse = np.linalg.inv(warp.linear)
    head = (template_points - warp.offset) @ inverse.T
    for _ in range(iterations):
        head = head - (warp.to_template(head) - template_points) @ inverse.T
    return head


def _scan_tissue(anatomy, subject, pose, template_points, fractions):
    """A ``ScanTissue`` of pure-tissue voxels at given template points, with fibres, for one scan pose."""
    from bssfp2dt.simulation.imaging import ScanTissue, _add_tensors

    head = _invert_warp(subject.warp, template_points)
    scanner = head @ pose.rotation.T + np.asarray(pose.translation_mm)
    tissue = ScanTissue(np.arange(len(template_points)), scanner, subject.warp.to_template(head), fractions)
    _add_tensors(tissue, anatomy, subject, pose, head)
    return tissue


def simulate(n_subjects: int, n_voxels: int, seed: int, regime: str | None = None) -> dict:
    """Draw subjects and compute their WM/GM/CSF voxel signals. Returns arrays keyed by name. ``regime``:
    the simulation regime (default: ``SimulationConfig``'s)."""
    from bssfp2dt.simulation.anatomy import make_anatomy
    from bssfp2dt.simulation.dataset import SimulationConfig
    from bssfp2dt.simulation.geometry import ImageGrid
    from bssfp2dt.simulation.imaging import CSF, GM, WM, b0_field_hz, image_bssfp, image_t1w
    from bssfp2dt.simulation.subject import REGIMES, sample_subject

    config = SimulationConfig() if regime is None else SimulationConfig(regime=regime)
    protocol, regime = config.protocol(), REGIMES[config.regime]
    anatomy = make_anatomy(config.anatomy)
    centre = (anatomy.extent[0] + anatomy.extent[1]) / 2.0
    pool = anatomy.brain_points()
    pool_fractions = anatomy.fractions(pool)
    wm_pool, gm_pool = pool[pool_fractions[:, WM] > 0.95], pool[pool_fractions[:, GM] > 0.9]
    m = n_voxels
    # rows: WM@WM, GM@WM, CSF@WM (same positions), GM@GM
    fractions = np.zeros((4 * m, 3))
    fractions[:m, WM] = fractions[m:2 * m, GM] = fractions[2 * m:3 * m, CSF] = fractions[3 * m:, GM] = 1.0
    grid = ImageGrid((4 * m, 1, 1), np.eye(4))
    seeds = np.random.SeedSequence(seed).spawn(n_subjects)
    out = {key: [] for key in ("md", "water", "md_independent", "bssfp_clean", "bssfp_noisy", "t1w_clean",
                               "t1w_noisy", "b1", "df", "sin2", "fvf", "receive", "subject_nuisance")}
    for number, subject_seed in enumerate(seeds, start=1):
        rng = np.random.default_rng(subject_seed)
        subject = sample_subject(rng, f"{number:04d}", regime, protocol, 1, 0, centre, reverse_pe=config.reverse_pe)
        aux = np.random.default_rng([seed, number, 1])  # positions and noise, apart from the subject's stream
        wm_points = wm_pool[aux.choice(len(wm_pool), m, replace=False)]
        gm_points = gm_pool[aux.choice(len(gm_pool), m, replace=False)]
        template_points = np.concatenate([wm_points, wm_points, wm_points, gm_points])
        scans = {scan.modality: scan for scan in subject.scans}
        bssfp_tissue = _scan_tissue(anatomy, subject, scans["pcbssfp"].pose, template_points, fractions)
        noisy, clean, _ = image_bssfp(subject, scans["pcbssfp"], bssfp_tissue, grid, protocol, aux)
        t1w_tissue = _scan_tissue(anatomy, subject, scans["t1w"].pose, template_points, fractions)
        out["t1w_clean"].append(image_t1w(subject, scans["t1w"], t1w_tissue, grid, _ZeroNoise()).reshape(4 * m))
        out["t1w_noisy"].append(image_t1w(subject, scans["t1w"], t1w_tissue, grid, aux).reshape(4 * m))
        out["bssfp_clean"].append(clean.reshape(4 * m, -1))
        out["bssfp_noisy"].append(noisy.reshape(4 * m, -1))
        points = bssfp_tissue.scanner_points[:m]
        out["b1"].append(subject.b1(points))
        out["df"].append(b0_field_hz(subject, scans["pcbssfp"], bssfp_tissue)[:m])
        out["sin2"].append(1.0 - bssfp_tissue.v1_scanner[:m, 2] ** 2)
        out["fvf"].append(0.4 + 0.4 * bssfp_tissue.fa_wm[:m])
        out["receive"].append(scans["pcbssfp"].receive(points))
        tissues = subject.tissues
        out["md"].append(tissues.md["WM"])
        out["water"].append(tissues.water_content["WM"])
        out["md_independent"].append(tissues.md["WM"])  # replaced below by the independent part
        relax = dataclasses.asdict(subject.pool_relaxation)
        relax.pop("t1_intra_extra")  # follows w: not a nuisance
        out["subject_nuisance"].append(list(relax.values()) + [subject.fibre_model.g_ratio, subject.orientation_gain,
                                                               tissues.fa_wm_general, tissues.fa_wm_coherent])
    arrays = {key: np.asarray(value) for key, value in out.items()}
    arrays["md_independent"] = _independent_md_part(arrays["md"], arrays["water"])
    arrays["n_voxels"] = m
    return arrays


def _independent_md_part(md, water):
    """The share of the MD deviation that no input sees (``sample_tissues``' independent draw), in [-1, 1]."""
    from bssfp2dt.simulation.subject import MD_MEAN, MD_SPREAD, MD_WATER_SHARE

    relative = (md / MD_MEAN["WM"] - 1.0) / MD_SPREAD["WM"]
    return (relative - MD_WATER_SHARE * water) / (1.0 - MD_WATER_SHARE)


# ------------------------------------------------------------------------------------------- features
def complex_profile(signal: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Scale- and phase-free complex profile: S_k conj(z) / |z| / mean_k |S_ref|, z = sum_k S_ref,k.

    ``signal`` (..., K), ``reference`` (..., K) (default: the signal). A global gain and a transmit/receive
    phase common to all cycles (and to signal and reference) cancel. Returns real and imaginary parts (..., 2K).
    """
    reference = signal if reference is None else reference
    z = reference.sum(axis=-1, keepdims=True)
    rotated = signal * np.conj(z) / np.abs(z) / np.abs(reference).mean(axis=-1, keepdims=True)
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


def features(data: dict, noisy: bool) -> dict[str, np.ndarray]:
    """Feature sets (S, M, F) of the WM voxels, keyed by name; scale-free unless the name says absolute."""
    m = int(data["n_voxels"])
    bssfp = data["bssfp_noisy" if noisy else "bssfp_clean"]
    t1w = data["t1w_noisy" if noisy else "t1w_clean"]
    wm, gm, csf = bssfp[:, :m], bssfp[:, m:2 * m], bssfp[:, 2 * m:3 * m]
    t_wm, t_gm, t_csf = t1w[:, :m], t1w[:, m:2 * m], t1w[:, 2 * m:3 * m]
    magnitude = np.abs(wm)
    eps = 1e-6
    sets = {
        "pc-bSSFP |profile|/mean": magnitude / magnitude.mean(axis=-1, keepdims=True),
        "pc-bSSFP complex profile/mean": complex_profile(wm),
        "pc-bSSFP complex WM+GM+CSF profiles (same voxel)": np.concatenate(
            [complex_profile(wm), complex_profile(gm, wm), complex_profile(csf, wm)], axis=-1),
        "bSSFP ratios WM/GM, WM/CSF (|.| log, phase)": np.stack(
            [np.log(np.abs(wm[..., 0]) / np.abs(gm[..., 0])), np.log(np.abs(wm[..., 0]) / np.abs(csf[..., 0])),
             np.angle(wm[..., 0] * np.conj(gm[..., 0])), np.angle(wm[..., 0] * np.conj(csf[..., 0]))], axis=-1),
        "T1w ratios WM/GM, WM/CSF, (WM-CSF)/(GM-CSF)": np.stack(
            [np.log(t_wm / t_gm), np.log(t_wm / np.maximum(t_csf, eps)),
             (t_wm - t_csf) / (t_gm - t_csf)], axis=-1),
        "absolute: pc-bSSFP |profile| (scanner units)": magnitude / 1000.0,
        "absolute: bSSFP |S_WM| cycle 0": magnitude[..., :1] / 1000.0,
        "absolute: T1w UNI WM": t_wm[..., None] / 1000.0,
        "absolute: T1w UNI WM, GM, CSF": np.stack([t_wm, t_gm, t_csf], axis=-1) / 1000.0,
    }
    sets["pc-bSSFP complex profile/mean + T1w ratios"] = np.concatenate(
        [sets["pc-bSSFP complex profile/mean"], sets["T1w ratios WM/GM, WM/CSF, (WM-CSF)/(GM-CSF)"]], axis=-1)
    if not noisy:
        nuisance = np.stack([data["b1"], data["df"], np.cos(2 * np.pi * data["df"] * 4.8e-3),
                             np.sin(2 * np.pi * data["df"] * 4.8e-3), data["sin2"], data["fvf"]], axis=-1)
        sets["pc-bSSFP complex profile/mean + true B1, df, sin2, FVF"] = np.concatenate(
            [sets["pc-bSSFP complex profile/mean"], nuisance], axis=-1)
        subject_nuisance = np.repeat(data["subject_nuisance"][:, None, :], m, axis=1)
        sets["pc-bSSFP complex profile/mean + true voxel and subject nuisances"] = np.concatenate(
            [sets["pc-bSSFP complex profile/mean + true B1, df, sin2, FVF"], subject_nuisance], axis=-1)
        sets["oracle: WM water content w (exact WM T1)"] = np.repeat(data["water"][:, None, None], m, axis=1)
    return sets


# ------------------------------------------------------------------------------------------- models
def _model(name: str, n_features: int, seed: int):
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if name == "ridge (quadratic)":
        steps = [StandardScaler()]
        if n_features > QUADRATIC_MAX_DIM:
            steps += [PCA(QUADRATIC_MAX_DIM, random_state=seed), StandardScaler()]
        steps += [PolynomialFeatures(2, include_bias=False), StandardScaler(), RidgeCV(np.logspace(-4, 3, 15))]
        regressor = make_pipeline(*steps)
    elif name == "kNN (k=25)":
        regressor = make_pipeline(StandardScaler(), KNeighborsRegressor(25))
    elif name == "MLP (64, 64)":
        regressor = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-4, max_iter=300,
                                                                  early_stopping=True, random_state=seed))
    elif name == "gradient boosting":
        regressor = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.1, random_state=seed)
    else:
        raise ValueError(name)
    return TransformedTargetRegressor(regressor, transformer=StandardScaler())


def evaluate(x: np.ndarray, md: np.ndarray, model: str, seed: int, pooled: bool = False) -> dict:
    """Fit on the first half of the subjects, evaluate on the second half.

    Per voxel (default): trained on every voxel of the training subjects; "subject" averages a test
    subject's voxel predictions. ``pooled``: one row per subject, the mean and standard deviation of its
    voxels' features (a permutation-invariant summary, as a network pooling over the WM could form);
    the prediction is the same for all of the subject's voxels, so voxel and subject errors coincide.
    """
    s, m, f = x.shape
    half = s // 2
    if pooled:
        x = np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=-1)[:, None, :]
        s, m, f = x.shape
    y = np.repeat(md[:, None], m, axis=1)
    if model == "constant (training mean)":
        prediction = np.full((s - half, m), md[:half].mean())
    else:
        regressor = _model(model, f, seed)
        regressor.fit(x[:half].reshape(-1, f), y[:half].reshape(-1))
        prediction = regressor.predict(x[half:].reshape(-1, f)).reshape(s - half, m)
    truth = y[half:]
    voxel = np.abs(prediction - truth) / truth
    subject = np.abs(prediction.mean(axis=1) - md[half:]) / md[half:]
    return {"voxel_median_pct": 100 * float(np.median(voxel)), "subject_median_pct": 100 * float(np.median(subject)),
            "subject_p90_pct": 100 * float(np.percentile(subject, 90))}


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d per column of (N, F) samples a and b (pooled standard deviation)."""
    pooled = np.sqrt(0.5 * (a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)))
    return (a.mean(axis=0) - b.mean(axis=0)) / np.maximum(pooled, 1e-12)


def separability(data: dict, noisy: bool) -> list[dict]:
    """WM (at WM positions) vs GM (at GM positions): best single-feature |d| and Fisher LDA |d| (test half)."""
    m = int(data["n_voxels"])
    bssfp = data["bssfp_noisy" if noisy else "bssfp_clean"]
    t1w = data["t1w_noisy" if noisy else "t1w_clean"]
    half = bssfp.shape[0] // 2
    rows = []
    groups = {
        "pc-bSSFP |profile|/mean (scale-free)": lambda s: np.abs(s) / np.abs(s).mean(axis=-1, keepdims=True),
        "pc-bSSFP complex profile/mean (scale-free)": complex_profile,
        "pc-bSSFP |profile| (absolute)": np.abs,
        "bSSFP cycle 0 |S| (absolute)": lambda s: np.abs(s[..., :1]),
    }
    for name, make in groups.items():
        rows.append(_separate(name, make(bssfp[:, :m]), make(bssfp[:, 3 * m:]), half))
    rows.append(_separate("T1w UNI (absolute)", t1w[:, :m, None], t1w[:, 3 * m:, None], half))
    for row in rows:
        row["noise"] = "realistic SNR" if noisy else "noiseless"
    return rows


def _separate(name, wm, gm, half) -> dict:
    f = wm.shape[-1]
    train_wm, train_gm = wm[:half].reshape(-1, f), gm[:half].reshape(-1, f)
    test_wm, test_gm = wm[half:].reshape(-1, f), gm[half:].reshape(-1, f)
    best = int(np.argmax(np.abs(cohens_d(train_wm, train_gm))))  # chosen on the training subjects
    single = np.abs(cohens_d(test_wm, test_gm))
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    # Ledoit-Wolf shrinkage: noiseless profiles lie on a low-dimensional manifold (near-singular covariance)
    lda_model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    lda_model.fit(np.concatenate([train_wm, train_gm]), np.r_[np.ones(len(train_wm)), np.zeros(len(train_gm))])
    weights = lda_model.coef_[0]
    lda = float(abs(cohens_d(test_wm @ weights[:, None], test_gm @ weights[:, None])[0]))
    return {"features": name, "best_single_d": float(single[best]), "best_single_feature_index": best,
            "lda_d": lda}


# ------------------------------------------------------------------------------------------- report
def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def markdown(result: dict) -> str:
    lines = [f"N = {result['n_subjects']} subjects ({result['n_subjects'] // 2} train / "
             f"{result['n_subjects'] - result['n_subjects'] // 2} test), {result['n_voxels']} WM voxels each; "
             f"median |pred - true| / true WM MD, % (voxel / subject-pooled; p90 over subjects)", "",
             "| noise | features | fitted on | model | voxel | subject | subject p90 |",
             "|---|---|---|---|---|---|---|"]
    for row in result["md"]:
        lines.append(f"| {row['noise']} | {_cell(row['features'])} | {row['level']} | {row['model']} | "
                     f"{row['voxel_median_pct']:.2f} | "
                     f"{row['subject_median_pct']:.2f} | {row['subject_p90_pct']:.2f} |")
    lines += ["", "WM (WM positions) vs GM (GM positions), Cohen's d on the test subjects", "",
              "| noise | features | best single feature d (index) | Fisher LDA d |", "|---|---|---|---|"]
    for row in result["separability"]:
        lines.append(f"| {row['noise']} | {_cell(row['features'])} | {row['best_single_d']:.2f} "
                     f"({row['best_single_feature_index']}) | {row['lda_d']:.2f} |")
    correlations = ", ".join(f"{k} {v:.3f}" for k, v in result["correlations"].items())
    lines += ["", "Correlations across subjects: " + correlations,
              f"Runtime: simulate {result['seconds']['simulate']:.1f} s, fits {result['seconds']['fits']:.1f} s"]
    return "\n".join(lines)


# Feature sets that also get the slower nonlinear regressors (the question: can pc-bSSFP alone do it?)
NONLINEAR_SETS = ("pc-bSSFP |profile|/mean", "pc-bSSFP complex profile/mean",
                  "pc-bSSFP complex WM+GM+CSF profiles (same voxel)")


def _models_for(feature_set: str, tiny: bool, pooled: bool = False) -> list[str]:
    """Regressors per feature set: ridge and kNN for all (only ridge for the oracle); gradient boosting
    and the MLP (slow) only in the full run and only on the scale-free pc-bSSFP profiles."""
    if feature_set.startswith("oracle"):
        return ["ridge (quadratic)"]
    models = ["ridge (quadratic)", "kNN (k=25)"]
    if not tiny and feature_set in NONLINEAR_SETS:
        models += ["gradient boosting"] + ([] if pooled else ["MLP (64, 64)"])
    return models


def _fit_all(data: dict, tiny: bool, seed: int) -> list[dict]:
    rows = [{"noise": "-", "features": "-", "level": "-", "model": "constant (training mean)",
             **evaluate(np.zeros((len(data["md"]), 1, 1)), data["md"], "constant (training mean)", seed)}]
    for noisy in (False, True):
        for name, x in features(data, noisy).items():
            levels = [False] + ([True] if name in NONLINEAR_SETS else [])
            for pooled in levels:
                for model in _models_for(name, tiny, pooled):
                    started = time.perf_counter()
                    row = {"noise": "realistic SNR" if noisy else "noiseless", "features": name,
                           "level": "subject mean+std pooled" if pooled else "voxel", "model": model}
                    row.update(evaluate(x, data["md"], model, seed, pooled))
                    row["seconds"] = round(time.perf_counter() - started, 2)
                    rows.append(row)
                    print(f"{row['noise']:>13} | {row['level']:<7.7} | {name:<52.52} | {model:<18} | "
                          f"{row['voxel_median_pct']:5.2f} | {row['subject_median_pct']:5.2f} | {row['seconds']} s",
                          flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=None, help=f"subjects (default {N_DEFAULT}, --tiny {N_TINY})")
    parser.add_argument("--voxels", type=int, default=None,
                        help="WM (and GM) positions per subject (default 16, --tiny 8)")
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run (< 30 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON result here (and the markdown next to it)")
    args = parser.parse_args()
    n = args.subjects or (N_TINY if args.tiny else N_DEFAULT)
    voxels = args.voxels or (8 if args.tiny else 16)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        started = time.perf_counter()
        data = simulate(n, voxels, args.seed)
        simulated = time.perf_counter()
        rows = _fit_all(data, args.tiny, args.seed)
        separations = separability(data, False) + separability(data, True)
        finished = time.perf_counter()
    md_rel = data["md"]
    correlations = {"corr(MD, w)": float(np.corrcoef(md_rel, data["water"])[0, 1]),
                    "corr(MD, independent part)": float(np.corrcoef(md_rel, data["md_independent"])[0, 1])}
    result = {"n_subjects": n, "n_voxels": voxels, "seed": args.seed, "md": rows, "separability": separations,
              "correlations": correlations,
              "seconds": {"simulate": simulated - started, "fits": finished - simulated,
                          "total": finished - started}}
    table = markdown(result)
    print(json.dumps(result, indent=1))
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
