"""Resolved configuration: checks after parsing, label handling, filter merging and the TOML round trip."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from frontdoor_fixtures import write_description

from bssfp2dt.cli.parser import parse_args
from bssfp2dt.config import tomllib  # tomli on Python 3.10
from bssfp2dt.config import (Config, DerivativeSource, ModelSettings, PathSettings, ResourceSettings,
                             RunSettings, SelectionSettings, TrainingSettings, config_from_args, load_toml,
                             merge_queries, save_toml)
from bssfp2dt.errors import (AnalysisLevelError, InvalidBIDSError, MissingInputError, OutputError,
                             UsageError)
from bssfp2dt.io.bids import DEFAULT_QUERIES


@pytest.fixture()
def bids_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    root.mkdir()
    write_description(root)
    return root


def resolve(bids_dir: Path, output_dir: Path, *options: str, level: str = "participant") -> Config:
    args = parse_args([str(bids_dir), str(output_dir), level, *options])
    return config_from_args(args, "20260101-000000_test", DEFAULT_QUERIES)


def test_resolves_paths_and_labels(bids_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve(Path("bids"), Path("out"), "--participant-label", "sub-01", "02", "01",
                     "--session-label", "ses-1", "-w", "work", "--nprocs", "3", "--omp-nthreads", "2",
                     "--mem", "8000M", "--device", "cuda:1")
    assert config.paths.bids_dir == bids_dir.resolve()
    assert config.paths.output_dir == (tmp_path / "out").resolve()
    assert config.paths.work_dir == (tmp_path / "work").resolve()
    assert config.selection.participant_labels == ("01", "02")  # prefix stripped, duplicate dropped
    assert config.selection.session_labels == ("1",)
    assert config.resources == ResourceSettings(nprocs=3, omp_nthreads=2, mem_mb=8000, device="cuda:1")
    assert config.run.run_uuid == "20260101-000000_test"


def test_participant_labels_from_a_file(bids_dir, tmp_path):
    label_file = tmp_path / "labels.txt"
    label_file.write_text("sub-03\n\n04\n")
    config = resolve(bids_dir, tmp_path / "out", "--participant_label", str(label_file), "05")
    assert config.selection.participant_labels == ("03", "04", "05")


def test_default_resources(bids_dir, tmp_path):
    import os

    config = resolve(bids_dir, tmp_path / "out")
    assert config.resources.nprocs == len(os.sched_getaffinity(0))
    assert config.resources.omp_nthreads == min(8, config.resources.nprocs)
    assert config.resources.mem_mb is None


def test_output_under_bids_derivatives_is_allowed(bids_dir):
    config = resolve(bids_dir, bids_dir / "derivatives" / "bssfp2dt", "-w", str(bids_dir.parent / "work"))
    assert config.paths.output_dir == bids_dir / "derivatives" / "bssfp2dt"


@pytest.mark.parametrize(("output", "options", "error", "fragment"), [
    ("bids", [], UsageError, "is bids_dir"),
    ("bids/sub-01", [], UsageError, "inside bids_dir"),
    ("bids/derivatives", [], UsageError, "inside bids_dir"),  # derivatives/ itself, not a pipeline folder
    ("out", ["-w", "bids/work"], UsageError, "--work-dir"),
    ("out", ["-w", "out/work"], UsageError, "inside output_dir"),
    ("out", ["--nprocs", "2", "--omp-nthreads", "4"], UsageError, "--omp-nthreads 4"),
    ("out", ["--participant-label", "sub_01"], UsageError, "sub_01"),
    ("out", ["--session-label", "a-b"], UsageError, "a-b"),
    ("out", ["--init-checkpoint", "bids/dataset_description.json"], UsageError, "--init-checkpoint needs"),
    ("out", ["--model", "missing.ckpt"], MissingInputError, "missing.ckpt"),
    ("out", ["--bids-filter-file", "nofile.json"], MissingInputError, "nofile.json"),
    ("out", ["--derivatives", "x=nowhere"], MissingInputError, "nowhere"),
    ("a_file/out", [], OutputError, "a_file is not a directory"),  # root could write anywhere else
])
def test_consistency_checks(bids_dir, tmp_path, monkeypatch, output, options, error, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(error) as caught:
        resolve(Path("bids"), Path(output), *options)
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message


def test_training_only_at_participant_level(bids_dir, tmp_path):
    with pytest.raises(UsageError):
        resolve(bids_dir, tmp_path / "out", "--train-stage", "direct", level="group")


def test_bad_level_and_bids_dir(tmp_path, bids_dir):
    with pytest.raises(AnalysisLevelError):
        resolve(bids_dir, tmp_path / "out", level="subject")
    with pytest.raises(MissingInputError):
        resolve(tmp_path / "absent", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidBIDSError):
        resolve(tmp_path / "empty", tmp_path / "out")


def test_filter_file_merges_over_defaults(bids_dir, tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": None, "run": "*"}, "dwi": {"direction": "AP"}}))
    queries = resolve(bids_dir, tmp_path / "out", "--bids-filter-file", str(filters)).selection.queries
    assert queries["t1w"] == {**DEFAULT_QUERIES["t1w"], "acquisition": None, "run": "*"}
    assert queries["dwi"]["direction"] == "AP" and queries["dwi"]["suffix"] == "dwi"
    assert queries["bssfp_mag"] == DEFAULT_QUERIES["bssfp_mag"]


@pytest.mark.parametrize("content", ['{"t2w": {"suffix": "T2w"}}', '{"t1w": ["T1w"]}', '{"t1w": {"run": {"a": 1}}}',
                                     '[1, 2]', '{"t1w": '])
def test_bad_filter_files_are_usage_errors(bids_dir, tmp_path, content):
    filters = tmp_path / "filters.json"
    filters.write_text(content)
    with pytest.raises(UsageError) as caught:
        resolve(bids_dir, tmp_path / "out", "--bids-filter-file", str(filters))
    assert str(filters) in caught.value.message


def test_merge_queries_does_not_touch_the_defaults():
    before = json.dumps(DEFAULT_QUERIES, sort_keys=True)
    merged = merge_queries(DEFAULT_QUERIES, {"t1w": {"suffix": "T1map"}}, None)
    assert merged["t1w"]["suffix"] == "T1map"
    assert json.dumps(DEFAULT_QUERIES, sort_keys=True) == before


def full_config() -> Config:
    return Config(
        paths=PathSettings(bids_dir=Path("/d/bids"), output_dir=Path("/d/out"), work_dir=Path("/tmp/w"),
                           bids_filter_file=Path("/d/f.json"),
                           derivatives=(DerivativeSource("smriprep", Path("/d/smriprep")),
                                        DerivativeSource("fmriprep", Path("/d/fmriprep")))),
        selection=SelectionSettings(analysis_level="participant", participant_labels=("01", "02"),
                                    session_labels=("1",), input_modality="t1w",
                                    bids_queries=json.dumps({"t1w": {"acquisition": None, "run": "*"}})),
        resources=ResourceSettings(nprocs=4, omp_nthreads=2, mem_mb=8192, device="cuda:0"),
        model=ModelSettings(model=Path("/m.ckpt"), model_size="tiny", patch_size=32, batch_size=2,
                            write_preproc=True),
        training=TrainingSettings(stage="head", init_checkpoint=Path("/c.ckpt"), max_epochs=5, seed=7),
        run=RunSettings(run_uuid="20260101-000000_abc", skip_bids_validation=True, stop_on_first_crash=True,
                        dry_run=False, verbosity=2),
    )


def minimal_config() -> Config:
    return Config(paths=PathSettings(bids_dir=Path("/d/bids"), output_dir=Path("/d/out"), work_dir=Path("/w")),
                  selection=SelectionSettings(analysis_level="group"),
                  resources=ResourceSettings(nprocs=1, omp_nthreads=1),
                  run=RunSettings(run_uuid="u"))


@pytest.mark.parametrize("config", [full_config(), minimal_config()], ids=["full", "minimal"])
def test_toml_round_trip(tmp_path, config):
    path = save_toml(config, tmp_path / "log" / "bssfp2dt.toml")
    loaded = load_toml(path)
    assert loaded == config
    assert type(loaded.paths.derivatives) is tuple and type(loaded.paths.work_dir) is type(config.paths.work_dir)
    # Independent reader: the file is plain TOML with the expected tables, None values left out.
    raw = tomllib.loads(path.read_text())
    assert set(raw) == {"paths", "selection", "resources", "model", "training", "run", "preprocessing"}
    if config.model.model is None:
        assert "model" not in raw["model"] and "mem_mb" not in raw["resources"]


def test_resolved_config_round_trips(bids_dir, tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": None}}))
    config = resolve(bids_dir, tmp_path / "out", "--bids-filter-file", str(filters), "--derivatives",
                     f"s={bids_dir}", "--mem", "4G")
    subject_config = config.for_subject("01")
    assert subject_config.selection.participant_labels == ("01",)
    assert load_toml(save_toml(subject_config, tmp_path / "c.toml")) == subject_config
    assert subject_config.selection.queries["t1w"]["acquisition"] is None


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        full_config().paths.bids_dir = Path("/elsewhere")  # type: ignore[misc]
