"""Shared test settings: offline, deterministic, CPU-only, nothing written outside tmp dirs.

The suite runs on both cores (``make test`` = pytest-xdist, two workers). Three rules keep that safe:

- ``@pytest.mark.serial``: the test runs alone. It takes an exclusive lock that every other test holds
  shared (``fcntl.flock`` on one file in pytest's base temp dir, seen by every worker), so the other
  worker finishes its current test and waits. For tests that measure or race processes, or drive both
  cores themselves.
- A module's tests run on one worker (``--dist loadscope``), so a module fixture (one pipeline run that
  several tests read) is built once; a module that would hold one worker for long is split in two.
- ``build_once(name, build)``: an expensive input (a pretrained tiny model, say) made once per run and
  shared, read-only, by every worker.
- Modules are handed out longest first (by their longest time limit), so no worker is left with a long
  module at the end while the other idles (``--no-loadscope-reorder``: xdist would otherwise hand out the
  modules with the most tests first, which leaves the one-test pipeline runs for last).

Every test has a time limit: 120 s (pyproject: ``timeout``), :data:`SLOW_TIMEOUT_S` for a ``slow`` one
(real processes and servers take three times longer beside a CPU hog than on an idle machine); a test
that needs more says so with ``@pytest.mark.timeout(N)`` and a comment giving the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Set before anything imports transformers/datasets/mlflow: no network, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# `mlflow server` otherwise starts a job runner and ~10 huey consumer processes (GenAI jobs no test uses),
# each importing MLflow: ~20 CPU-seconds per server started, on a 2-core machine.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

REPO = Path(__file__).resolve().parent.parent

#: The time limit of a ``slow`` test that names none of its own.
SLOW_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _isolated_cwd_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees a developer's MLflow or KFP settings."""
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "KFP_HOST",
        "KFP_TOKEN",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_WORKSPACE",
        "MLFLOW_TRACKING_AUTH",
        "KUBEFLOW_TRAINER_SERVER_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def _shared_root(factory: pytest.TempPathFactory) -> Path:
    """pytest's base temp dir of this run, the same for every xdist worker (a worker's own base temp
    dir is a child of it)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def build_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``build_once(name, build) -> folder``: ``build(folder)`` runs once per test run, whichever worker
    asks first (the others wait for it); a build that fails leaves nothing behind, and the next test that
    asks tries again. Tests must treat the folder as read-only: every worker shares it."""
    root = _shared_root(tmp_path_factory)

    def get(name: str, build: Callable[[Path], None]) -> Path:
        out = root / f"shared-{name}"
        with _flock(root / f"shared-{name}.lock", fcntl.LOCK_EX):
            if not out.is_dir():
                partial = root / f"shared-{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                build(partial)
                partial.rename(out)
        return out

    return get


@pytest.fixture(autouse=True)
def _serial_lock(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Shared for every test, exclusive for ``serial`` ones (see the module docstring)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield  # one process: every test already runs alone
        return
    exclusive = request.node.get_closest_marker("serial") is not None
    with _flock(_shared_root(tmp_path_factory) / "serial.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests' time limit; then the modules in order of their longest time limit, longest first (a
    test's limit is what it was judged to need, so this hands out the longest work first; stable
    otherwise: a module's tests stay together, in their order, so module fixtures are built once)."""
    default = float(config.getini("timeout") or 0)
    limit: dict[str, float] = {}
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        mark = item.get_closest_marker("timeout")
        seconds = float(mark.args[0]) if mark and mark.args else default
        limit[_module(item)] = max(limit.get(_module(item), 0.0), seconds)
    items.sort(key=lambda item: -limit[_module(item)])


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]
