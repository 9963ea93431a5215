"""The command line: every flag in both spellings, usage errors exit 64, --help/--version stay light."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bssfp2dt import __version__
from bssfp2dt.cli.parser import build_parser, device_name, memory_mb, parse_args
from bssfp2dt.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
POSITIONAL = ["/data/bids", "/data/out", "participant"]


def parse(*options: str):
    return parse_args(POSITIONAL + list(options))


def test_positionals_and_defaults():
    args = parse()
    assert (args.bids_dir, args.output_dir, args.analysis_level) == (Path("/data/bids"), Path("/data/out"),
                                                                     "participant")
    assert args.participant_label is None and args.session_label is None
    assert (args.device, args.input_modality, args.train_stage) == ("auto", "pc-bssfp", None)
    assert (args.patch_size, args.batch_size, args.max_epochs, args.seed) == (None, 1, 100, 0)
    assert not any((args.skip_bids_validation, args.write_preproc, args.stop_on_first_crash, args.dry_run))
    assert args.derivatives == [] and args.verbose == 0


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_participant_label_spellings(flag):
    assert parse(flag, "01", "sub-02").participant_label == ["01", "sub-02"]


@pytest.mark.parametrize("flag", ["--session-label", "--session_label"])
def test_session_label_spellings(flag):
    assert parse(flag, "ses-1", "2").session_label == ["ses-1", "2"]


@pytest.mark.parametrize("flag", ["--skip-bids-validation", "--skip_bids_validation"])
def test_skip_validation_spellings(flag):
    assert parse(flag).skip_bids_validation is True


@pytest.mark.parametrize(("option", "value", "attribute", "expected"), [
    ("--bids-filter-file", "f.json", "bids_filter_file", Path("f.json")),
    ("--bids_filter_file", "f.json", "bids_filter_file", Path("f.json")),
    ("-w", "/scratch", "work_dir", Path("/scratch")),
    ("--work-dir", "/scratch", "work_dir", Path("/scratch")),
    ("--work_dir", "/scratch", "work_dir", Path("/scratch")),
    ("--nprocs", "4", "nprocs", 4),
    ("--omp-nthreads", "2", "omp_nthreads", 2),
    ("--omp_nthreads", "2", "omp_nthreads", 2),
    ("--mem", "8G", "mem", 8192),
    ("--mem-mb", "16000", "mem", 16000),
    ("--mem_mb", "4G", "mem", 4096),
    ("--device", "cuda:1", "device", "cuda:1"),
    ("--device", "CPU", "device", "cpu"),
    ("--model", "m.ckpt", "model", Path("m.ckpt")),
    ("--model-size", "tiny", "model_size", "tiny"),
    ("--model_size", "small", "model_size", "small"),
    ("--input-modality", "t1w", "input_modality", "t1w"),
    ("--input_modality", "dwi-tensor", "input_modality", "dwi-tensor"),
    ("--train-stage", "head", "train_stage", "head"),
    ("--train_stage", "finetune", "train_stage", "finetune"),
    ("--init-checkpoint", "c.ckpt", "init_checkpoint", Path("c.ckpt")),
    ("--init_checkpoint", "c.ckpt", "init_checkpoint", Path("c.ckpt")),
    ("--max-epochs", "7", "max_epochs", 7),
    ("--max_epochs", "7", "max_epochs", 7),
    ("--patch-size", "32", "patch_size", 32),
    ("--patch_size", "32", "patch_size", 32),
    ("--batch-size", "3", "batch_size", 3),
    ("--batch_size", "3", "batch_size", 3),
    ("--seed", "42", "seed", 42),
    ("--learning-rate", "3e-4", "learning_rate", 3e-4),
    ("--learning_rate", "0.001", "learning_rate", 1e-3),
    ("--early-stopping-patience", "12", "patience", 12),
    ("--early_stopping_patience", "1", "patience", 1),
    ("--split-fractions", "0.85,0.15,0", "split_fractions", (0.85, 0.15, 0.0)),
    ("--split_fractions", "1,0,0", "split_fractions", (1.0, 0.0, 0.0)),
])
def test_valued_options(option, value, attribute, expected):
    assert getattr(parse(option, value), attribute) == expected


@pytest.mark.parametrize(("flag", "attribute"), [
    ("--write-preproc", "write_preproc"), ("--write_preproc", "write_preproc"),
    ("--stop-on-first-crash", "stop_on_first_crash"), ("--stop_on_first_crash", "stop_on_first_crash"),
    ("--dry-run", "dry_run"), ("--dry_run", "dry_run"),
])
def test_switches(flag, attribute):
    assert getattr(parse(flag), attribute) is True


def test_derivatives_name_path_pairs():
    args = parse("--derivatives", "smriprep=/d/smriprep", "/d/fmriprep")
    assert args.derivatives == [("smriprep", Path("/d/smriprep")), ("fmriprep", Path("/d/fmriprep"))]


def test_verbose_is_counted():
    assert parse("-v").verbose == 1
    assert parse("-vv").verbose == 2
    assert parse("--verbose", "-v").verbose == 2


@pytest.mark.parametrize(("text", "megabytes"), [
    ("8G", 8192), ("8GB", 8192), ("8gb", 8192), ("8000M", 8000), ("8000MB", 8000), ("512MiB", 512),
    ("1.5G", 1536), ("2T", 2 * 1024 ** 2), ("16000", 16000), ("16", 16), ("2048K", 2),
])
def test_memory_sizes(text, megabytes):
    assert memory_mb(text) == megabytes


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices(text):
    assert device_name(text) == text


@pytest.mark.parametrize("options", [
    [],  # missing positionals
    ["/d/bids"],
    ["/d/bids", "/d/out", "participant", "--unknown-flag"],
    ["/d/bids", "/d/out", "participant", "--mem", "lots"],
    ["/d/bids", "/d/out", "participant", "--mem", "0M"],
    ["/d/bids", "/d/out", "participant", "--device", "gpu"],
    ["/d/bids", "/d/out", "participant", "--device", "cuda:x"],
    ["/d/bids", "/d/out", "participant", "--nprocs", "0"],
    ["/d/bids", "/d/out", "participant", "--nprocs", "two"],
    ["/d/bids", "/d/out", "participant", "--omp-nthreads", "-1"],
    ["/d/bids", "/d/out", "participant", "--input-modality", "flair"],
    ["/d/bids", "/d/out", "participant", "--train-stage", "pretrain"],
    ["/d/bids", "/d/out", "participant", "--model-size", "huge"],
    ["/d/bids", "/d/out", "participant", "--patch-size", "0"],
    ["/d/bids", "/d/out", "participant", "--seed", "-3"],
    ["/d/bids", "/d/out", "participant", "--learning-rate", "0"],
    ["/d/bids", "/d/out", "participant", "--learning-rate", "nan"],
    ["/d/bids", "/d/out", "participant", "--learning-rate", "fast"],
    ["/d/bids", "/d/out", "participant", "--early-stopping-patience", "0"],
    ["/d/bids", "/d/out", "participant", "--split-fractions", "0.7,0.3"],
    ["/d/bids", "/d/out", "participant", "--split-fractions", "0.5,0.3,0.3"],
    ["/d/bids", "/d/out", "participant", "--split-fractions", "0,0.5,0.5"],
    ["/d/bids", "/d/out", "participant", "--split-fractions", "0.8,-0.1,0.3"],
    ["/d/bids", "/d/out", "participant", "--split-fractions", "a,b,c"],
    ["/d/bids", "/d/out", "participant", "--derivatives", "name="],
    ["/d/bids", "/d/out", "participant", "--participant-label"],
])
def test_usage_errors_exit_64(options, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(options)
    assert caught.value.code == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_groups_are_named():
    titles = {group.title for group in build_parser()._action_groups}
    assert {"Selecting inputs", "Resources", "Model and inference", "Training (instead of inference)",
            "Run control"} <= titles


def test_version_reads_the_version_file(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"bssfp2dt {(REPO / 'version').read_text().strip()}"
    assert __version__ == (REPO / "version").read_text().strip()


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_neither_torch_nor_pybids(flag):
    # A fresh interpreter: the sys.modules of this test session already hold whatever other tests imported.
    probe = ("import sys\nfrom bssfp2dt.cli.run import main\n"
             f"try:\n    main([{flag!r}])\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'bids', 'nibabel', 'monai', 'lightning') if m in sys.modules)\n"
             "print('CODE', code, 'HEAVY', ','.join(heavy) or '-')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "CODE 0 HEAVY -"


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "bssfp2dt.cli.run", "--version"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"bssfp2dt {__version__}"
    result = subprocess.run([sys.executable, "-m", "bssfp2dt.cli.run", "/x", "/y"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == EXIT_USAGE


def test_preprocessing_options_reach_the_workflow_settings(tmp_path):
    """--unringing-method / --hmc-model (QSIPrep's names) switch the optional preprocessing steps."""
    from bssfp2dt.cli.parser import parse_args
    from bssfp2dt.config import config_from_args, load_toml, save_toml
    from bssfp2dt.io.bids import DEFAULT_QUERIES
    from bssfp2dt.preprocessing.workflow import settings_from_config

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    default = config_from_args(parse_args([str(bids), str(tmp_path / "out"), "participant"]), "run", DEFAULT_QUERIES)
    assert settings_from_config(default).gibbs and settings_from_config(default).motion_correction
    off = config_from_args(parse_args([str(bids), str(tmp_path / "out"), "participant", "--unringing-method", "none",
                                       "--hmc_model", "none"]), "run", DEFAULT_QUERIES)
    assert not settings_from_config(off).gibbs and not settings_from_config(off).motion_correction
    assert default.preprocessing.denoise_method == "none" and settings_from_config(default).denoise == "none"
    assert load_toml(save_toml(off, tmp_path / "c.toml")) == off
    with pytest.raises(SystemExit) as raised:
        parse_args([str(bids), str(tmp_path / "out"), "participant", "--hmc-model", "eddy"])
    assert raised.value.code == 64


def test_perceptual_weights_must_exist_and_reach_the_training_settings(tmp_path):
    from bssfp2dt.cli.parser import parse_args
    from bssfp2dt.config import config_from_args
    from bssfp2dt.errors import MissingInputError
    from bssfp2dt.io.bids import DEFAULT_QUERIES

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    weights = tmp_path / "resnet_10.pth"
    weights.write_bytes(b"weights")
    base = [str(bids), str(tmp_path / "out"), "participant", "--train-stage", "direct"]
    config = config_from_args(parse_args(base + ["--perceptual-weights", str(weights)]), "run", DEFAULT_QUERIES)
    assert config.training.perceptual_weights == weights.resolve()
    with pytest.raises(MissingInputError) as raised:
        config_from_args(parse_args(base + ["--perceptual_weights", str(tmp_path / "missing.pth")]), "run",
                         DEFAULT_QUERIES)
    assert "--perceptual-weights" in str(raised.value)


def test_learning_rate_patience_and_split_reach_the_training_settings_and_round_trip(tmp_path):
    from bssfp2dt.cli.parser import parse_args
    from bssfp2dt.config import config_from_args, load_toml, save_toml
    from bssfp2dt.io.bids import DEFAULT_QUERIES

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    base = [str(bids), str(tmp_path / "out"), "participant", "--train-stage", "direct"]
    default = config_from_args(parse_args(base), "run", DEFAULT_QUERIES)
    assert (default.training.learning_rate, default.training.patience) == (None, 5)
    assert default.training.split_fractions == (0.7, 0.15, 0.15)
    tuned = config_from_args(parse_args(base + ["--learning-rate", "2e-3", "--early-stopping-patience", "9",
                                                "--split-fractions", "0.8,0.2,0"]), "run", DEFAULT_QUERIES)
    assert (tuned.training.learning_rate, tuned.training.patience) == (2e-3, 9)
    assert tuned.training.split_fractions == (0.8, 0.2, 0.0)
    assert load_toml(save_toml(tuned, tmp_path / "c.toml")) == tuned
    assert load_toml(save_toml(default, tmp_path / "d.toml")) == default


def test_parser_defaults_are_the_config_defaults():
    """Each default is written once, in the config dataclasses: an option left out parses to its field's default
    (``--output-spaces`` and ``--derivatives`` are resolved by config_from_args, checked with their resolvers)."""
    import dataclasses

    from bssfp2dt import config

    args = vars(parse())
    renamed = {"verbosity": "verbose"}
    checked = set()
    for settings in (config.PathSettings, config.SelectionSettings, config.ResourceSettings, config.ModelSettings,
                     config.PreprocessingOptions, config.TrainingSettings, config.RunSettings):
        for item in dataclasses.fields(settings):
            dest = renamed.get(item.name, item.name)
            if dest not in args or (item.default is dataclasses.MISSING
                                    and item.default_factory is dataclasses.MISSING):
                continue
            expected = config.field_default(settings, item.name)
            if dest == "output_spaces":
                assert config.output_spaces(args[dest]) == expected
            elif dest == "derivatives":
                assert config._derivative_sources(args[dest]) == expected
            else:
                assert args[dest] == expected, dest
            checked.add(dest)
    assert {"device", "batch_size", "max_epochs", "lr_schedule", "recipe", "patience", "split_fractions", "seed",
            "unringing_method", "denoise_method", "hmc_model", "registration_backend", "input_modality",
            "verbose"} <= checked


def test_denoise_method_dwidenoise_reaches_the_settings_or_stops_the_run_without_mrtrix(tmp_path, monkeypatch):
    """--denoise-method dwidenoise (QSIPrep's name): MRtrix3's MP-PCA; without the binary a one-line usage
    error (exit 64) that names the Debian package."""
    from bssfp2dt.cli.parser import parse_args
    from bssfp2dt.config import config_from_args, load_toml, save_toml
    from bssfp2dt.errors import UsageError
    from bssfp2dt.io.bids import DEFAULT_QUERIES
    from bssfp2dt.preprocessing import dwi
    from bssfp2dt.preprocessing.workflow import settings_from_config

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    config = config_from_args(parse_args([str(bids), str(tmp_path / "out"), "participant", "--denoise-method",
                                          "dwidenoise"]), "run", DEFAULT_QUERIES)
    assert config.preprocessing.denoise_method == "dwidenoise"
    assert load_toml(save_toml(config, tmp_path / "c.toml")) == config
    monkeypatch.setattr(dwi, "dwidenoise_available", lambda: True)
    assert settings_from_config(config).denoise == "dwidenoise"
    monkeypatch.setattr(dwi, "dwidenoise_available", lambda: False)
    with pytest.raises(UsageError, match="Debian package mrtrix3") as raised:
        settings_from_config(config)
    assert raised.value.exit_code == 64 and "\n" not in raised.value.message
    with pytest.raises(SystemExit) as raised:
        parse_args([str(bids), str(tmp_path / "out"), "participant", "--denoise-method", "mppca"])
    assert raised.value.code == 64
