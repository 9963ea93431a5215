"""SIGKILL and resume: a participant run killed at any point finishes on rerun with the same work dir,
with outputs byte-identical to an uninterrupted run, and never shows a partial file under a final name.

One tiny simulated subject, a tiny untrained generator, the CLI in a child process (Gibbs removal and
DWI motion correction off, as in ``test_participant_pipeline``). The child wraps the CLI with two
slow-downs so the kills land where intended on any machine: the generator's forward pass sleeps (and
touches a marker file), and every NIfTI written under the output folder is first written half, then
after a pause in full (what a slow disk shows mid-write), all inside the code's own temporary files.

Kills (one chain, one work dir and one output folder, each run resuming the previous one):
  1. preprocessing: while the bSSFP registration node runs;
  2. prediction: inside the generator's forward pass;
  3. writing: after two of the prediction images are in place;
  4. evaluation: when the first figure appears.
A fifth run must exit 0. A parallel uninterrupted run in a fresh work dir is the reference. While the
killed runs are alive the output folder (and the work dir's NIfTI/summary files) is polled every 10 ms;
every file seen under its final name must be complete (NIfTI loads, JSON/TOML parse, TSV rows are whole,
PNG ends with its IEND chunk, HTML with ``</html>``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from helpers import tiny_config, tiny_pcbssfp_model

from bssfp2dt.preprocessing.workflow import workflow_name
from bssfp2dt.simulation.dataset import simulate_dataset

PATCH = 32  # >= every side of the tiny common grid
POLL_S = 0.01
RUN_TIMEOUT_S = 180
PREDICT_SLEEP_S = 0.5  # per generator forward pass (one patch covers the tiny volume)
WRITE_SLEEP_S = 0.15  # per output NIfTI, with the half-written temporary file on disk
PNG_END = b"IEND\xaeB`\x82"
N_MAPS = 8  # prediction images: tensor, FA, MD, AD, RD, inclination, azimuth, colour-FA

# The child: the CLI with the two slow-downs of the module docstring (settings in argv[1] as JSON).
CHILD = """
import json, sys, time
from pathlib import Path
import nibabel
settings = json.loads(sys.argv[1])
output, marker = Path(settings["output"]).resolve(), settings["marker"]
real_save = nibabel.save

def slow_save(image, filename, *args, **kwargs):
    real_save(image, filename, *args, **kwargs)
    path = Path(filename).resolve()
    if settings["write_sleep"] and output in path.parents:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        time.sleep(settings["write_sleep"])
        path.write_bytes(data)

nibabel.save = slow_save
from bssfp2dt.models.generator import Generator
real_forward = Generator.forward

def slow_forward(self, *args, **kwargs):
    if marker:
        Path(marker).touch()
    time.sleep(settings["predict_sleep"])
    return real_forward(self, *args, **kwargs)

Generator.forward = slow_forward
from bssfp2dt.cli.run import main
sys.exit(main(sys.argv[2:]))
"""


def is_temporary(path: Path) -> bool:
    """Names made by :func:`bssfp2dt.io.nifti.atomic_path` (``.<stem>.<random>.part<suffixes>``)."""
    return path.name.startswith(".") and ".part" in path.name


def incomplete(path: Path) -> str | None:
    """Why the file under its final name is not a complete file of its kind (None when it is)."""
    name = path.name
    try:
        if name.endswith((".nii.gz", ".nii")):
            image = nib.load(str(path))
            np.asarray(image.dataobj)  # reads (and for .gz decompresses and CRC-checks) every byte
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".toml"):
            tomllib.loads(path.read_text())
        elif name.endswith(".tsv"):
            lines = path.read_text().split("\n")
            if lines[-1] != "" or len({line.count("\t") for line in lines[:-1]}) != 1:
                return "TSV without a final newline or with a short row"
        elif name.endswith(".png"):
            if not path.read_bytes().endswith(PNG_END):
                return "PNG without its IEND chunk"
        elif name.endswith(".html"):
            if not path.read_text().endswith("</html>\n"):
                return "HTML without </html>"
        elif name.endswith((".md", ".bidsignore")):
            if not path.read_text().endswith("\n"):
                return "text without its final newline"
        else:
            return None
    except FileNotFoundError:
        return None  # replaced or removed between listing and reading
    except Exception as error:  # noqa: BLE001 - any failure to parse is an incomplete file
        return f"{type(error).__name__}: {error}"
    return None


class FinalNameWatch:
    """Checks every file that appears under a final name, once per (inode, size, mtime)."""

    def __init__(self, output_dir: Path, work_dir: Path):
        self.output_dir, self.work_dir = output_dir, work_dir
        self.seen: set[tuple] = set()
        self.problems: list[str] = []

    def candidates(self):
        if self.output_dir.is_dir():
            # participant.log is appended to line by line, not written once
            yield from (path for path in self.output_dir.rglob("*") if path.name != "participant.log")
        if self.work_dir.is_dir():  # the pipeline's own files in the nipype node folders
            yield from self.work_dir.rglob("*.nii.gz")
            yield from self.work_dir.rglob("*_preproc.json")

    def scan(self) -> None:
        for path in self.candidates():
            if is_temporary(path):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if not path.is_file():
                continue
            key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if key in self.seen:
                continue
            self.seen.add(key)
            problem = incomplete(path)
            if problem:
                self.problems.append(f"{path}: {problem}")


def child_argv(bids_dir: Path, output_dir: Path, work_dir: Path, model: Path, *, marker: Path | None = None,
               slow: bool = False) -> list[str]:
    settings = {"output": str(output_dir), "marker": str(marker) if marker else "",
                "predict_sleep": PREDICT_SLEEP_S if slow else 0.0, "write_sleep": WRITE_SLEEP_S if slow else 0.0}
    return [sys.executable, "-c", CHILD, json.dumps(settings), str(bids_dir), str(output_dir), "participant",
            "--model", str(model), "-w", str(work_dir), "--patch-size", str(PATCH), "--nprocs", "1",
            "--omp-nthreads", "1", "--skip-bids-validation", "--device", "cpu", "--unringing-method", "none",
            "--hmc-model", "none"]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_until(argv: list[str], log: Path, watch: FinalNameWatch, kill_when: Callable[[], bool] | None) -> int:
    """Run the child, polling ``watch``; SIGKILL its process group once ``kill_when()``. The exit status."""
    process = start(argv, log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while process.poll() is None:
            watch.scan()
            if kill_when is not None and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"participant run still going after {RUN_TIMEOUT_S} s; log {log}")
            time.sleep(POLL_S)
        return process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        watch.scan()


def output_files(output_dir: Path) -> dict[Path, bytes]:
    """Every file (relative path -> bytes) except ``sub-*/log/<run-uuid>/``: one folder per run, named by
    the run's uuid, holding that run's config and timestamped log."""
    return {path.relative_to(output_dir): path.read_bytes() for path in sorted(output_dir.rglob("*"))
            if path.is_file() and path.relative_to(output_dir).parts[1:2] != ("log",)}


def prediction_images(output_dir: Path) -> list[Path]:
    return sorted(path for path in output_dir.rglob("*_dwimap.nii.gz")
                  if "error" not in path.name and not is_temporary(path))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The reference run and the chain of killed runs; what each run left behind."""
    root = tmp_path_factory.mktemp("resume")
    bids_dir = simulate_dataset(root / "bids", tiny_config(), progress=False)
    model, _ = tiny_pcbssfp_model(bids_dir, root / "tiny.pt")
    reference = start(child_argv(bids_dir, root / "reference", root / "reference_work", model),
                      root / "reference.log")
    out, work, marker = root / "out", root / "work", root / "predicting"
    nodes = work / workflow_name("01")
    watch = FinalNameWatch(out, work)
    figures = out / "sub-01" / "figures"
    kill_points = {
        "preprocessing": lambda: any((nodes / "bssfp_register_ses1").glob("_0x*_unfinished.json")),
        "prediction": marker.exists,
        "writing": lambda: len(prediction_images(out)) >= 2,
        "evaluation": lambda: figures.is_dir() and any(figures.glob("*.png")),
    }
    codes, left = {}, {}
    started = time.perf_counter()
    for stage, kill_when in kill_points.items():
        codes[stage] = run_until(child_argv(bids_dir, out, work, model, marker=marker, slow=True),
                                 root / f"{stage}.log", watch, kill_when)
        left[stage] = {"results": sorted(path.name for path in nodes.glob("*/result_*.pklz")),
                       "images": len(prediction_images(out)), "report": (out / "sub-01.html").exists(),
                       "result_mtimes": {path: path.stat().st_mtime_ns for path in nodes.glob("*/result_*.pklz")}}
    codes["final"] = run_until(child_argv(bids_dir, out, work, model), root / "final.log", watch, None)
    chain_s = time.perf_counter() - started
    reference_code = reference.wait(timeout=RUN_TIMEOUT_S)
    return {"root": root, "out": out, "work": work, "nodes": nodes, "codes": codes, "left": left,
            "watch": watch, "reference_code": reference_code, "reference": root / "reference", "chain_s": chain_s}


def log_tail(chain, name: str) -> str:
    return (chain["root"] / f"{name}.log").read_text()[-3000:]


def test_each_kill_landed_in_its_stage(chain):
    codes, left = chain["codes"], chain["left"]
    for stage in ("preprocessing", "prediction", "writing", "evaluation"):
        assert codes[stage] == -signal.SIGKILL, f"{stage}: exit {codes[stage]}\n{log_tail(chain, stage)}"
    assert "result_t1w_mask_0.pklz" in left["preprocessing"]["results"]
    assert "result_bssfp_register_ses1.pklz" not in left["preprocessing"]["results"]
    assert "result_collect_ses1.pklz" in left["prediction"]["results"] and left["prediction"]["images"] == 0
    assert 2 <= left["writing"]["images"] < N_MAPS
    assert left["evaluation"]["images"] == N_MAPS and not left["evaluation"]["report"]


def test_rerun_exits_0_and_matches_an_uninterrupted_run_byte_for_byte(chain):
    assert chain["reference_code"] == 0, log_tail(chain, "reference")
    assert chain["codes"]["final"] == 0, log_tail(chain, "final")
    expected, resumed = output_files(chain["reference"]), output_files(chain["out"])
    assert len(expected) > 40 and sorted(resumed) == sorted(expected)  # no stale temporary files either
    different = [str(path) for path in expected if resumed[path] != expected[path]]
    assert not different


def test_finished_nodes_are_not_run_again_after_a_kill(chain):
    """Nodes finished before the first kill keep their result files (nipype reused them)."""
    before = chain["left"]["preprocessing"]["result_mtimes"]
    assert before
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_no_partial_file_was_ever_visible_under_a_final_name(chain):
    watch = chain["watch"]
    assert not watch.problems
    checked = {path for path, *_ in watch.seen}
    # the watch saw the outputs of every stage, among them the ones written while a kill was due
    assert any(path.name.endswith("_dwimap.nii.gz") for path in checked)
    assert any(path.suffix == ".png" for path in checked) and any(path.suffix == ".tsv" for path in checked)


def test_the_watch_flags_partial_files(tmp_path):
    """The check itself fails on truncated files of each kind (so a passing poll means something)."""
    from bssfp2dt.io.nifti import save_nifti, write_json

    out = tmp_path / "out"
    image = save_nifti(np.arange(4000, dtype=np.float32).reshape(10, 20, 20), np.eye(4), out / "a_dwimap.nii.gz")
    sidecar = write_json({"Units": "mm^2/s", "Sources": ["bids:raw:x"]}, out / "a_dwimap.json")
    table = out / "a_errors.tsv"
    table.write_text("a\tb\n1\t2\n3\t4\n")
    watch = FinalNameWatch(out, tmp_path / "work")
    watch.scan()
    assert watch.problems == []
    for path in (image, sidecar, table):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 1])
    watch.scan()
    assert sorted(Path(problem.split(":")[0]).name for problem in watch.problems) == sorted(
        path.name for path in (image, sidecar, table))
