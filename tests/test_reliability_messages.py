"""Messages that say what a path is, lists that stay short, unsafe checkpoints refused in plain words, and
nothing written before the device and the model are checked. Tiny front-door datasets, no pipeline run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import frontdoor_fixtures as fx

from bssfp2dt.cli import run as cli_run
from bssfp2dt.errors import EXIT_MISSING_INPUT, EXIT_NO_FILES_SELECTED, EXIT_USAGE, MissingInputError
from bssfp2dt.messages import capped, path_problem
from bssfp2dt.models.checkpoint import load_release_checkpoint

SKIP = "--skip-bids-validation"


def run_main(tmp: Path, capsys, *extra, dry_run: bool = True) -> tuple[int, str]:
    root = tmp / "bids"
    if not root.exists():
        fx.make_bids_dataset(root, sessions=(None,))
    argv = [str(root), str(tmp / "out"), "participant", "-w", str(tmp / "work"), SKIP, *map(str, extra)]
    code = cli_run.main(argv + (["--dry-run"] if dry_run else []))
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bssfp2dt: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0][len("bssfp2dt: error: "):]


@pytest.mark.parametrize("flag", ["--model", "--bids-filter-file"])
def test_a_directory_given_as_a_file_is_called_a_directory(tmp_path, capsys, flag):
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = run_main(tmp_path, capsys, flag, folder)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == f"{flag} {folder} is a directory, not a file; give the path of the file itself"


def test_a_symlink_loop_is_named_once_with_advice_that_helps(tmp_path, capsys):
    os.symlink(tmp_path / "b.pt", tmp_path / "a.pt")
    os.symlink(tmp_path / "a.pt", tmp_path / "b.pt")
    code, err = run_main(tmp_path, capsys, "--model", tmp_path / "a.pt")
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"--model {tmp_path / 'a.pt'} is a symbolic link that loops back on itself; point it "
                               "at the real file")


def test_a_looping_input_image_is_named_once(tmp_path, capsys):
    root = fx.make_bids_dataset(tmp_path / "bids", sessions=(None,))
    t1w = fx.t1w_path(root, "01", None)
    t1w.unlink()
    os.symlink(t1w, t1w)
    code, err = run_main(tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    message = error_line(err)
    assert message == f"{t1w} is a symbolic link that loops back on itself; point it at the real file"
    assert message.count(t1w.name) == 1


def test_a_looping_sidecar_is_named_instead_of_an_internal_error(tmp_path, capsys):
    root = fx.make_bids_dataset(tmp_path / "bids", sessions=(None,))
    sidecar = fx.sidecar(fx.t1w_path(root, "01", None))
    sidecar.unlink()
    os.symlink(sidecar, sidecar)
    code, err = run_main(tmp_path, capsys)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == f"{sidecar} is a symbolic link that loops back on itself; point it at the real file"


def test_thousands_of_unknown_labels_give_a_short_line(tmp_path, capsys):
    labels = [f"{n:04d}" for n in range(3000)]
    code, err = run_main(tmp_path, capsys, "--participant-label", *labels)
    assert code == EXIT_NO_FILES_SELECTED
    message = error_line(err)
    assert message == (f"--participant-label: no subject {', '.join('sub-' + label for label in labels[:10])}, ... and "
                       f"2990 more in {tmp_path / 'bids'}; available: 01")
    assert len(message) < 400


def test_capped_lists():
    assert capped(range(3)) == "0, 1, 2"
    assert capped(range(12)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... and 2 more"
    assert capped("abc", 2, " ") == "a b ... and 1 more"


def test_path_problem_tells_the_kinds_apart(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    assert path_problem(tmp_path / "file") is None
    assert path_problem(tmp_path, "directory") is None
    assert path_problem(tmp_path / "file", "directory") == "is a file, not a directory"
    assert path_problem(tmp_path / "missing") == "does not exist"
    assert path_problem(tmp_path / "broken") == (f"is a broken symbolic link (to {tmp_path / 'nowhere'}); point it "
                                                 "at an existing file")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_an_unsafe_checkpoint_is_refused_in_plain_words(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "bssfp2dt-release", "payload": _RunsCode()}, path)
    with pytest.raises(MissingInputError) as refused:
        load_release_checkpoint(path)
    message = refused.value.message
    assert message == (f"model checkpoint {path} is unsafe: it holds Python code objects (posix.system) besides "
                       "weights, and bssfp2dt never loads those; use a checkpoint exported by bssfp2dt from a source "
                       "you trust")
    assert "weights_only" not in message and "corrupt" not in message


def test_a_truncated_checkpoint_is_still_called_corrupt(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"weights": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MissingInputError) as refused:
        load_release_checkpoint(path)
    assert refused.value.message.startswith(f"model checkpoint {path} cannot be read (truncated or corrupt: ")


# --------------------------------------------------------------------------- check first, then write
def test_a_bad_model_writes_nothing(tmp_path, capsys):
    model = tmp_path / "garbage.pt"
    model.write_bytes(b"not a checkpoint")
    code, err = run_main(tmp_path, capsys, "--model", model, "--device", "cpu", dry_run=False)
    assert code == EXIT_MISSING_INPUT
    assert error_line(err) == (f"model checkpoint {model} cannot be read (truncated or corrupt: Unsupported operand "
                               "110); replace the file")  # torch's advice to drop weights_only is not repeated
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_a_missing_device_writes_nothing(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, "--device", "cuda", dry_run=False)
    assert code == EXIT_USAGE
    assert error_line(err).startswith("--device cuda: no CUDA GPU is visible to this process; use --device cpu")
    assert not (tmp_path / "out").exists()
