"""Static checks of the container recipes and CI (the image itself is built by CI and by hand, see
docs/containers.md; building it here would take minutes)."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
VERSION = (REPO / "version").read_text().strip()
HADOLINT = Path(sys.executable).with_name("hadolint")
OCI_LABELS = ("version", "source", "licenses", "title", "description")

expected_outputs = load_script("expected_outputs")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage; stage 0 holds what comes before the first FROM."""
    grouped: list[list[tuple[str, str]]] = [[]]
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            grouped.append([])
        grouped[-1].append((keyword, arguments))
    return grouped


def key_values(arguments: str) -> dict[str, str]:
    """``A=1 B="two words"`` (LABEL/ENV syntax) -> dict."""
    return dict(item.split("=", 1) for item in shlex.split(arguments))


@pytest.fixture(scope="module")
def dockerfile() -> list[list[tuple[str, str]]]:
    return stages(REPO / "Dockerfile")


# --------------------------------------------------------------------------- Dockerfile
@pytest.mark.skipif(not HADOLINT.exists() and shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_passes():
    executable = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    result = subprocess.run([executable, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_argument_comes_before_every_from(dockerfile):
    preamble, *build_stages = dockerfile
    assert ("ARG", "BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04") in preamble
    assert len(build_stages) == 2, "multi-stage: builder + runtime"
    assert build_stages[0][0] == ("FROM", "${BASE_IMAGE} AS builder")
    assert build_stages[1][0] == ("FROM", "${BASE_IMAGE}")


def test_runtime_stage_runs_bssfp2dt_as_a_non_root_user(dockerfile):
    runtime = dockerfile[-1]
    assert [json.loads(arguments) for keyword, arguments in runtime if keyword == "ENTRYPOINT"] == [["bssfp2dt"]]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    assert ("COPY", "version /version") in runtime


def test_runtime_stage_labels_and_read_only_environment(dockerfile):
    runtime = dockerfile[-1]
    labels = {key: value for keyword, arguments in runtime if keyword == "LABEL"
              for key, value in key_values(arguments).items()}
    for name in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{name}"), name
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    env = {key: value for keyword, arguments in runtime if keyword == "ENV"
           for key, value in key_values(arguments).items()}
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TEMPLATEFLOW_HOME"):
        assert env[name] == "/tmp" or env[name].startswith("/tmp/"), name
    assert env["NIPYPE_NO_ET"] == "1"  # no network check at run time
    assert env["BSSFP2DT_CONTAINER_TYPE"] == "docker" and env["BSSFP2DT_CONTAINER_TAG"] == "${IMAGE_TAG}"
    assert ("VOLUME", '["/tmp"]') in runtime  # writable /tmp under docker run --read-only
    args = dict(arguments.split("=", 1) for keyword, arguments in runtime if keyword == "ARG" and "=" in arguments)
    assert args["VERSION"] == VERSION, "keep ARG VERSION equal to the version file"


def pip_targets(commands: list[str]) -> list[str]:
    """The install targets of ``pip install`` commands, normalised (editable and extras dropped)."""
    targets = []
    for command in commands:
        words = shlex.split(command)
        for index, word in enumerate(words[:-1]):
            if not (word.endswith("pip") and words[index + 1] == "install"):
                continue
            for argument in words[index + 2:]:
                if argument in ("&&", "||", ";", "\\"):
                    break
                if argument.startswith("-") or argument == "pip":
                    continue
                argument = re.sub(r"\$[({](\w+)[)}]", r"\1", argument)
                targets.append(re.sub(r"\[.*\]$", "", argument))
    return targets


def test_image_installs_like_the_makefile(dockerfile):
    makefile = (REPO / "Makefile").read_text()
    make_torch = re.search(r"^TORCH_SPEC \?= (\S+)", makefile, re.M).group(1)
    make_commands = [line.strip().replace("$(BIN)/pip", "pip") for line in makefile.splitlines()
                     if "$(BIN)/pip install" in line and "--upgrade pip" not in line]
    builder = dockerfile[1]
    docker_commands = [arguments.replace("/opt/venv/bin/pip", "pip") for keyword, arguments in builder
                       if keyword == "RUN"]
    torch_arg = [arguments for keyword, arguments in builder
                 if keyword == "ARG" and arguments.startswith("TORCH_SPEC=")]
    assert torch_arg == [f"TORCH_SPEC={make_torch}"]
    assert pip_targets(make_commands) == pip_targets(docker_commands) == ["TORCH_SPEC", "."]


def ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore excludes ``path`` (last matching pattern wins; ``!`` re-includes)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:index]) for index in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", ""))
               for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "demo/bids/x.nii.gz", "tests/test_x.py", "work/a",
                 "bidsapp/bssfp2dt/__pycache__/x.pyc", ".pytest_cache/v", "bidsapp/bssfp2dt.egg-info/PKG-INFO"):
        assert ignored(patterns, path), path
    for path in ("pyproject.toml", "version", "README.md", "bidsapp/bssfp2dt/__init__.py",
                 "bidsapp/bssfp2dt/data/models/models.toml", ".container-wheels/torch.whl"):
        assert not ignored(patterns, path), path


# --------------------------------------------------------------------------- Apptainer
def sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(header key -> value, %section -> body) of a definition file."""
    header, body, current = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            body[current] = ""
        elif current is None and ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        elif current is not None:
            body[current] += line + "\n"
    return header, body


def test_apptainer_definition_wraps_the_published_image():
    header, body = sections(REPO / "singularity.def")
    assert header == {"Bootstrap": "docker", "From": f"bssfp2dt/bssfp2dt:{VERSION}"}
    assert body["runscript"].strip() == 'exec bssfp2dt "$@"'
    assert "bssfp2dt --version" in body["test"] and " participant " in body["test"]
    assert "bssfp2dt-simulate" in body["test"] and "--tiny" in body["test"]
    assert f"org.opencontainers.image.version {VERSION}" in body["labels"]
    assert "--nv" in body["help"] and "-B " in body["help"]


# --------------------------------------------------------------------------- CircleCI
@pytest.fixture(scope="module")
def circleci() -> dict:
    return yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())


def run_commands(job: dict) -> list[str]:
    return [step["run"]["command"] if isinstance(step["run"], dict) else step["run"]
            for step in job["steps"] if isinstance(step, dict) and "run" in step]


def test_circleci_workflow_builds_tests_and_deploys_tags(circleci):
    jobs = circleci["jobs"]
    workflow = next(iter(circleci["workflows"].values()))["jobs"]
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in workflow]
    assert names == ["build", "test", "deploy"] and set(names) <= set(jobs)
    build = "\n".join(run_commands(jobs["build"]))
    assert "docker build" in build and "docker save" in build
    test = "\n".join(run_commands(jobs["test"]))
    order = [test.index(marker) for marker in ("--version", "bssfp2dt-simulate", " participant ", " group ",
                                               "expected_outputs.py", "bids-validator-deno")]
    assert order == sorted(order)
    assert "--subjects 2" in test and "--read-only" in test
    deploy = workflow[2]["deploy"]
    assert deploy["context"] and deploy["filters"]["branches"]["ignore"] == "/.*/"
    assert "docker login" in "\n".join(run_commands(jobs["deploy"]))


def test_circleci_steps_reference_existing_files(circleci):
    text = "\n".join(command for job in circleci["jobs"].values() for command in run_commands(job))
    referenced = set(re.findall(r"(?:scripts|boutiques|\.circleci)/[\w./-]+\.\w+", text))
    assert {"scripts/expected_outputs.py", "boutiques/descriptor.json", ".circleci/expected_outputs.txt"} <= referenced
    pipeline_exists = find_spec("bssfp2dt.pipeline.participant") is not None
    for path in sorted(referenced):
        if path == ".circleci/expected_outputs.txt" and not pipeline_exists:
            continue  # generated from the first real participant + group run (docs/containers.md)
        assert (REPO / path).is_file(), path


# --------------------------------------------------------------------------- expected outputs
def test_expected_outputs_listing_hides_run_names_and_compares(tmp_path, capsys):
    run_a = f"20260101-120000_{uuid.UUID(int=1)}"
    run_b = f"20260102-130500_{uuid.uuid4()}"
    for name in ("dataset_description.json", f"sub-01/log/{run_a}/bssfp2dt.toml",
                 f"sub-01/log/{run_b}/bssfp2dt.toml", f"log/{run_b}/bssfp2dt.toml",
                 "sub-01/dwi/sub-01_space-T1w_desc-pcbssfp_model-tensor_param-fa_dwimap.nii.gz"):
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text("x")
    listing = expected_outputs.output_listing(tmp_path / "out")
    assert listing == ["dataset_description.json", "log/<run>/bssfp2dt.toml",
                       "sub-01/dwi/sub-01_space-T1w_desc-pcbssfp_model-tensor_param-fa_dwimap.nii.gz",
                       "sub-01/log/<run>/bssfp2dt.toml"]
    expected = tmp_path / "expected.txt"
    expected.write_text("# comment\n" + "\n".join(listing[:-1] + ["sub-02/anat/missing.nii.gz"]) + "\n")
    assert expected_outputs.main([str(tmp_path / "out"), "--compare", str(expected)]) == 1
    assert expected_outputs.compare(listing, expected_outputs.read_listing(expected)) == \
        ["- sub-02/anat/missing.nii.gz", "+ sub-01/log/<run>/bssfp2dt.toml"]
    expected.write_text("\n".join(listing) + "\n")
    assert expected_outputs.main([str(tmp_path / "out"), "--compare", str(expected)]) == 0
    capsys.readouterr()
    assert expected_outputs.main([str(tmp_path / "out"), "--ignore", "*/log/*", "log/*"]) == 0
    assert capsys.readouterr().out.split() == [listing[0], listing[2]]
