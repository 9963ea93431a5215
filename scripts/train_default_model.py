#!/usr/bin/env python3
"""Train the packaged default models (``make default-model``): simulate, train, package, evaluate.

Seeded end to end, so the same arguments give the same models:

1. simulate a training dataset (seed ``--seed``) and a held-out dataset (seed ``--seed + 1``: the
   subjects' random streams are spawned from a different ``SeedSequence``, so no held-out subject
   shares a stream with a training subject);
2. train through the CLI (``bssfp2dt ... participant --train-stage ...``) the chain
   ``autoencoder`` (DT -> DT, shared) -> ``head`` -> ``finetune`` for pc-bssfp and for t1w at the
   ``--model-size`` (default ``small``), each stage starting from the previous stage's release checkpoint;
3. copy each finetuned ``model.pt`` into ``bidsapp/bssfp2dt/data/models/`` and record its id, version,
   sha256, training summary and input/output contract in ``models.toml``;
4. run the participant level with each packaged model on the held-out subjects and evaluate two non-learned
   baselines with the same evaluation code: the tissue mean (per tissue class, the mean DWI tensor of the
   training subjects, assigned by the hard tissue label) and the anatomy predictor (in white matter a
   cylinder along the least-varying axis of the WM map, ``evaluation.baselines``); the median errors go into
   ``models.toml`` (``[models.<modality>.evaluation]``) and are printed as a Markdown model-card table,
   together with the white-matter errors against the simulator's truth (``evaluation.truth``): the V1 angle,
   FA and MD errors and the predicted/true FA that the models are accepted by.

Usage (from the repository root; ``--quick`` is a minutes-long smoke run on tiny phantoms):

    .venv/bin/python scripts/train_default_model.py [--work build/default-model] [--quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "bidsapp" / "bssfp2dt" / "data" / "models"
REGISTRY = MODELS_DIR / "models.toml"
MODALITIES = ("pc-bssfp", "t1w")
#: Each packaged model's recipe (``--recipe`` overrides both): the pc-bSSFP head learns tissue from the
#: phase-cycle profile, which lowers its white-matter MD error (docs/model-card.md).
MODALITY_RECIPES = {"pc-bssfp": "log-euclidean-profile", "t1w": "log-euclidean"}
CHAINS = {"staged": ("autoencoder", "head", "finetune"), "direct": ("direct",)}
FINETUNE_RATE_FACTOR = 0.1  # finetune runs at a tenth of the other stages' rate (the reference method's ratio)
TISSUES = ("CSF", "GM", "WM")
CARD_METRICS = ("diagonal", "offdiagonal", "fa", "md", "v1angle")
CARD_TISSUES = ("brain", "GM", "WM", "CSF")
IMAGE_METRICS = ("psnr", "ssim")
BASELINES = ("tissue_mean", "anatomy")
BASELINE_NAMES = {"tissue_mean": "tissue-mean", "anatomy": "anatomy"}
TRUTH_ROWS = (("v1_angle", "median V1 angle (deg)"), ("fa_error", "median FA relative error"),
              ("md_error", "median MD relative error"), ("fa_ratio", "median predicted / true FA"),
              ("non_finite", "non-finite voxels"),
              ("tract_v1_angle", "median V1 angle (deg), tracts"), ("other_v1_angle", "median V1 angle (deg), other WM"),
              ("tract_fa_error", "median FA relative error, tracts"),
              ("other_fa_error", "median FA relative error, other WM"),
              ("tract_md_error", "median MD relative error, tracts"),
              ("other_md_error", "median MD relative error, other WM"))
STARTED = time.perf_counter()
DEFAULT_EPOCHS = 36

logger = logging.getLogger("train_default_model")


# --------------------------------------------------------------------------- steps
def simulate(root: Path, n_subjects: int, seed: int, quick: bool, voxel_scale: float = 1.0,
             regime: str = "realistic", random_fibres: bool = False) -> Path:
    """A simulated BIDS dataset (1 pc-bSSFP + 1 DWI session per subject) under ``root``; reused if present.
    ``regime`` and ``random_fibres``: as ``bssfp2dt-simulate --regime --random-fibres`` (the procedural phantom
    of ``quick`` has no fibre regions to randomise)."""
    from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset

    if (root / "dataset_description.json").is_file():
        logger.info("reusing the simulated dataset %s", root)
        return root
    settings = dict(n_subjects=n_subjects, bssfp_sessions=1, dwi_sessions=1, seed=seed, voxel_scale=voxel_scale,
                    regime=regime, random_fibres=random_fibres)
    if quick:  # bssfp2dt-simulate --tiny
        settings.update(anatomy="procedural", phantom_scale=0.3, margin_mm=4.0, dwi_directions=(30, 30))
    return simulate_dataset(root, SimulationConfig(**settings), progress=False)


def bssfp2dt(*arguments: str) -> None:
    """Run the bssfp2dt CLI; a non-zero exit stops the script with the command line."""
    command = [sys.executable, "-m", "bssfp2dt.cli.run", *map(str, arguments)]
    logger.info("$ %s", " ".join(command[2:]))
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode:
        raise SystemExit(f"command failed with exit code {completed.returncode}: {' '.join(command)}")
    logger.info("done in %.0f s", time.perf_counter() - started)


def release_checkpoint(output_dir: Path) -> Path:
    """The one release checkpoint (``model.pt``) a training run wrote under ``output_dir``."""
    found = sorted(output_dir.rglob("model.pt"))
    if len(found) != 1:
        raise SystemExit(f"expected one model.pt under {output_dir}, found {len(found)}: {found}")
    return found[0]


def recipe_of(args, modality: str) -> str:
    """The training recipe of ``modality``'s packaged model."""
    return args.recipe or MODALITY_RECIPES[modality]


def train_stage(args, bids_dir: Path, stage: str, modality: str, init: Path | None) -> Path:
    """Train one stage through the CLI (its own output folder, the shared work dir); return its model.pt."""
    output_dir = args.work / "training" / f"{stage}-{modality}"
    if output_dir.is_dir() and list(output_dir.rglob("model.pt")):
        logger.info("reusing %s", output_dir)
        return release_checkpoint(output_dir)
    extra = ["--init-checkpoint", init] if init else []
    if args.learning_rate:
        rate = args.learning_rate * (FINETUNE_RATE_FACTOR if stage == "finetune" else 1.0)
        extra += ["--learning-rate", f"{rate:g}"]
    threads = max(1, args.nprocs // len(args.modalities)) if args.parallel else args.nprocs
    if args.patch_size:
        extra += ["--patch-size", args.patch_size]
    bssfp2dt(bids_dir, output_dir, "participant", "--train-stage", stage, "--input-modality", modality,
             "--model-size", args.model_size, "--recipe", recipe_of(args, modality), "--batch-size", args.batch_size,
             "--max-epochs", args.max_epochs,
             "--seed", args.seed, "--early-stopping-patience", args.patience, "--split-fractions", args.split_fractions,
             "--lr-schedule", args.lr_schedule,
             "-w", args.work / "work-train", "--nprocs", threads, "--omp-nthreads", threads, "--skip-bids-validation",
             *preprocessing_flags(args), *extra)
    return release_checkpoint(output_dir)


def preprocessing_flags(args) -> list[str]:
    """The simulator models neither Gibbs ringing nor motion within a scan, so those steps may be skipped."""
    return ["--unringing-method", "none", "--hmc-model", "none"] if args.skip_unneeded_steps else []


def package(checkpoint: Path, modality: str, args, train_seed: int, test_seed: int) -> dict:
    """Copy the checkpoint next to the registry; return its registry entry (without evaluation)."""
    from bssfp2dt import __version__
    from bssfp2dt.io.derivatives import modality_desc
    from bssfp2dt.models.checkpoint import load_release_checkpoint, sha256_file

    model_id = f"bssfp2dt-{modality_desc(modality)}-{args.model_size}"
    target = MODELS_DIR / f"{model_id}-{__version__}.pt"
    shutil.copyfile(checkpoint, target)
    _, metadata = load_release_checkpoint(target)
    return {"id": model_id, "version": __version__, "file": target.name, "sha256": sha256_file(target),
            "size": args.model_size,
            "training": {"stages": list(CHAINS[args.chain]), "final_stage": metadata.stage,
                         "data": "simulated (bssfp2dt.simulation)", "train_subjects": args.train_subjects,
                         "train_seed": train_seed, "held_out_subjects": args.test_subjects,
                         "held_out_seed": test_seed, "max_epochs": args.max_epochs,
                         "patch_size": metadata.patch_size, "recipe": recipe_of(args, modality),
                         "batch_size": args.batch_size,
                         "learning_rate": args.learning_rate or "stage default", "lr_schedule": args.lr_schedule,
                         "patience": args.patience,
                         "split_fractions": args.split_fractions, "chain": args.chain,
                         "quick": args.quick},
            "contract": dict(metadata.contract)}


def write_registry(entries: dict[str, dict]) -> None:
    """Rewrite ``models.toml``: its leading comment block, ``format_version`` and one table per modality."""
    import tomli_w

    from bssfp2dt.io.nifti import write_text
    from bssfp2dt.models.registry import REGISTRY_FORMAT_VERSION

    header = []
    for line in REGISTRY.read_text().splitlines() if REGISTRY.is_file() else []:
        if not line.startswith("#"):
            break
        header.append(line)
    header = [line for line in header if "No model has been packaged yet" not in line]
    body = tomli_w.dumps({"format_version": REGISTRY_FORMAT_VERSION, "models": entries})
    write_text("\n".join(header) + "\n" + body, REGISTRY)
    logger.info("wrote %s (%s)", REGISTRY, ", ".join(entries))


# --------------------------------------------------------------------------- baseline and evaluation
def preprocessed_sessions(work_dir: Path) -> list[dict]:
    """The session summaries (``*_preproc.json``) the cached workflow left in ``work_dir``."""
    return [json.loads(path.read_text()) for path in sorted(work_dir.glob("preproc_sub_*/collect_ses*/*_preproc.json"))]


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float64), image.affine


def hard_labels(record: dict) -> np.ndarray:
    """Index into TISSUES of the most probable tissue per voxel, -1 outside the brain mask."""
    outputs = record["outputs"]
    probabilities = np.stack([load(outputs[name.lower()])[0] for name in TISSUES], axis=-1)
    labels = np.argmax(probabilities, axis=-1)
    labels[load(outputs["brain_mask"])[0] == 0] = -1
    return labels


def tissue_mean_tensors(records: list[dict]) -> np.ndarray:
    """(3, 6) mean DWI tensor (mm^2/s) per tissue class over every training session with a DWI tensor."""
    sums, counts = np.zeros((len(TISSUES), 6)), np.zeros(len(TISSUES))
    for record in records:
        if not record["outputs"].get("tensor"):
            continue
        tensor, labels = load(record["outputs"]["tensor"])[0], hard_labels(record)
        for index in range(len(TISSUES)):
            selected = tensor[labels == index]
            sums[index] += selected.sum(axis=0)
            counts[index] += len(selected)
    if not counts.all():
        raise SystemExit(f"the training sessions lack voxels of {[t for t, c in zip(TISSUES, counts) if not c]}")
    return sums / counts[:, None]


def white_matter_medians(records: list[dict]) -> tuple[float, float]:
    """Median FA and MD (mm^2/s) of the training sessions' DWI tensors where the pipeline's WM probability > 0.8."""
    from bssfp2dt.dti.maps import tensor_maps

    fa, md = [], []
    for record in records:
        if not record["outputs"].get("tensor"):
            continue
        region = load(record["outputs"]["wm"])[0] > 0.8
        maps = tensor_maps(load(record["outputs"]["tensor"])[0], region)
        fa.append(maps["fa"][region])
        md.append(maps["md"][region])
    return float(np.median(np.concatenate(fa))), float(np.median(np.concatenate(md)))


def baseline_prediction(kind: str, record: dict, means: np.ndarray, wm_medians: tuple[float, float]) -> np.ndarray:
    """The ``kind`` (see BASELINES) baseline of one preprocessed session, (X, Y, Z, 6) mm^2/s."""
    from bssfp2dt.evaluation import baselines

    labels = hard_labels(record)
    if kind == "tissue_mean":
        return baselines.tissue_mean_prediction(means, labels)
    outputs = record["outputs"]
    probabilities = np.stack([load(outputs[name.lower()])[0] for name in TISSUES], axis=-1)
    voxel_mm = float(abs(load(outputs["brain_mask"])[1][0, 0]))
    return baselines.anatomy_prediction(probabilities, labels >= 0, voxel_mm, means, *wm_medians)


def evaluate_baseline(kind: str, means: np.ndarray, wm_medians: tuple[float, float], records: list[dict],
                      output_dir: Path, modality: str, bids_dir: Path) -> dict[str, float]:
    """A baseline's prediction of every held-out session, evaluated against every DWI session of its subject;
    returns its white-matter errors against the simulator's truth (mean over sessions)."""
    from bssfp2dt.evaluation.report import evaluate_participant
    from bssfp2dt.evaluation.statistics import EvaluationEntities
    from bssfp2dt.evaluation.truth import white_matter_errors
    from bssfp2dt.io.derivatives import initialise_dataset

    initialise_dataset(output_dir, bids_dir)
    truth = []
    for record in records:
        outputs = record["outputs"]
        prediction = baseline_prediction(kind, record, means, wm_medians)
        mask = hard_labels(record) >= 0
        references = [other for other in records if other["subject"] == record["subject"]
                      and other["outputs"].get("tensor")]
        for reference in references:
            entities = EvaluationEntities(record["subject"], record["session"], reference["session"], modality)
            evaluate_participant(prediction, reference["outputs"]["tensor"],
                                 {name: outputs[name.lower()] for name in TISSUES}, mask, None, entities, output_dir)
        truth.append(white_matter_errors(prediction, load(outputs["brain_mask"])[1], bids_dir, record["subject"]))
    return mean_errors(truth)


def mean_errors(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over held-out sessions of each white-matter median (voxel counts: the total)."""
    return {key: float(np.sum([row[key] for row in rows]) if key in ("voxels", "non_finite")
                       else np.mean([row[key] for row in rows])) for key in rows[0]}


def model_truth_errors(model_out: Path, bids_dir: Path, modality: str) -> dict[str, float]:
    """White-matter errors against the truth of every predicted tensor a participant run wrote under
    ``model_out`` (not the evaluation's error maps, which share the suffix)."""
    import nibabel as nib

    from bssfp2dt.evaluation.truth import white_matter_errors
    from bssfp2dt.io.derivatives import modality_desc

    rows = []
    pattern = f"sub-*/**/*_desc-{modality_desc(modality)}_model-tensor_param-diffusivity_dwimap.nii.gz"
    for path in sorted(model_out.glob(pattern)):
        image = nib.load(str(path))
        subject = path.name.split("_")[0].removeprefix("sub-")
        rows.append(white_matter_errors(np.asarray(image.dataobj, dtype=np.float64), image.affine, bids_dir, subject))
    if not rows:
        raise SystemExit(f"no predicted tensor under {model_out}")
    return mean_errors(rows)


def summarise(output_dir: Path) -> dict[str, float]:
    """Mean over held-out pairs of each card metric's median (tissues) and of the image metrics."""
    import pandas as pd

    from bssfp2dt.evaluation.statistics import read_table

    tables = sorted(output_dir.rglob("*_errors.tsv"))
    if not tables:
        raise SystemExit(f"no error tables under {output_dir}")
    frame = pd.concat([read_table(path) for path in tables])
    summary = {}
    for metric in CARD_METRICS:
        for tissue in CARD_TISSUES:
            rows = frame[(frame.metric == metric) & (frame.tissue == tissue) & (frame.statistic == "median")]
            summary[f"{metric}_median_{tissue}"] = float(rows.value.mean())
    for metric in IMAGE_METRICS:
        rows = frame[(frame.metric == metric) & (frame.tissue == "brain")]
        summary[metric] = float(rows.value.mean())
    return summary


def side_by_side_card(entries: dict[str, dict]) -> str:
    """The model card's Markdown table: every modality's held-out medians next to the non-learned baselines
    (the same held-out sessions for all modalities), bold where a model beats every baseline."""
    modalities = [modality for modality in MODALITIES if "evaluation" in entries.get(modality, {})]
    if not modalities:
        raise SystemExit(f"{REGISTRY} holds no held-out evaluation: run the script without --card first")
    evaluation = entries[modalities[0]]["evaluation"]
    kinds = [kind for kind in BASELINES if f"baseline_{kind}" in evaluation]
    keys = [(f"{metric}_median_{tissue}", metric, tissue) for metric in CARD_METRICS for tissue in CARD_TISSUES]
    keys += [(metric, metric, "brain") for metric in IMAGE_METRICS]
    header = ("| metric | tissue | " + " | ".join(f"{m} model" for m in modalities) + " | "
              + " | ".join(f"{BASELINE_NAMES[kind]} baseline" for kind in kinds) + " |")
    lines = [header, "|" + "---|" * (len(modalities) + len(kinds) + 2)]
    for key, metric, tissue in keys:
        references = [evaluation[f"baseline_{kind}"][key] for kind in kinds]
        cells = []
        for modality in modalities:
            value = entries[modality]["evaluation"]["model"][key]
            # Image metrics are scores (higher is better); every other card metric is an error.
            better = all(value > r if metric in IMAGE_METRICS else value < r for r in references)
            cells.append(f"**{value:.4g}**" if better else f"{value:.4g}")
        lines.append(f"| {metric} | {tissue} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r:.4g}" for r in references) + " |")
    return "\n".join(lines)


def truth_card(entries: dict[str, dict]) -> str:
    """Markdown table of the white-matter errors against the simulator's truth (noiseless-DWI fit, true WM
    probability > 0.8): each model next to the baselines."""
    modalities = [modality for modality in MODALITIES
                  if "truth_white_matter" in entries.get(modality, {}).get("evaluation", {})]
    if not modalities:
        return "(no truth-based evaluation in models.toml)"
    columns = [(f"{modality} model", entries[modality]["evaluation"]["truth_white_matter"]["model"])
               for modality in modalities]
    first = entries[modalities[0]]["evaluation"]["truth_white_matter"]
    columns += [(f"{BASELINE_NAMES[kind]} baseline", first[kind]) for kind in BASELINES if kind in first]
    lines = ["| white matter (truth) | " + " | ".join(name for name, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for key, label in TRUTH_ROWS:
        if any(key not in values for _, values in columns):
            continue  # held-out data simulated before the simulator wrote its tract mask
        lines.append(f"| {label} | " + " | ".join(f"{values[key]:.4g}" for _, values in columns) + " |")
    return "\n".join(lines)


def wait_for_preprocessing(output_dir: Path, finished, poll_seconds: float = 5.0) -> None:
    """Block until the run writing to ``output_dir`` has preprocessed (its ``split.json`` exists) or ended:
    a training holds the work dir's lock while it preprocesses, and the next one then reuses the cache."""
    while not finished.is_set() and not list(output_dir.glob("models/*/split.json")):
        time.sleep(poll_seconds)


def train_modalities(args, bids_dir: Path, chain: tuple[str, ...], shared: Path | None) -> dict[str, Path]:
    """The final checkpoint of each modality's chain (after the shared autoencoder, if any); with
    ``--parallel`` the modalities train at the same time (the CLI runs are separate processes)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    first_done = threading.Event()

    first = args.modalities[0]

    def one(modality: str) -> Path:
        checkpoint = shared
        stages = chain[1:] if shared else chain
        if args.parallel and modality != first:
            wait_for_preprocessing(args.work / "training" / f"{stages[0]}-{first}", first_done)
        try:
            for stage in stages:
                checkpoint = train_stage(args, bids_dir, stage, modality, checkpoint)
        finally:
            if modality == first:
                first_done.set()
        return checkpoint

    with ThreadPoolExecutor(max_workers=len(args.modalities) if args.parallel else 1) as pool:
        return dict(zip(args.modalities, pool.map(one, args.modalities)))


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    from bssfp2dt.cli.parser import LR_SCHEDULES
    from bssfp2dt.training.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "default-model",
                        help="folder for the simulated data, training outputs and caches")
    parser.add_argument("--seed", type=int, default=20240501, help="training seed (held-out data: seed + 1)")
    parser.add_argument("--train-subjects", type=int, default=8)
    parser.add_argument("--test-subjects", type=int, default=3)
    parser.add_argument("--model-size", default="small", choices=("tiny", "small", "reference"))
    parser.add_argument("--max-epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--patch-size", type=int, default=None, help="training patch edge (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per training batch")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                        help="the models to retrain; the others keep their packaged weights and are evaluated again "
                             "beside them (default: both)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="training recipe of both models (bssfp2dt --recipe; default: "
                             + ", ".join(f"{m} {r}" for m, r in MODALITY_RECIPES.items()) + ")")
    parser.add_argument("--chain", choices=tuple(CHAINS), default="direct",
                        help="staged: autoencoder (shared) -> head -> finetune, the reference method; direct: one "
                             "stage from random weights (fewer steps for the same accuracy on a CPU budget)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="AdamW rate of every stage (finetune: a tenth of it) (default: the recipe's, else the "
                             "stages' own)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                        help="learning rate over each stage's epochs (bssfp2dt --lr-schedule)")
    parser.add_argument("--patience", type=int, default=DEFAULT_EPOCHS,
                        help="early-stopping patience in epochs (the default never stops early: the release "
                             "checkpoint is the best validation epoch anyway)")
    parser.add_argument("--split-fractions", default="0.85,0.15,0",
                        help="train,validation,test fractions of the training subjects (no test part: the held-out "
                             "subjects are a separate simulated dataset)")
    parser.add_argument("--serial", dest="parallel", action="store_false",
                        help="train the modalities one after the other (default: at the same time, --nprocs split "
                             "between them)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--voxel-scale", type=float, default=1.5,
                        help="simulate coarser raw images (x voxel size) for a faster CPU run; the network's "
                             "grid stays 2 mm")
    parser.add_argument("--keep-all-steps", dest="skip_unneeded_steps", action="store_false",
                        help="also run Gibbs removal and DWI motion correction (the simulator models neither)")
    parser.add_argument("--card", action="store_true",
                        help="only print the model card's table from the packaged models.toml, then exit")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="skip training: evaluate the packaged models of models.toml on the held-out subjects "
                             "(simulated and preprocessed as for training) and update their evaluation")
    parser.add_argument("--quick", action="store_true",
                        help="tiny phantoms, 3 + 1 subjects, tiny model, 2 epochs, 16^3 patches (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "train_subjects": 3, "test_subjects": 1, "model_size": "tiny",
                                     "max_epochs": 2, "patch_size": 16, "voxel_scale": 1.0})
    args.work = args.work.resolve()
    return args


def evaluate(args, entries: dict[str, dict], test_bids: Path, test_seed: int) -> None:
    """Predict the held-out subjects with every packaged model and evaluate both baselines the same way; put
    the medians into ``entries[modality]["evaluation"]``."""
    train_records = preprocessed_sessions(args.work / "work-train")
    if not train_records:
        raise SystemExit(f"no preprocessed training subject in {args.work / 'work-train'}: the baselines use the "
                         f"training subjects' statistics; run without --evaluate-only first")
    means, wm_medians = tissue_mean_tensors(train_records), white_matter_medians(train_records)
    work_test = args.work / "work-heldout"  # shared: both modalities need the same preprocessing
    truth = {}
    for modality, entry in entries.items():
        model_out = args.work / "heldout" / f"model-{modality}"
        shutil.rmtree(model_out, ignore_errors=True)
        bssfp2dt(test_bids, model_out, "participant", "--input-modality", modality,
                 "--model", MODELS_DIR / entry["file"], "-w", work_test,
                 "--nprocs", args.nprocs, "--omp-nthreads", args.nprocs, "--skip-bids-validation",
                 *preprocessing_flags(args))
        truth[modality] = model_truth_errors(model_out, test_bids, modality)
    baselines = {}
    for kind in BASELINES:  # the same held-out sessions for every modality
        baseline_out = args.work / "heldout" / f"baseline-{kind}"
        shutil.rmtree(baseline_out, ignore_errors=True)
        truth[kind] = evaluate_baseline(kind, means, wm_medians, preprocessed_sessions(work_test), baseline_out,
                                        MODALITIES[0], test_bids)
        baselines[kind] = summarise(baseline_out)
    for modality, entry in entries.items():
        entry["evaluation"] = {"data": f"{args.test_subjects} held-out simulated subjects, seed {test_seed}",
                               "model": summarise(args.work / "heldout" / f"model-{modality}"),
                               **{f"baseline_{kind}": baselines[kind] for kind in BASELINES},
                               "truth_white_matter": {"model": truth[modality],
                                                      **{kind: truth[kind] for kind in BASELINES}}}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s", datefmt="%H:%M:%S")
    if args.card:
        import tomllib

        print(side_by_side_card(tomllib.loads(REGISTRY.read_text())["models"]))
        return 0
    train_seed, test_seed = args.seed, args.seed + 1
    train_bids = simulate(args.work / "train-bids", args.train_subjects, train_seed, args.quick, args.voxel_scale)
    test_bids = simulate(args.work / "heldout-bids", args.test_subjects, test_seed, args.quick, args.voxel_scale)

    import tomllib

    entries = tomllib.loads(REGISTRY.read_text())["models"] if REGISTRY.is_file() else {}
    missing = [modality for modality in MODALITIES if modality not in args.modalities and modality not in entries]
    if missing and not args.evaluate_only:
        raise SystemExit(f"--modalities {' '.join(args.modalities)}: {REGISTRY} has no packaged {', '.join(missing)} model "
                         "to keep; retrain it too")
    if not args.evaluate_only:
        chain = CHAINS[args.chain]
        shared = (train_stage(args, train_bids, "autoencoder", args.modalities[0], None)
                  if chain[0] == "autoencoder" else None)
        checkpoints = train_modalities(args, train_bids, chain, shared)
        # Registered before the evaluation: a packaged file is only loaded when its sha256 is in models.toml.
        entries = {modality: (package(checkpoints[modality], modality, args, train_seed, test_seed)
                              if modality in args.modalities else entries[modality]) for modality in MODALITIES}
        write_registry(entries)
    evaluate(args, entries, test_bids, test_seed)
    if not args.evaluate_only:
        for entry in (entries[modality] for modality in args.modalities):
            entry["training"]["voxel_scale"] = args.voxel_scale
            entry["training"]["preprocessing"] = " ".join(preprocessing_flags(args)) or "all steps"
            entry["training"]["minutes"] = round((time.perf_counter() - STARTED) / 60, 1)
    write_registry(entries)
    print(side_by_side_card(entries))
    print()
    print(truth_card(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
