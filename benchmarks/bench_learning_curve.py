"""Learning curve of a training recipe: white-matter errors on held-out simulated volumes against steps and time.

Trains one generator for ``--minutes`` with the app's own pieces (``training.data`` patches and sampling,
``training.module`` regression step, the recipe's network options) on preprocessed simulated subjects, and
every ``--eval-every`` steps predicts the whole held-out volumes (``pipeline.participant.network_input``,
one pass) and measures the median WM V1 angle, FA and MD relative errors and predicted/true FA against the
simulator's truth (``evaluation.truth``), next to the two non-learned baselines measured the same way (the
tissue mean and the anatomy predictor, ``evaluation.baselines``). Writes ``learning_curve.tsv`` and
``learning_curve.png`` to ``--out``.

Data: ``--work`` is a ``scripts/train_default_model.py`` work folder (``train-bids``, ``heldout-bids``,
``work-train``, ``work-heldout`` with the cached preprocessing). ``--tiny`` simulates and preprocesses two
tiny phantom subjects instead and trains the tiny model for a few steps (the test suite runs it).

Usage: .venv/bin/python benchmarks/bench_learning_curve.py --work build/default-model --modality t1w --minutes 30
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def preprocessed_subjects(work_dir: Path):
    """PreprocessedSubject objects from the cached workflow's session summaries in ``work_dir``."""
    from bssfp2dt.preprocessing.sessions import PreprocessedSubject, read_summary

    sessions: dict[str, list] = {}
    for path in sorted(work_dir.glob("preproc_sub_*/collect_ses*/*_preproc.json")):
        session = read_summary(path)
        sessions.setdefault(session.subject, []).append(session)
    return [PreprocessedSubject(label, tuple(found)) for label, found in sorted(sessions.items())]


def preprocess(bids: Path, work_dir: Path, out_dir: Path, modality: str = "t1w", nprocs: int = 1) -> None:
    """Preprocess every subject of ``bids`` into the cached workflow of ``work_dir`` through the CLI (skipped when
    ``work_dir`` already holds preprocessed sessions). ``modality``: the participant run's input modality (a
    bSSFP modality also preprocesses the bSSFP; the DWI is preprocessed whenever present)."""
    import subprocess

    if list(work_dir.glob("preproc_sub_*/collect_ses*/*_preproc.json")):
        return
    # A dry training run is not available, so preprocess through a participant run with write-preproc off:
    # the participant level preprocesses first; its prediction with the packaged model is a cheap by-product.
    subprocess.run([sys.executable, "-m", "bssfp2dt.cli.run", str(bids), str(out_dir), "participant",
                    "-w", str(work_dir), "--input-modality", modality, "--unringing-method", "none",
                    "--hmc-model", "none", "--skip-bids-validation", "--nprocs", str(nprocs),
                    "--omp-nthreads", str(nprocs)], check=True, capture_output=True)


def prepare_tiny(work: Path) -> None:
    """Two tiny training subjects and one held-out subject (another seed), preprocessed through the CLI."""
    from train_default_model import simulate

    for name, subjects, seed in (("train", 2, 11), ("heldout", 1, 12)):
        bids = simulate(work / f"{name}-bids", subjects, seed, quick=True)
        preprocess(bids, work / f"work-{name}", work / f"{name}-out")


def baseline_errors(work: Path, bids: Path) -> dict[str, dict[str, float]]:
    """White-matter truth errors of both baselines on the held-out sessions (training-set statistics)."""
    from train_default_model import (
        BASELINES, baseline_prediction, load, mean_errors, preprocessed_sessions, tissue_mean_tensors,
        white_matter_medians,
    )

    from bssfp2dt.evaluation.truth import white_matter_errors

    train, held_out = preprocessed_sessions(work / "work-train"), preprocessed_sessions(work / "work-heldout")
    means, medians = tissue_mean_tensors(train), white_matter_medians(train)
    return {kind: mean_errors([white_matter_errors(baseline_prediction(kind, record, means, medians),
                                                   load(record["outputs"]["brain_mask"])[1], bids, record["subject"])
                               for record in held_out]) for kind in BASELINES}


def predict_sessions(module, sessions, modality: str, normalization):
    """Whole-volume prediction of each preprocessed session (one pass, padded to multiples of 16 voxels):
    yields (session, tensor (X, Y, Z, 6) mm^2/s on the common grid, affine, brain mask (X, Y, Z) bool)."""
    import nibabel as nib

    from bssfp2dt.inference.predict import predict_whole
    from bssfp2dt.models.generator import PATCH_MULTIPLE
    from bssfp2dt.pipeline.participant import network_input
    from bssfp2dt.preprocessing.normalization import denormalize_tensor

    module.eval()
    try:
        for session in sessions:
            image = nib.load(str(session.brain_mask))
            mask = np.asarray(image.dataobj) > 0
            volume = network_input(session, modality, normalization, mask)
            output = predict_whole(module, volume, multiple=PATCH_MULTIPLE)
            yield session, denormalize_tensor(np.moveaxis(output, 0, -1), normalization, mask), image.affine, mask
    finally:
        module.train()


def held_out_errors(module, sessions, modality: str, normalization, bids: Path) -> dict[str, float]:
    """Whole-volume prediction of every held-out session; mean of the WM truth errors."""
    from train_default_model import mean_errors

    from bssfp2dt.evaluation.truth import white_matter_errors

    return mean_errors([white_matter_errors(tensor, affine, bids, session.subject)
                        for session, tensor, affine, _ in predict_sessions(module, sessions, modality, normalization)])


def held_out_sessions(work_dir: Path) -> list:
    """The preprocessed sessions in ``work_dir`` that have a DWI tensor (the held-out sessions evaluated)."""
    return [session for subject in preprocessed_subjects(work_dir) for session in subject.sessions
            if session.tensor is not None]


def train_generator(args, train, record=None, eval_every: int | None = None):
    """Train one generator of ``args.modality`` on the preprocessed subjects ``train`` with the app's pieces.

    The recipe ``args.recipe`` (regression recipes only), ``args.model_size``, patches of ``args.patch_size``
    (default: the recipe's), ``args.batch_size``, the structure-head start when ``args.structure_init``, seeded
    by ``args.seed``; the autoencoder modality trains the autoencoder stage, the others the direct stage. Runs
    for ``args.minutes`` of wall time (the cosine schedule spread over them) or ``args.max_steps`` steps.
    ``record(module, normalization, step, minutes)`` is called at step 0, every ``eval_every`` steps and after
    the last step (its time counts against the budget). Returns (module, normalization, steps).
    """
    import torch
    from torch.utils.data import DataLoader

    from bssfp2dt import modalities
    from bssfp2dt.pipeline.training import generator_options
    from bssfp2dt.training import data
    from bssfp2dt.training.initialisation import initialise_structure_head
    from bssfp2dt.training.module import Bssfp2dtGAN, learning_rate_factor
    from bssfp2dt.training.recipes import get_recipe
    from bssfp2dt.training.stages import get_stage, initial_generator

    torch.manual_seed(args.seed)
    recipe = get_recipe(args.recipe)
    if recipe.adversarial:
        raise SystemExit("the benchmarks train the regression recipes (no discriminator); use the CLI for GANs")
    normalization = data.fit_training_normalization(train, tensor_transform=recipe.tensor_transform)
    pairs = data.pair_subjects(train, args.modality)
    patch = args.patch_size or recipe.patch_size
    loaded = data.TrainingData(pairs, [], args.modality, normalization, patch_size=patch, batch_size=args.batch_size,
                               seed=args.seed, recipe=recipe)
    stage = get_stage("autoencoder" if args.modality == modalities.AUTOENCODER.name else "direct")
    generator = initial_generator(stage, args.modality, args.model_size, **generator_options(recipe))
    generator.set_input_ranges(normalization)
    generator.set_output_offset(data.mean_normalised_target(pairs, normalization))
    if args.structure_init:
        initialise_structure_head(generator, args.modality, loaded.training_volumes(), seed=args.seed,
                                  azimuth_free=recipe.azimuth_free)
    module = Bssfp2dtGAN(generator, stage, args.modality, recipe=recipe, seed=args.seed,
                         learning_rate=args.learning_rate or recipe.learning_rate or stage.learning_rate)
    optimiser = torch.optim.AdamW(module.trainable_generator_parameters, lr=module.learning_rate,
                                  weight_decay=module.weight_decay)
    step, started, epoch, recorded = 0, time.perf_counter(), 0, None
    budget = args.minutes * 60.0

    def note() -> None:
        nonlocal recorded
        if record is not None:
            record(module, normalization, step, (time.perf_counter() - started) / 60.0)
        recorded = step

    def done() -> bool:
        return time.perf_counter() - started >= budget or (args.max_steps is not None and step >= args.max_steps)

    note()
    while not done():
        loader = DataLoader(loaded.train_queue(epoch), batch_size=args.batch_size, collate_fn=data.collate_patches)
        for batch in loader:
            progress = min(1.0, (time.perf_counter() - started) / budget)  # the budget is time, not steps
            factor = learning_rate_factor(step, recipe.warmup_steps, progress, "cosine")
            for group in optimiser.param_groups:
                group["lr"] = module.learning_rate * factor
            module.regression_step(batch, optimiser, torch.Tensor.backward)
            step += 1
            if eval_every and step % eval_every == 0:
                note()
            if done():
                break
        epoch += 1
    if recorded != step:
        note()
    return module, normalization, step


def train_curve(args) -> list[dict[str, float]]:
    """Train on ``args.work``'s training subjects; the held-out WM truth errors at every recorded step."""
    held_out = held_out_sessions(args.work / "work-heldout")
    bids = args.work / "heldout-bids"
    curve = []

    def record(module, normalization, step: int, minutes: float) -> None:
        errors = held_out_errors(module, held_out, args.modality, normalization, bids)
        row = {"step": step, "minutes": minutes, **errors}
        curve.append(row)
        print(json.dumps(row), flush=True)

    train_generator(args, preprocessed_subjects(args.work / "work-train"), record, args.eval_every)
    return curve


def write_outputs(curve: list[dict], baselines: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "learning_curve.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(curve)
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for axis, (key, label) in zip(axes, (("v1_angle", "WM V1 angle (deg)"), ("fa_error", "WM FA rel. error"),
                                         ("md_error", "WM MD rel. error"), ("fa_ratio", "WM predicted / true FA"))):
        axis.plot([row["minutes"] for row in curve], [row[key] for row in curve], "o-", label="network")
        for kind, style in zip(baselines, ("--", ":")):
            axis.axhline(baselines[kind][key], linestyle=style, color="grey" if style == "--" else "black",
                         label=f"{kind.replace('_', '-')} baseline")
        axis.set_xlabel("training time (min, 2-core CPU)")
        axis.set_title(label)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out / "learning_curve.png", dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "default-model")
    parser.add_argument("--modality", default="t1w", choices=("pc-bssfp", "bssfp", "t1w", "dwi-tensor"))
    parser.add_argument("--recipe", default="log-euclidean")
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-structure-init", dest="structure_init", action="store_false",
                        help="start the structure head from zero instead of the least-squares anatomy guess")
    parser.add_argument("--tiny", action="store_true", help="tiny phantoms, tiny model, a few steps (a test)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.tiny:
        args.work = args.out or args.work
        args.model_size, args.patch_size, args.max_steps, args.eval_every = "tiny", 16, 6, 3
        prepare_tiny(args.work)
    args.out = args.out or args.work / "learning-curve" / args.modality
    baselines = baseline_errors(args.work, args.work / "heldout-bids")
    print(json.dumps(baselines), flush=True)
    curve = train_curve(args)
    write_outputs(curve, baselines, args.out, f"{args.modality}, {args.recipe} recipe, {args.model_size} model")
    print(f"wrote {args.out / 'learning_curve.tsv'} and learning_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
