"""Adding a pipeline is one file (issue 20): a module with ``NAME`` and ``build(b)`` among the package's
pipeline files is listed by `kubellm run --help`, compiled by `make compile` (every built-in) and alone,
run by `kubellm run --pipeline NAME`, and resumed — with no other file edited.

The new file lives in a temporary folder that a ``sitecustomize.py`` adds to ``kubellm.pipelines.__path__``
in every process the test starts (as a copy of ``pipelines/`` with the file in it would be), so the
repository stays as it is; the discovery reads every folder of the package's path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from localrun import ENV, REPO, command, result, stage

# One tiny run (start, prep, finish) and its resume: ~1 minute idle, 3x that beside a CPU hog.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

NEW_PIPELINE = '''"""``corpus-only``: prepare the corpus, tracked in MLflow (a pipeline added as one file)."""

from kubellm.components import data
from kubellm.pipelines.api import Builder

NAME = "corpus-only"


def build(b: Builder):
    @b.pipeline(NAME, "Prepare the pretraining corpus and nothing else.")
    def corpus_only(run_name: str = b.cfg.name, dataset_uri: str = b.section("data").sources[0].uri,
                    data_config: dict = b.param("data")) -> None:
        with b.tracked(run_name):
            b.step(data.prepare_data, config=data_config, source_uri=dataset_uri)

    return corpus_only
'''

SITECUSTOMIZE = """import kubellm.pipelines

kubellm.pipelines.__path__.append({folder!r})
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that sees the new pipeline file as part of the package."""
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "corpus_only.py").write_text(NEW_PIPELINE, encoding="utf-8")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(folder=str(tmp_path / "extra")), encoding="utf-8"
    )
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    return {**ENV, "PYTHONPATH": path}


def _kubellm(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_a_new_pipeline_file_is_listed_compiled_run_and_resumed(env: dict[str, str], tmp_path: Path) -> None:
    assert not list((REPO / "pipelines").glob("corpus_only.py"))  # nothing added to the repository
    helped = _kubellm(env, tmp_path, "run", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "corpus-only: run_name, dataset_uri, data_config" in " ".join(helped.stdout.replace("│", " ").split())

    config = str(REPO / "configs" / "local.yaml")
    every = _kubellm(env, tmp_path, "compile", "--config", config, "--out", "dist")  # what `make compile` runs
    assert every.returncode == 0, every.stderr
    assert {"corpus-only.yaml", "llm-lifecycle.yaml"} <= {p.name for p in (tmp_path / "dist").glob("*.yaml")}
    alone = _kubellm(env, tmp_path, "compile", "--config", config, "--pipeline", "corpus-only", "--out", "alone")
    assert alone.returncode == 0, alone.stderr
    assert sorted(p.name for p in (tmp_path / "alone").glob("*.yaml")) == ["corpus-only.yaml"]

    workdir = tmp_path / "work"
    workdir.mkdir()

    def run(*args: str) -> tuple[int, dict | None, str]:
        proc = subprocess.run(
            command(workdir, "--pipeline", "corpus-only", *args),
            capture_output=True,
            text=True,
            cwd=workdir,
            env=env,
            timeout=500,
        )
        return result(proc.returncode, proc.stdout, proc.stderr)

    code, first, out = run()
    assert code == 0 and first is not None, out[-3000:]
    assert first["pipeline"] == "corpus-only" and first["status"] == "FINISHED"
    assert [row["stage"] for row in first["stages"]] == ["prep"] and stage(first, "prep")["status"] == "FINISHED"

    code, again, out = run("--resume", first["run_name"])
    assert code == 0 and again is not None, out[-3000:]
    assert again["status"] == "FINISHED" and again["resumed_from"] == first["run_name"]
    assert stage(again, "prep")["status"] == "cached" and stage(again, "prep")["cached_from"] == first["run_name"]
