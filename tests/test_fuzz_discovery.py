"""Fuzz of the input discovery on random BIDS-like trees.

A seeded generator builds small trees (4^3 images) from a valid layout and breaks them at random:
files left out or misnamed, missing or broken sidecars, wrong dimensions, empty, truncated or junk
files, junk files and folders, extra and empty sessions, duplicated series. Whatever the tree,
``discover`` + ``require_inputs`` must either return typed, self-consistent inputs or raise a
:class:`Bssfp2dtError` subclass with a one-line message; any other exception is a bug.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import frontdoor_fixtures as fx

from bssfp2dt.cli.parser import parse_args
from bssfp2dt.config import config_from_args
from bssfp2dt.errors import Bssfp2dtError
from bssfp2dt.io import bids as bids_io

N_TREES = 30
SIDE = 4
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
IMAGE_FAULTS = ("absent", "empty", "junk", "truncated", "dims", "no_sidecar", "bad_sidecar", "misnamed",
                "singleton", "uncompressed")
# Per tree, the chance that each file is broken: clean trees check the typed results, broken ones the errors.
FAULT_RATES = (0.0, 0.0, 0.05, 0.1, 0.2, 0.4)
SIDECAR_FAULTS = ("not_json", "empty", "list", "wrong_types", "intended_for")


class Tree:
    """Writes one random tree; every decision comes from ``rng`` (so a seed reproduces the tree)."""

    def __init__(self, root: Path, rng: np.random.Generator):
        self.root, self.rng = root, rng
        self.rate = FAULT_RATES[int(rng.integers(len(FAULT_RATES)))]

    def faulty(self) -> bool:
        return self.chance(self.rate)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    # ------------------------------------------------------------------ files
    def image(self, path: Path, shape: tuple[int, ...], sidecar: dict, *, integer: bool = False) -> None:
        fault = self.pick(IMAGE_FAULTS) if self.faulty() else "ok"
        if fault == "absent":
            return
        if fault == "misnamed":
            path = path.with_name(self.pick([path.name.replace("sub-", "sub"), path.name.lower(),
                                             path.name.replace("_", "-", 1), path.name + ".bak",
                                             path.name.replace(".nii.gz", "_run-x.nii.gz")]))
        if fault == "uncompressed":
            path = path.with_name(path.name.replace(".nii.gz", ".nii"))
        if fault == "dims":
            volumes = int(self.rng.integers(2, 14))
            shape = self.pick([shape[:3], shape[:2], shape + (2,), (SIDE, 0, SIDE), shape[:3] + (volumes,)])
        if fault == "singleton":
            shape = shape[:3] + (1,) + shape[3:]
        path.parent.mkdir(parents=True, exist_ok=True)
        if fault == "empty":
            path.write_bytes(b"")
        elif fault == "junk":
            path.write_bytes(self.rng.bytes(int(self.rng.integers(1, 600))))
        else:
            data = (self.rng.integers(0, 4096, shape).astype(np.int16) if integer
                    else self.rng.uniform(0, 1000, shape).astype(np.float32))
            # Saved under a NIfTI name first: nibabel picks the format from the extension.
            written = path.with_name("written" + (".nii" if fault == "uncompressed" else ".nii.gz"))
            nib.save(nib.Nifti1Image(data, AFFINE), written)
            written.rename(path)
            if fault == "truncated" and path.name.endswith(".gz"):
                raw = gzip.decompress(path.read_bytes())
                path.write_bytes(gzip.compress(raw[: int(self.rng.integers(0, len(raw)))]))
        if fault != "no_sidecar":
            self.sidecar(fx.sidecar(path) if path.name.endswith(".nii.gz") else path.with_suffix(".json"),
                         sidecar, broken=fault == "bad_sidecar")

    def sidecar(self, path: Path, content: dict, broken: bool) -> None:
        if not broken:
            fx.write_json(path, content)
            return
        fault = self.pick(SIDECAR_FAULTS)
        if fault == "not_json":
            path.write_text("{" + json.dumps(content)[1:-3])
        elif fault == "empty":
            path.write_text("")
        elif fault == "list":
            path.write_text(json.dumps(list(content)))
        elif fault == "wrong_types":
            key = self.pick(sorted(content) or ["RepetitionTime"])
            fx.write_json(path, {**content, key: self.pick(["fast", None, [1, 2], {"a": 1}, True, "j"])})
        else:
            fx.write_json(path, {**content, "IntendedFor": self.pick([3, {"a": "b"}, [1], "sub-01/dwi/x.nii.gz"])})

    def text(self, path: Path, lines: list[str]) -> None:
        fault = self.pick(["absent", "short", "junk", "nan"]) if self.faulty() else "ok"
        if fault == "absent":
            return
        if fault == "short":
            lines = [" ".join(line.split()[:-1]) for line in lines]
        if fault == "junk":
            path.write_bytes(self.rng.bytes(int(self.rng.integers(0, 80))))
            return
        if fault == "nan":
            lines = [line.replace("1000", "nan", 1) for line in lines]
        path.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ datatypes
    def session(self, subject: str, session: str | None) -> None:
        prefix = fx.prefix(subject, session)
        anat = fx.folder(self.root, subject, session, "anat")
        if self.chance(0.8):
            cycles = int(self.rng.integers(1, 14)) if self.faulty() else 12
            meta = {"RepetitionTime": 0.005, "EchoTime": 0.0025, "FlipAngle": 15,
                    "PhaseIncrements": [30.0 * k for k in range(cycles)]}
            for part in ("mag", "phase"):
                units = self.pick(["degrees", "rad"]) if self.faulty() else "arbitrary"
                extra = {"Units": units} if part == "phase" else {}
                self.image(anat / f"{prefix}_acq-pcbssfp_part-{part}_T2w.nii.gz", (SIDE,) * 3 + (cycles,),
                           {**meta, **extra}, integer=part == "phase")
            if self.faulty() and self.chance(0.3):  # a second run of the same series: ambiguous
                self.image(anat / f"{prefix}_acq-pcbssfp_run-2_part-mag_T2w.nii.gz", (SIDE,) * 3 + (12,), meta)
        if self.chance(0.7):
            self.image(anat / f"{prefix}_T1w.nii.gz", (SIDE,) * 3, {"RepetitionTime": 2.3})
        if self.chance(0.7):
            dwi = fx.folder(self.root, subject, session, "dwi") / f"{prefix}_dwi.nii.gz"
            n = len(fx.BVALS)
            self.image(dwi, (SIDE,) * 3 + (n,), {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05})
            stem = str(dwi)[: -len(".nii.gz")]
            if dwi.parent.exists():
                self.text(Path(stem + ".bval"), [" ".join(str(b) for b in fx.BVALS)])
                self.text(Path(stem + ".bvec"), [" ".join(f"{v:.4f}" for v in row) for row in fx.BVECS])
            if self.chance(0.5):
                fmap = fx.folder(self.root, subject, session, "fmap") / f"{prefix}_dir-PA_epi.nii.gz"
                relative = dwi.relative_to(self.root / f"sub-{subject}").as_posix()
                direction = self.pick(["j-", "x"]) if self.faulty() else "j"
                self.image(fmap, (SIDE,) * 3 + (1,), {"PhaseEncodingDirection": direction,
                                                     "IntendedFor": [f"bids::sub-{subject}/{relative}"]})
        if self.chance(0.3):
            junk = anat / self.pick(["notes.txt", "sub-xx_T1w.nii.gz", f"{prefix}_T1w.nii.gz.orig", ".hidden.json",
                                     f"{prefix}_acq-pcbssfp_part-mag_T2w.json.bak"])
            junk.parent.mkdir(parents=True, exist_ok=True)
            junk.write_bytes(self.rng.bytes(int(self.rng.integers(0, 64))))

    def build(self) -> None:
        fx.write_description(self.root)
        subjects = [f"{k + 1:02d}" for k in range(int(self.rng.integers(1, 3)))]
        with_sessions = self.chance(0.6)
        for subject in subjects:
            sessions = ([str(k + 1) for k in range(int(self.rng.integers(1, 4)))] if with_sessions else [None])
            for session in sessions:
                self.session(subject, session)
            if with_sessions and self.chance(0.2):  # an extra, empty session folder
                (self.root / f"sub-{subject}" / "ses-99" / "anat").mkdir(parents=True)
        if self.chance(0.2):
            (self.root / "sub-junk.txt").write_text("not a subject")
        if self.chance(0.2):
            (self.root / "T1w.json").write_text(self.pick(["{", "[]"]) if self.faulty() else '{"RepetitionTime": 2}')


def check_typed(subjects) -> None:
    """The returned inputs are typed and self-consistent (effective shapes, counts)."""
    for subject in subjects:
        assert isinstance(subject, bids_io.SubjectInputs)
        for session in subject.sessions:
            assert isinstance(session, bids_io.SessionInputs)
            if session.bssfp:
                assert session.bssfp.shape == (SIDE,) * 3 + (12,) and session.bssfp.magnitude.is_file()
                assert session.bssfp.phase_units in bids_io.PHASE_UNITS
            if session.t1w:
                assert session.t1w.shape == (SIDE,) * 3 and session.t1w.image.is_file()
            if session.dwi:
                assert session.dwi.shape[:3] == (SIDE,) * 3
                assert len(session.dwi.b_values) == session.dwi.n_volumes == len(fx.BVALS)


def run_discovery(root: Path, modality: str):
    args = parse_args([str(root), str(root.parent / "out"), "participant", "-w", str(root.parent / "work"),
                       "--input-modality", modality])
    config = config_from_args(args, "fuzz", bids_io.DEFAULT_QUERIES)
    found = bids_io.discover(config)
    bids_io.require_inputs(found, modality, training=False)
    return found


def test_discovery_on_random_trees(tmp_path):
    outcomes = {"typed": 0, "error": 0}
    for seed in range(N_TREES):
        rng = np.random.default_rng(seed)
        root = tmp_path / f"tree{seed}" / "bids"
        Tree(root, rng).build()
        modality = "pc-bssfp" if rng.random() < 0.7 else "t1w"
        try:
            found = run_discovery(root, modality)
        except Bssfp2dtError as error:
            message = error.message
            assert message and "\n" not in message and "Traceback" not in message, (seed, message)
            outcomes["error"] += 1
        except Exception as error:  # noqa: BLE001 - the point of the fuzz
            pytest.fail(f"seed {seed}: {type(error).__name__}: {error}")
        else:
            check_typed(found)
            outcomes["typed"] += 1
        assert not (root.parent / "out").exists() and not (root.parent / "work").exists()
    # The generator must exercise both outcomes, or the fuzz says nothing.
    assert outcomes["typed"] >= 4 and outcomes["error"] >= 10, outcomes
