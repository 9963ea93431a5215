"""Group level: aggregation of participant error tables, group report, exit codes."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import check_offline_html

from bssfp2dt.pipeline.plan import RunPlan
from bssfp2dt.config import (Config, PathSettings, ResourceSettings, RunSettings,
                             SelectionSettings)
from bssfp2dt.errors import EXIT_MISSING_INPUT, MissingInputError
from bssfp2dt.evaluation.errors import error_maps
from bssfp2dt.evaluation.reference_results import SOURCE
from bssfp2dt.evaluation.statistics import (EvaluationEntities, frame_to_tsv, image_metric_rows,
                                            read_table, rows_to_frame, tissue_statistics)
from bssfp2dt.io import derivatives as out
from bssfp2dt.pipeline.group import run_group

N = 8
# (subject, input session, DWI session, modality, prediction scale): sub-01 has three pairs, sub-02 one.
PAIRS = [("01", "1", "1", "pc-bssfp", 1.10), ("01", "1", "2", "pc-bssfp", 1.20), ("01", None, "1", "t1w", 0.70),
         ("02", "1", "1", "pc-bssfp", 0.95)]


def write_participant_table(root: Path, subject, input_session, dwi_session, modality, scale, seed) -> Path:
    """What the participant level writes for one pair, from synthetic arrays (no figures)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((N, N, N), bool)
    reference = np.zeros((N, N, N, 6))
    reference[..., [0, 3, 5]] = rng.uniform(0.3e-3, 2e-3, (N, N, N, 3))
    reference[..., [1, 2, 4]] = rng.uniform(1e-5, 1e-4, (N, N, N, 3))
    predicted = reference * scale * rng.uniform(0.95, 1.05, reference.shape)
    wm = rng.uniform(0, 1, (N, N, N))
    tissues = {"WM": wm, "GM": (1 - wm) * 0.7, "CSF": (1 - wm) * 0.3}
    entities = EvaluationEntities(subject, input_session, dwi_session, modality)
    rows = tissue_statistics(error_maps(predicted, reference, mask), tissues, mask, entities)
    rows += image_metric_rows({"psnr": 20.0 + seed, "ssim": 0.9}, entities, int(mask.sum()))
    path = out.error_table_path(root, subject, input_session, modality, dwi_session)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(frame_to_tsv(rows_to_frame(rows)))
    return path


def tensor_file(root: Path, subject: str) -> Path:
    path = out.tensor_map_paths(subject, "1", "pc-bssfp", root).diffusivity
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the group level only lists it
    return path


def plan_for(root: Path, subjects) -> RunPlan:
    config = Config(paths=PathSettings(bids_dir=root / "bids", output_dir=root, work_dir=root / "work"),
                    selection=SelectionSettings(analysis_level="group"),
                    resources=ResourceSettings(nprocs=1, omp_nthreads=1), run=RunSettings(run_uuid="test"))
    return RunPlan(config=config, participant_results={label: (tensor_file(root, label),) for label in subjects})


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("derivatives")
    tables = [write_participant_table(root, *pair, seed=index) for index, pair in enumerate(PAIRS)]
    broken = out.error_table_path(root, "04", "1", "pc-bssfp", "1")
    broken.parent.mkdir(parents=True)
    broken.write_text("not\ta table\n")
    assert run_group(plan_for(root, ["01", "02", "03", "04"])) == 0
    return root, tables


def test_group_table_is_the_union_of_the_participant_tables(group_run):
    root, tables = group_run
    group = read_table(out.group_errors_path(root))
    participant = pd.concat([read_table(path) for path in tables], ignore_index=True)
    assert len(group) == len(participant) == 4 * len(read_table(tables[0]))
    keys = ["participant_id", "input_session", "dwi_session", "modality", "tissue", "metric", "statistic"]
    pd.testing.assert_frame_equal(group.sort_values(keys).reset_index(drop=True),
                                  participant.sort_values(keys).reset_index(drop=True))
    assert set(group["participant_id"]) == {"sub-01", "sub-02"}


def test_group_summary_matches_a_hand_aggregation(group_run):
    root, tables = group_run
    summary = pd.read_csv(out.group_summary_path(root), sep="\t", na_values=["n/a"], keep_default_na=False)
    per_pair = []
    for path in tables:
        frame = read_table(path)
        selected = frame[(frame["modality"] == "pcbssfp") & (frame["tissue"] == "WM") & (frame["metric"] == "md")
                         & (frame["statistic"] == "weighted_mean")]
        per_pair.extend(selected["value"].tolist())
    assert len(per_pair) == 3  # the t1w pair is its own modality
    row = summary[(summary["modality"] == "pcbssfp") & (summary["tissue"] == "WM") & (summary["metric"] == "md")
                  & (summary["statistic"] == "weighted_mean")].iloc[0]
    assert row["n_pairs"] == 3 and row["n_subjects"] == 2
    assert row["median"] == pytest.approx(statistics.median(per_pair))
    assert row["mean"] == pytest.approx(statistics.fmean(per_pair))
    assert row["std"] == pytest.approx(statistics.pstdev(per_pair))
    # The predictions were scaled by 1.10, 1.20, 0.95 (+-5 % noise): MD errors near 10, 20, 5 %.
    assert sorted(per_pair) == pytest.approx([0.05, 0.10, 0.20], abs=0.02)
    t1w = summary[(summary["modality"] == "t1w") & (summary["metric"] == "psnr")].iloc[0]
    assert t1w["n_pairs"] == 1 and t1w["median"] == pytest.approx(22.0)


def test_group_report_lists_subjects_figures_and_reference_numbers(group_run):
    root, _ = group_run
    report = out.group_report_path(root)
    images = check_offline_html(report)
    assert {path.stem for path in images} == {"tensor-elements", "scalars", "angles"}
    assert all(path.parent == root / "group" / "figures" for path in images)
    text = report.read_text()
    assert SOURCE in text
    assert "~10 %" in text  # the thesis' pc-bSSFP diagonal error in WM (Figure 4.6), next to ours
    assert "<td>sub-01</td><td>included</td><td>3 error table(s)</td>" in text
    assert "<td>sub-03</td><td>excluded</td><td>no *_errors.tsv: no reference tensor" in text
    assert "<td>sub-04</td><td>excluded</td><td>" in text and "unreadable" in text


def test_without_reference_tensors_the_report_says_so_and_exits_zero(tmp_path):
    assert run_group(plan_for(tmp_path, ["01"])) == 0
    text = out.group_report_path(tmp_path).read_text()
    assert "No reference tensor" in text and "sub-01" in text
    assert not out.group_errors_path(tmp_path).exists()


def test_a_killed_group_runs_unfinished_files_are_removed(tmp_path):
    """A temporary file as a SIGKILLed writer leaves it (unlocked, older than STALE_AFTER_S) goes; the report
    is written."""
    import os

    stale = out.group_report_path(tmp_path).parent / ".group_report.k3j4h5g6.part.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html>half")
    os.utime(stale, (0, 0))
    assert run_group(plan_for(tmp_path, ["01"])) == 0
    assert not stale.exists() and out.group_report_path(tmp_path).is_file()


def test_without_participant_results_it_is_exit_66(tmp_path):
    with pytest.raises(MissingInputError) as error:
        run_group(plan_for(tmp_path, []))
    assert error.value.exit_code == EXIT_MISSING_INPUT == 66


def test_cli_group_level(tmp_path):
    from bssfp2dt.cli.run import main

    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "sub-02").mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    output = tmp_path / "out"
    assert main([str(bids), str(output), "group", "--skip-bids-validation"]) == EXIT_MISSING_INPUT
    tensor_file(output, "01")
    write_participant_table(output, "01", "1", "1", "pc-bssfp", 1.1, seed=0)
    assert main([str(bids), str(output), "group", "--skip-bids-validation"]) == 0
    assert out.group_errors_path(output).is_file() and out.group_report_path(output).is_file()
