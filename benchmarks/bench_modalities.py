"""The reference method's modality comparison on simulated subjects: which input carries the fibre orientation?

For each setting, (a) ``easy-random-fibres`` (``bssfp2dt-simulate --regime easy --random-fibres``: fibre
directions drawn at random per region, so the anatomy does not predict them, and a stronger orientation effect)
and (b) ``realistic``, the benchmark

1. simulates a training set (seed ``--seed``, ``--train-subjects``) and a held-out set (seed ``--seed + 1``,
   ``--test-subjects``, never trained on) with ``scripts/train_default_model.py``'s ``simulate`` and
   preprocesses both once through the CLI participant level (``bench_learning_curve.preprocess``; the
   preprocessing is shared by every modality);
2. trains four generators with the same seeded budget of ``--minutes`` wall time each (the cosine schedule
   spread over it) and the app's own pieces (``bench_learning_curve.train_generator``: the default recipe
   ``log-euclidean`` in (b); in (a) ``log-euclidean-azimuth-free``, the same without the azimuth about B0 in the
   loss and with the phase cycles turned at random (``SETTING_RECIPES``), ``training.data``,
   ``training.module``, structure-head start): the ``dwi-tensor``
   autoencoder (the autoencoder stage: input and target are the preprocessed DWI tensor of the same session,
   ``preprocessing.network_input``; recipe ``log-euclidean-input-shortcut``, which starts it as the identity),
   ``pc-bssfp``, ``bssfp`` (the first phase cycle repeated) and ``t1w``
   (direct stage); ``--parallel`` models train at once with ``--threads`` threads each;
3. predicts the whole held-out volumes and compares them with the simulator's truth (the tensor fitted to the
   noiseless DWI and the true tissue probabilities, ``evaluation.truth``, resampled onto the common grid).

Metrics (``evaluation.errors``), medians over the voxels of the pipeline's brain mask (where the app predicts)
whose true tissue probability exceeds ``--tissue-threshold`` (CSF, GM, WM; the JSON's ``voxels`` counts them),
then the mean over held-out subjects:
the reference method's table (relative errors of the ``diagonal`` and ``offdiagonal`` elements, pooled as in
``evaluation.statistics``, and of ``fa``, ``md``, ``ad``, ``rd``; absolute errors in degrees of V1's
``inclination`` and ``azimuth``, as the app defines them: about the grid's z axis, the predicted axis first
turned into the true axis' hemisphere), and further angles in degrees: ``v1angle`` (the sign-invariant angle
between the axes), ``b0_inclination`` and ``b0_azimuth`` (about the true B0 direction of the held-out
subject's bSSFP scan, axis-folded: ``errors.axis_angle_errors_about``) and ``z_inclination`` (the same folded
inclination about the grid's z axis, to separate the change of axis from the change of definition).

Why an inclination about B0, and folded: the bSSFP orientation effect depends on the fibre only through
sin^2 of its angle to B0, so the physics can at best tell the angle between the fibre axis and B0, in
[0, 90] deg; the azimuth about B0 is invisible to it. The app's ``inclination`` (the reference's metric) is
the polar angle about the grid's z after aligning the predicted axis with the true one's hemisphere: that
alignment depends on the azimuth, so a prediction with the exact angle to B0 but a wrong azimuth gets an
inclination error of up to 2 x the angle's distance from 90 deg (the ``b0-only axes`` reference below shows
how large). B0 in the T1w grid is R_t R_b^T z from the poses the simulator recorded for the T1w (R_t) and the
bSSFP (R_b) scan (``evaluation.truth.b0_direction``): the head's tilt against B0 is shared by both scans, so
the grid's z differs from B0 only by the per-scan pose jitter (the JSON records each held-out subject's
angle); both the reference definition and the B0 one are reported.

References, computed on the same held-out voxels: ``dwi-fit`` (the held-out session's own preprocessed DWI
tensor against the truth: the DWI noise floor the autoencoder is judged by), ``random axes`` (uniformly
random axes, seeded: what an orientation-blind prediction scores on the angular metrics) and ``b0-only axes``
(the true axis turned about B0 by a uniformly random angle: the exact angle to B0 and nothing else, the best
that bSSFP physics alone could do).

Outputs in ``--out``: ``modalities_<setting>.json`` (every number and the settings), ``modalities_<setting>.md``
(the table) and ``modalities_<setting>.png`` (white-matter bars next to the references) per setting.

Budget (the whole run within 150 min on the 2-core machine; measured: simulating 11 subjects at
``--voxel-scale 1.5`` takes a few minutes and preprocessing them ~5 min, ``docs/model-card.md``):
per setting ~4 min simulation + ~6 min preprocessing + 2 rounds of two models at once x (``--minutes`` +
~2 min data loading, structure start and held-out evaluation) + ~1 min references = 11 + 2 (M + 2) min;
two settings: 30 + 4 M <= 150 gives M <= 30, so ``--minutes 25`` (130 min, 20 min spare).

Usage: .venv/bin/python benchmarks/bench_modalities.py [--work build/modalities] [--minutes 25] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO / "scripts", REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

SETTINGS = {"easy-random-fibres": {"regime": "easy", "random_fibres": True},
            "realistic": {"regime": "realistic", "random_fibres": False}}
#: Each setting's training recipe for the inputs that do not see the tensor (``--recipe`` overrides it). With
#: random fibre directions nothing but the DT tells a fibre's azimuth about B0, so setting (a) trains them
#: without asking for it (the recipe's docstring says why a loss that asks for it hides the angle to B0 as well);
#: the DT autoencoder sees the azimuth and trains with the default recipe plus the input shortcut (its DT input is
#: already in the output's coordinates, so it starts as the identity and its UNet learns what the input lacks).
SETTING_RECIPES = {"easy-random-fibres": "log-euclidean-azimuth-free", "realistic": "log-euclidean"}
AUTOENCODER_RECIPE = "log-euclidean-input-shortcut"


def recipe_for(setting: str, modality: str, override: str | None) -> str:
    """The training recipe of ``modality`` in ``setting`` (``override``: ``--recipe``)."""
    from bssfp2dt import modalities

    if override:
        return override
    return AUTOENCODER_RECIPE if modalities.get(modality) is modalities.AUTOENCODER else SETTING_RECIPES[setting]
TISSUES = ("CSF", "GM", "WM")
POOLED = {"diagonal": ("D11", "D22", "D33"), "offdiagonal": ("D12", "D13", "D23")}
REFERENCE_METRICS = ("diagonal", "offdiagonal", "fa", "md", "ad", "rd", "inclination", "azimuth")
ANGLE_METRICS = ("inclination", "azimuth", "v1angle", "b0_inclination", "b0_azimuth", "z_inclination")
METRICS = REFERENCE_METRICS + ANGLE_METRICS[2:]
METRIC_LABELS = {"diagonal": "diagonal elements", "offdiagonal": "off-diagonal elements", "fa": "FA", "md": "MD",
                 "ad": "AD", "rd": "RD", "inclination": "inclination (grid z, reference def.)",
                 "azimuth": "azimuth (grid z, reference def.)", "v1angle": "V1 angle (sign-invariant)",
                 "b0_inclination": "inclination to B0 (axis)", "b0_azimuth": "azimuth about B0 (axis)",
                 "z_inclination": "inclination to grid z (axis)"}
REFERENCES = ("dwi-fit", "random-axes", "b0-only-axes")
REFERENCE_LABELS = {"dwi-fit": "DWI fit (noise floor)", "random-axes": "random axes", "b0-only-axes": "b0-only axes"}


def modality_names() -> tuple[str, ...]:
    """The input modalities in the reference method's table order (the DWI-fed autoencoder first)."""
    from bssfp2dt import modalities

    return tuple(modality.name for modality in modalities.REPORT_ORDER)


def modality_label(name: str) -> str:
    from bssfp2dt import modalities

    spec = modalities.get(name)
    return f"{spec.label} (autoencoder)" if spec is modalities.AUTOENCODER else spec.label


# --------------------------------------------------------------------------- evaluation against the truth
def truth_on_grid(bids: Path, subject: str, shape: tuple[int, ...], affine: np.ndarray):
    """The true tensor (X, Y, Z, 6) mm^2/s and tissue probabilities {CSF, GM, WM: (X, Y, Z)} on a grid."""
    from bssfp2dt.evaluation.truth import on_grid, probseg_path, truth_paths

    tensor = on_grid(truth_paths(bids, subject)[0], shape, affine)
    return tensor, {label: on_grid(probseg_path(bids, subject, label), shape, affine) for label in TISSUES}


def angle_maps(v1_predicted: np.ndarray, v1_true: np.ndarray, valid: np.ndarray, b0: np.ndarray) -> dict:
    """Every angular error map (degrees, (X, Y, Z), NaN where not ``valid``) of :data:`ANGLE_METRICS`."""
    from bssfp2dt.evaluation.errors import axis_angle_errors, axis_angle_errors_about

    maps = axis_angle_errors(v1_predicted, v1_true, valid)
    about_b0 = axis_angle_errors_about(v1_predicted, v1_true, b0, valid)
    maps["b0_inclination"], maps["b0_azimuth"] = about_b0["inclination"], about_b0["azimuth"]
    maps["z_inclination"] = axis_angle_errors_about(v1_predicted, v1_true, np.array([0.0, 0.0, 1.0]),
                                                    valid)["inclination"]
    return maps


def tissue_medians(maps: dict, tissues: dict, mask: np.ndarray, threshold: float) -> dict[str, dict[str, float]]:
    """{metric: {tissue: median}} over the voxels of ``mask`` whose tissue probability exceeds ``threshold``
    (pooled metrics: the voxel errors of their three elements together); NaN where no voxel is left."""
    table = {}
    for metric in [name for name in METRICS if all(m in maps for m in POOLED.get(name, (name,)))]:
        members = POOLED.get(metric, (metric,))
        values = np.concatenate([maps[member][mask] for member in members])
        table[metric] = {}
        for tissue, probability in tissues.items():
            selected = values[np.isfinite(values) & (np.tile(probability[mask], len(members)) > threshold)]
            table[metric][tissue] = float(np.median(selected)) if selected.size else math.nan
    table["voxels"] = {tissue: float(np.count_nonzero(probability[mask] > threshold))
                       for tissue, probability in tissues.items()}
    return table


def evaluate_prediction(prediction: np.ndarray, affine: np.ndarray, mask: np.ndarray, bids: Path, subject: str,
                        threshold: float) -> dict[str, dict[str, float]]:
    """Tissue medians of every metric of a predicted tensor (X, Y, Z, 6) mm^2/s inside ``mask`` against the
    truth of ``subject``."""
    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.evaluation.errors import error_maps
    from bssfp2dt.evaluation.truth import b0_direction

    truth, tissues = truth_on_grid(bids, subject, prediction.shape, affine)
    maps = error_maps(prediction, truth, mask)
    valid = mask & np.isfinite(prediction).all(axis=-1) & np.isfinite(truth).all(axis=-1)
    v1 = tensor_maps(prediction, valid)["v1"], tensor_maps(truth, valid)["v1"]
    maps.update(angle_maps(*v1, valid, b0_direction(bids, subject)))
    return tissue_medians(maps, tissues, mask, threshold)


def mean_tables(tables: list[dict]) -> dict[str, dict[str, float]]:
    """Mean over held-out subjects of each {metric: {tissue: median}}."""
    return {metric: {tissue: float(np.mean([table[metric][tissue] for table in tables]))
                     for tissue in tables[0][metric]} for metric in tables[0]}


def reference_tables(sessions, bids: Path, seed: int, threshold: float) -> dict[str, dict]:
    """The references of :data:`REFERENCES` on the held-out ``sessions`` (module docstring)."""
    import nibabel as nib

    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.evaluation.truth import b0_direction

    rng = np.random.default_rng(seed)
    tables: dict[str, list] = {name: [] for name in REFERENCES}
    for session in sessions:
        image = nib.load(str(session.brain_mask))
        mask = np.asarray(image.dataobj) > 0
        fitted = np.asarray(nib.load(str(session.tensor)).dataobj, dtype=np.float64)
        tables["dwi-fit"].append(evaluate_prediction(fitted, image.affine, mask, bids, session.subject, threshold))
        truth, tissues = truth_on_grid(bids, session.subject, mask.shape, image.affine)
        valid = mask & np.isfinite(truth).all(axis=-1)
        v1_true, b0 = tensor_maps(truth, valid)["v1"], b0_direction(bids, session.subject)
        random_axes = rng.standard_normal(v1_true.shape)
        random_axes /= np.linalg.norm(random_axes, axis=-1, keepdims=True)
        tables["random-axes"].append(tissue_medians(angle_maps(random_axes, v1_true, valid, b0), tissues, mask,
                                                    threshold))
        turned = rotate_about(v1_true, b0, rng.uniform(0.0, 2.0 * np.pi, v1_true.shape[:-1]))
        tables["b0-only-axes"].append(tissue_medians(angle_maps(turned, v1_true, valid, b0), tissues, mask,
                                                     threshold))
    return {name: mean_tables(found) for name, found in tables.items()}


def rotate_about(vectors: np.ndarray, axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``vectors`` (..., 3) turned about the unit ``axis`` (3,) by ``angles`` (...) radians (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cos, sin = np.cos(angles)[..., None], np.sin(angles)[..., None]
    return vectors * cos + np.cross(axis, vectors) * sin + axis * (vectors @ axis)[..., None] * (1.0 - cos)


# --------------------------------------------------------------------------- data and training
def prepare(args) -> float:
    """Simulate every setting's training (seed) and held-out (seed + 1) datasets and preprocess each once
    (``--prepare-jobs`` preprocessing runs at a time); returns the minutes it took."""
    from concurrent.futures import ThreadPoolExecutor

    from bench_learning_curve import preprocess
    from train_default_model import simulate

    started, runs = time.perf_counter(), []
    for name in args.settings:
        folder = args.work / name
        for part, subjects, seed in (("train", args.train_subjects, args.seed),
                                     ("heldout", args.test_subjects, args.seed + 1)):
            bids = simulate(folder / f"{part}-bids", subjects, seed, args.tiny, args.voxel_scale, **SETTINGS[name])
            runs.append((bids, folder / f"work-{part}", folder / f"{part}-out"))
    # a bSSFP input modality makes the participant level preprocess the bSSFP too (the DWI always)
    with ThreadPoolExecutor(max_workers=args.prepare_jobs) as pool:
        list(pool.map(lambda run: preprocess(*run, modality="pc-bssfp", nprocs=args.nprocs), runs))
    return (time.perf_counter() - started) / 60.0


def train_and_evaluate(job: dict) -> dict:
    """Train one modality's generator on a setting's training subjects and evaluate it on the held-out ones
    (runs in its own process: ``job`` holds plain values)."""
    import torch
    from bench_learning_curve import held_out_sessions, predict_sessions, preprocessed_subjects, train_generator

    torch.set_num_threads(job["threads"])
    folder, started = Path(job["folder"]), time.perf_counter()
    settings = SimpleNamespace(**job["training"])
    module, normalization, steps = train_generator(settings, preprocessed_subjects(folder / "work-train"))
    trained = time.perf_counter() - started
    bids = folder / "heldout-bids"
    tables = [evaluate_prediction(tensor, affine, mask, bids, session.subject, job["threshold"])
              for session, tensor, affine, mask in predict_sessions(module, held_out_sessions(folder / "work-heldout"),
                                                                     settings.modality, normalization)]
    return {"modality": settings.modality, "steps": steps, "train_minutes": trained / 60.0,
            "evaluation_seconds": time.perf_counter() - started - trained, "table": mean_tables(tables)}


def run_setting(name: str, args) -> dict:
    """Train every modality on a prepared setting, evaluate them and the references, and return the setting's
    results (see :func:`write_outputs`)."""
    from bench_learning_curve import held_out_sessions

    spec, folder, started = SETTINGS[name], args.work / name, time.perf_counter()
    training = {"model_size": args.model_size, "patch_size": args.patch_size, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "minutes": args.minutes, "max_steps": args.max_steps,
                "seed": args.seed, "structure_init": True}
    jobs = [{"folder": str(folder), "threads": args.threads, "threshold": args.tissue_threshold,
             "training": {**training, "modality": modality, "recipe": recipe_for(name, modality, args.recipe)}}
            for modality in args.modalities]
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=get_context("spawn")) as pool:
        trained = {result["modality"]: result for result in pool.map(train_and_evaluate, jobs)}
    sessions = held_out_sessions(folder / "work-heldout")
    bids = folder / "heldout-bids"
    references = reference_tables(sessions, bids, args.seed, args.tissue_threshold)
    from bssfp2dt.evaluation.truth import b0_direction

    order = [m for m in modality_names() if m in trained]  # the table's order: the autoencoder first
    tilt = {session.subject: float(np.degrees(np.arccos(abs(b0_direction(bids, session.subject)[2]))))
            for session in sessions}
    return {"setting": name, "simulation": {**spec, "train_seed": args.seed, "held_out_seed": args.seed + 1,
                                            "train_subjects": args.train_subjects,
                                            "held_out_subjects": args.test_subjects,
                                            "voxel_scale": args.voxel_scale, "tiny": args.tiny},
            "training": {**training, "parallel": args.parallel, "threads_per_model": args.threads,
                         "recipes": {job["training"]["modality"]: job["training"]["recipe"] for job in jobs}},
            "tissue_threshold": args.tissue_threshold, "b0_angle_to_grid_z_deg": tilt,
            "steps": {m: trained[m]["steps"] for m in order},
            "train_minutes": {m: trained[m]["train_minutes"] for m in order},
            "results": {m: trained[m]["table"] for m in order}, "references": references,
            "minutes": {"train_and_evaluate": (time.perf_counter() - started) / 60.0}}


def keep_earlier(result: dict, folder: Path) -> None:
    """Add to ``result`` the modalities that an earlier run of the same setting in ``folder`` trained and this
    one did not (after a change to one model, the others need not train again). SystemExit when the earlier
    run's data or training settings differ."""
    path = folder / f"modalities_{result['setting']}.json"
    if not path.is_file():
        raise SystemExit(f"--keep-from: {path} does not exist; give the results folder of an earlier run")
    earlier = json.loads(path.read_text())
    same = ("model_size", "patch_size", "batch_size", "learning_rate", "minutes", "max_steps", "seed")
    if earlier["simulation"] != result["simulation"] or any(
            earlier["training"].get(key) != result["training"].get(key) for key in same):
        raise SystemExit(f"--keep-from: {path} was run on other data or with other training settings; "
                         "rerun every modality instead")
    kept = [m for m in earlier["results"] if m not in result["results"]]
    for key in ("results", "steps", "train_minutes"):
        result[key] = {**result[key], **{m: earlier[key][m] for m in kept}}
        result[key] = {m: result[key][m] for m in modality_names() if m in result[key]}
    result["training"]["recipes"] = {**result["training"]["recipes"],
                                     **{m: earlier["training"]["recipes"][m] for m in kept}}
    result.setdefault("kept_from_earlier_run", {}).update({m: str(path) for m in kept})


# --------------------------------------------------------------------------- outputs
def cell(metric: str, value: float | None) -> str:
    """A table cell: relative errors in %, angles in degrees; '-' where the column has no such metric."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" if metric in ANGLE_METRICS else f"{100 * value:.1f} %"


def markdown_table(result: dict) -> str:
    """The setting's table: metric x tissue rows, one column per modality and reference."""
    columns = [(modality_label(m), result["results"][m]) for m in result["results"]]
    columns += [(REFERENCE_LABELS[r], result["references"][r]) for r in REFERENCES]
    simulation, training = result["simulation"], result["training"]
    voxels = result["references"]["dwi-fit"]["voxels"]
    lines = [f"## Setting {result['setting']}: regime {simulation['regime']}, random fibres "
             f"{'yes' if simulation['random_fibres'] else 'no'}", "",
             f"{simulation['train_subjects']} training subjects (seed {simulation['train_seed']}), "
             f"{simulation['held_out_subjects']} held-out (seed {simulation['held_out_seed']}); recipes "
             + ", ".join(f"{m} {r}" for m, r in training["recipes"].items())
             + f"; {training['model_size']} model, {training['minutes']:g} min per model "
             f"({training['parallel']} at once, {training['threads_per_model']} thread(s) each); steps: "
             + ", ".join(f"{m} {n}" for m, n in result["steps"].items())
             + ". Medians over the voxels of the pipeline's brain mask with true tissue "
             f"probability > {result['tissue_threshold']:g}, mean over held-out subjects; relative errors in %, "
             "angles in degrees. B0 (from the recorded bSSFP and T1w poses) is "
             + ", ".join(f"{v:.1f}" for v in result["b0_angle_to_grid_z_deg"].values())
             + " deg from the grid's z in the held-out subjects. Voxels per held-out subject: "
             + ", ".join(f"{tissue} {count:.0f}" for tissue, count in voxels.items()) + "."
             + kept_note(result), "",
             "| metric | tissue | " + " | ".join(name for name, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for metric in METRICS:
        for tissue in TISSUES:
            values = [table.get(metric, {}).get(tissue) for _, table in columns]
            lines.append(f"| {METRIC_LABELS[metric]} | {tissue} | "
                         + " | ".join(cell(metric, value) for value in values) + " |")
    return "\n".join(lines) + "\n"


def kept_note(result: dict) -> str:
    """' Trained in an earlier run of the same data and settings: ...' when ``--keep-from`` added modalities."""
    kept = result.get("kept_from_earlier_run") or {}
    if not kept:
        return ""
    return (" Trained in an earlier run of the same data and settings (`--keep-from`): "
            + ", ".join(modality_label(m) for m in kept) + ".")


def write_figure(result: dict, path: Path) -> None:
    """White-matter medians per modality and of the DWI fit, the angular references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("v1angle", "b0_inclination", "inclination", "b0_azimuth", "fa", "md", "diagonal", "offdiagonal")
    names = list(result["results"]) + ["dwi-fit"]
    tables = [result["results"][m] for m in result["results"]] + [result["references"]["dwi-fit"]]
    labels = [modality_label(m) for m in result["results"]] + ["DWI fit"]
    figure, axes = plt.subplots(2, 4, figsize=(16, 7))
    for axis, metric in zip(axes.flat, panels):
        scale = 1.0 if metric in ANGLE_METRICS else 100.0
        axis.bar(range(len(names)), [scale * table[metric]["WM"] for table in tables],
                 color=[f"C{k}" for k in range(len(names))])
        axis.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
        if metric in ANGLE_METRICS:
            for reference, style in (("random-axes", "--"), ("b0-only-axes", ":")):
                axis.axhline(result["references"][reference][metric]["WM"], color="black", linestyle=style,
                             label=REFERENCE_LABELS[reference])
        axis.set_title(f"WM {METRIC_LABELS[metric]}" + (" (deg)" if metric in ANGLE_METRICS else " (%)"), fontsize=9)
    axes[0, 0].legend(fontsize=8)
    simulation = result["simulation"]
    figure.suptitle(f"{result['setting']}: regime {simulation['regime']}, random fibres "
                    f"{simulation['random_fibres']}, {result['training']['minutes']:g} min per model, held-out truth")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(result: dict, out: Path) -> list[Path]:
    """``modalities_<setting>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"modalities_{result['setting']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    paths[1].write_text(markdown_table(result))
    write_figure(result, paths[2])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "modalities",
                        help="folder for the simulated datasets and the preprocessing caches (one per setting)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: WORK/results)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--modalities", nargs="+", choices=modality_names(), default=None,
                        help="the input modalities to train (default: all four)")
    parser.add_argument("--seed", type=int, default=20240501, help="training data and training seed (held-out: + 1)")
    parser.add_argument("--train-subjects", type=int, default=8)
    parser.add_argument("--test-subjects", type=int, default=3)
    parser.add_argument("--voxel-scale", type=float, default=1.5, help="raw voxel sizes x this (the grid stays 2 mm)")
    parser.add_argument("--minutes", type=float, default=25.0, help="training wall time per model")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop each model after this many steps")
    parser.add_argument("--recipe", default=None,
                        help="training recipe of every setting (default: " + ", ".join(
                            f"{name} {recipe}" for name, recipe in SETTING_RECIPES.items()) + ")")
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--parallel", type=int, default=2, help="models trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--nprocs", type=int, default=2, help="processes of each preprocessing run")
    parser.add_argument("--prepare-jobs", type=int, default=1, help="preprocessing runs at a time")
    parser.add_argument("--tissue-threshold", type=float, default=0.8,
                        help="true tissue probability above which a voxel counts (evaluation.truth's WM threshold)")
    parser.add_argument("--keep-from", type=Path, default=None, metavar="DIR",
                        help="an earlier run's results folder: modalities not trained now keep their results from it "
                             "(the same data and training settings are checked; the table says which came from it)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny phantoms (2 + 1 subjects), tiny model, a few steps, one model at a time (a test)")
    args = parser.parse_args(argv)
    args.modalities = args.modalities or [m for m in ("pc-bssfp", "bssfp", "t1w", "dwi-tensor")
                                          if m in modality_names()]
    if args.tiny:
        args.train_subjects, args.test_subjects, args.voxel_scale = 2, 1, 1.0
        args.model_size, args.patch_size, args.max_steps, args.minutes, args.parallel = "tiny", 16, 3, 10.0, 1
        args.nprocs, args.prepare_jobs = 1, 4  # four one-subject runs, dominated by start-up: all at once
    args.work = args.work.resolve()
    args.out = (args.out or args.work / "results").resolve()
    prepared = prepare(args)
    print(f"simulated and preprocessed {', '.join(args.settings)} in {prepared:.1f} min", flush=True)
    for name in args.settings:
        result = run_setting(name, args)
        result["minutes"]["prepare_all_settings"] = prepared
        if args.keep_from is not None:
            keep_earlier(result, args.keep_from)
        paths = write_outputs(result, args.out)
        print(f"{name}: trained and evaluated in {result['minutes']['train_and_evaluate']:.1f} min; wrote "
              + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
