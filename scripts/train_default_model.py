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
4. run the participant level with each packaged model on the held-out subjects and evaluate a trivial
   baseline (per tissue class, the mean DWI tensor of the training subjects, assigned by the hard tissue
   label) with the same evaluation code; the median errors of both go into ``models.toml``
   (``[models.<modality>.evaluation]``) and are printed as a Markdown model-card table.

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
CHAINS = {"staged": ("autoencoder", "head", "finetune"), "direct": ("direct",)}
FINETUNE_RATE_FACTOR = 0.1  # finetune runs at a tenth of the other stages' rate (the reference method's ratio)
TISSUES = ("CSF", "GM", "WM")
CARD_METRICS = ("diagonal", "offdiagonal", "fa", "md", "v1angle")
CARD_TISSUES = ("brain", "GM", "WM", "CSF")
IMAGE_METRICS = ("psnr", "ssim")

logger = logging.getLogger("train_default_model")


# --------------------------------------------------------------------------- steps
def simulate(root: Path, n_subjects: int, seed: int, quick: bool, voxel_scale: float = 1.0) -> Path:
    """A simulated BIDS dataset (1 pc-bSSFP + 1 DWI session per subject) under ``root``; reused if present."""
    from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset

    if (root / "dataset_description.json").is_file():
        logger.info("reusing the simulated dataset %s", root)
        return root
    settings = dict(n_subjects=n_subjects, bssfp_sessions=1, dwi_sessions=1, seed=seed, voxel_scale=voxel_scale)
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
    threads = max(1, args.nprocs // len(MODALITIES)) if args.parallel else args.nprocs
    bssfp2dt(bids_dir, output_dir, "participant", "--train-stage", stage, "--input-modality", modality,
             "--model-size", args.model_size, "--patch-size", args.patch_size, "--max-epochs", args.max_epochs,
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
            "training": {"stages": list(CHAINS[args.chain]), "final_stage": metadata["stage"],
                         "data": "simulated (bssfp2dt.simulation)", "train_subjects": args.train_subjects,
                         "train_seed": train_seed, "held_out_subjects": args.test_subjects,
                         "held_out_seed": test_seed, "max_epochs": args.max_epochs, "patch_size": args.patch_size,
                         "learning_rate": args.learning_rate or "stage default", "lr_schedule": args.lr_schedule,
                         "patience": args.patience,
                         "split_fractions": args.split_fractions, "chain": args.chain,
                         "quick": args.quick},
            "contract": dict(metadata["contract"])}


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


def evaluate_baseline(means: np.ndarray, records: list[dict], output_dir: Path, modality: str, bids_dir: Path) -> None:
    """The tissue-mean prediction of every held-out session, evaluated against every DWI session of its subject."""
    from bssfp2dt.evaluation.report import evaluate_participant
    from bssfp2dt.evaluation.statistics import EvaluationEntities
    from bssfp2dt.io.derivatives import initialise_dataset

    initialise_dataset(output_dir, bids_dir)
    for record in records:
        outputs = record["outputs"]
        labels = hard_labels(record)
        mask = labels >= 0
        prediction = np.where(mask[..., None], means[np.clip(labels, 0, None)], 0.0)
        references = [other for other in records if other["subject"] == record["subject"]
                      and other["outputs"].get("tensor")]
        for reference in references:
            entities = EvaluationEntities(record["subject"], record["session"], reference["session"], modality)
            evaluate_participant(prediction, reference["outputs"]["tensor"],
                                 {name: outputs[name.lower()] for name in TISSUES}, mask, None, entities, output_dir)


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


def model_card(modality: str, model: dict[str, float], baseline: dict[str, float]) -> str:
    """Markdown table of the held-out errors of the model and the baseline."""
    lines = [f"### {modality}: held-out simulated subjects", "", "| metric | model | tissue-mean baseline |",
             "|---|---|---|"]
    lines += [f"| {key} | {model[key]:.4g} | {baseline[key]:.4g} |" for key in model]
    return "\n".join(lines)


def side_by_side_card(entries: dict[str, dict]) -> str:
    """The model card's Markdown table: every modality's held-out medians next to the tissue-mean baseline
    (the same held-out sessions for all modalities), bold where a model beats the baseline."""
    modalities = [modality for modality in MODALITIES if "evaluation" in entries.get(modality, {})]
    if not modalities:
        raise SystemExit(f"{REGISTRY} holds no held-out evaluation: run the script without --card first")
    baseline = entries[modalities[0]]["evaluation"]["baseline_tissue_mean"]
    keys = [(f"{metric}_median_{tissue}", metric, tissue) for metric in CARD_METRICS for tissue in CARD_TISSUES]
    keys += [(metric, metric, "brain") for metric in IMAGE_METRICS]
    header = "| metric | tissue | " + " | ".join(f"{m} model" for m in modalities) + " | tissue-mean baseline |"
    lines = [header, "|" + "---|" * (len(modalities) + 3)]
    for key, metric, tissue in keys:
        cells = []
        for modality in modalities:
            value = entries[modality]["evaluation"]["model"][key]
            # Image metrics are scores (higher is better); every other card metric is an error.
            better = value > baseline[key] if metric in IMAGE_METRICS else value < baseline[key]
            cells.append(f"**{value:.4g}**" if better else f"{value:.4g}")
        lines.append(f"| {metric} | {tissue} | " + " | ".join(cells) + f" | {baseline[key]:.4g} |")
    return "\n".join(lines)


def train_modalities(args, bids_dir: Path, chain: tuple[str, ...], shared: Path | None) -> dict[str, Path]:
    """The final checkpoint of each modality's chain (after the shared autoencoder, if any); with
    ``--parallel`` the modalities train at the same time (the CLI runs are separate processes)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(modality: str) -> Path:
        checkpoint = shared
        for stage in chain[1:] if shared else chain:
            checkpoint = train_stage(args, bids_dir, stage, modality, checkpoint)
        return checkpoint

    with ThreadPoolExecutor(max_workers=len(MODALITIES) if args.parallel else 1) as pool:
        return dict(zip(MODALITIES, pool.map(one, MODALITIES)))


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    from bssfp2dt.cli.parser import LR_SCHEDULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "default-model",
                        help="folder for the simulated data, training outputs and caches")
    parser.add_argument("--seed", type=int, default=20240501, help="training seed (held-out data: seed + 1)")
    parser.add_argument("--train-subjects", type=int, default=8)
    parser.add_argument("--test-subjects", type=int, default=3)
    parser.add_argument("--model-size", default="small", choices=("tiny", "small", "reference"))
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--chain", choices=tuple(CHAINS), default="staged",
                        help="staged: autoencoder (shared) -> head -> finetune, the reference method; direct: one "
                             "stage from random weights (fewer steps for the same accuracy on a CPU budget)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="AdamW rate of every stage (finetune: a tenth of it) (default: the stages' own)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="learning rate over each stage's epochs (bssfp2dt --lr-schedule)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    parser.add_argument("--split-fractions", default="0.85,0.15,0",
                        help="train,validation,test fractions of the training subjects (no test part: the held-out "
                             "subjects are a separate simulated dataset)")
    parser.add_argument("--parallel", action="store_true",
                        help="train the modalities at the same time, --nprocs split between them")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--voxel-scale", type=float, default=1.0,
                        help="simulate coarser raw images (x voxel size) for a faster CPU run; the network's "
                             "grid stays 2 mm")
    parser.add_argument("--keep-all-steps", dest="skip_unneeded_steps", action="store_false",
                        help="also run Gibbs removal and DWI motion correction (the simulator models neither)")
    parser.add_argument("--card", action="store_true",
                        help="only print the model card's table from the packaged models.toml, then exit")
    parser.add_argument("--quick", action="store_true",
                        help="tiny phantoms, 3 + 1 subjects, tiny model, 2 epochs, 32^3 patches (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "train_subjects": 3, "test_subjects": 1, "model_size": "tiny",
                                     "max_epochs": 2, "patch_size": 32})
    args.work = args.work.resolve()
    return args


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

    chain = CHAINS[args.chain]
    shared = train_stage(args, train_bids, "autoencoder", MODALITIES[0], None) if chain[0] == "autoencoder" else None
    cards = []
    means = tissue_mean_tensors(preprocessed_sessions(args.work / "work-train"))
    checkpoints = train_modalities(args, train_bids, chain, shared)
    # Registered before the evaluation: a packaged file is only loaded when its sha256 is in models.toml.
    entries = {modality: package(checkpoints[modality], modality, args, train_seed, test_seed) for modality in MODALITIES}
    write_registry(entries)
    for modality, entry in entries.items():
        model_out = args.work / "heldout" / f"model-{modality}"
        shutil.rmtree(model_out, ignore_errors=True)
        work_test = args.work / "work-heldout"  # shared: both modalities need the same preprocessing
        bssfp2dt(test_bids, model_out, "participant", "--input-modality", modality,
                 "--model", MODELS_DIR / entry["file"], "--patch-size", args.patch_size, "-w", work_test,
                 "--nprocs", args.nprocs, "--omp-nthreads", args.nprocs, "--skip-bids-validation",
                 *preprocessing_flags(args))
        baseline_out = args.work / "heldout" / f"baseline-{modality}"
        shutil.rmtree(baseline_out, ignore_errors=True)
        evaluate_baseline(means, preprocessed_sessions(work_test), baseline_out, modality, test_bids)
        model_summary, baseline_summary = summarise(model_out), summarise(baseline_out)
        entry["evaluation"] = {"data": f"{args.test_subjects} held-out simulated subjects, seed {test_seed}",
                               "model": model_summary, "baseline_tissue_mean": baseline_summary}
        entry["training"]["voxel_scale"] = args.voxel_scale
        entry["training"]["preprocessing"] = " ".join(preprocessing_flags(args)) or "all steps"
        cards.append(model_card(modality, model_summary, baseline_summary))
    write_registry(entries)
    print("\n\n".join(cards))
    print(side_by_side_card(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
