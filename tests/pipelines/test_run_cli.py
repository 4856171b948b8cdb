"""`kubellm run`'s checks before any work: unknown parameters, the help, --resume of a run that does not
exist, and run names that stay unique when runs start in the same second."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from kubellm.cli.pipelines import new_run_dir
from kubellm.pipeline_params import PARAM_DOCS, builtin_pipelines

REPO = Path(__file__).resolve().parents[2]


def _kubellm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_an_unknown_parameter_is_one_line_naming_the_valid_ones(tmp_path: Path) -> None:
    proc = _kubellm(
        "run",
        "--config",
        str(REPO / "configs" / "local.yaml"),
        "--set",
        f"workdir={tmp_path}",
        "--pipeline",
        "llm-finetune",
        "--param",
        "dataset_uri=data.jsonl",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --param dataset_uri: llm-finetune has no such parameter; did you mean `instruct_dataset_uri`? "
        "its parameters are "
        + ", ".join(builtin_pipelines()["llm-finetune"].params or [])
        + " (kubellm run --help says what each means)"
    ]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_pipeline_whose_base_model_has_no_default_needs_one(tmp_path: Path) -> None:
    """Derived from the built pipeline, not its name: llm-lifecycle has no base_model parameter, the
    fine-tuning pipelines default it to finetune.base_model, which configs/local.yaml leaves unset."""
    proc = _kubellm(
        "run",
        "--config",
        str(REPO / "configs" / "local.yaml"),
        "--set",
        f"workdir={tmp_path}",
        "--pipeline",
        "llm-lora-sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: llm-lora-sweep starts from an existing model: pass --param base_model=DIR (or set finetune.base_model)"
    )
    assert not (tmp_path / "runs").exists()  # nothing started


def test_resume_of_a_run_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    proc = _kubellm(
        "run",
        "--config",
        str(REPO / "configs" / "local.yaml"),
        "--set",
        f"workdir={tmp_path}",
        "--resume",
        "local-20200101-000000-abcd",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"error: --resume local-20200101-000000-abcd: no run of that name under {tmp_path / 'runs'}"
    )


def test_help_lists_every_pipeline_and_what_each_parameter_means(tmp_path: Path) -> None:
    proc = _kubellm("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.replace("│", " ").split())  # the help formatter wraps and boxes lines
    for name, found in builtin_pipelines().items():
        assert f"{name}: {', '.join(found.params or ['?'])}" in text
    for name, doc in PARAM_DOCS.items():
        assert f"{name}: {' '.join(doc.split())}" in text


def test_runs_started_in_the_same_second_get_their_own_name_and_folder(tmp_path: Path) -> None:
    names: list[str] = []
    start = threading.Barrier(16)

    def one() -> None:
        start.wait()
        names.append(new_run_dir(tmp_path, "local")[0])

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 16 and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
