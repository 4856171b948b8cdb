"""Many fine-tunes at once, fairly: Kueue's queue and priority labels on training workloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubellm.config import load_config
from kubellm.errors import ConfigError
from kubellm.k8s.schema import validate_against_crd
from kubellm.k8s.training_job import build_job

REPO = Path(__file__).resolve().parents[2]
QUEUE = ["platform.queue_name=team-a-gpus", "platform.priority_class=batch-low"]
KUEUE = {"kueue.x-k8s.io/queue-name": "team-a-gpus", "kueue.x-k8s.io/priority-class": "batch-low"}


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob", "rayjob"])
def test_training_jobs_carry_the_queue_on_the_job_not_its_pods(kind: str) -> None:
    cfg = load_config(REPO / "configs" / "cluster-gpu.yaml", QUEUE)
    job = build_job(kind, "finetune", cfg, "prepared/x", "runs/x", "models/base")
    assert KUEUE.items() <= job["metadata"]["labels"].items()
    assert validate_against_crd(job) == []
    assert "kueue.x-k8s.io/queue-name" not in yaml.safe_dump(job["spec"])  # Kueue admits the job as a whole


def test_without_a_queue_nothing_is_labelled_and_priority_needs_a_queue() -> None:
    no_queue = ["platform.queue_name=null", "platform.priority_class=null"]
    job = build_job(
        "pytorchjob", "pretrain", load_config(REPO / "configs" / "cluster-gpu.yaml", no_queue), "p/x", "r/x"
    )
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])
    with pytest.raises(ConfigError, match="priority_class orders workloads in a Kueue queue: set queue_name"):
        load_config(REPO / "configs" / "cluster-gpu.yaml", ["platform.queue_name=null"])
    with pytest.raises(ConfigError, match="queue_name"):
        load_config(REPO / "configs" / "cluster-gpu.yaml", ["platform.queue_name=Not_A_Name"])


def test_pipeline_training_pods_queue_only_where_the_step_trains(tmp_path: Path) -> None:
    """A step that trains in its own pod is admitted by Kueue's pod integration; a step that launches a
    job only waits for it, so it takes no quota."""
    from kubellm.pipelines._runner import compile_all

    cfg = load_config(
        REPO / "configs" / "local.yaml",
        [
            *QUEUE,
            "tracking.uri=http://mlflow:5000",
            "platform.distributed.finetune.engine=pytorchjob",
            "platform.distributed.finetune.shared_pvc=shared",
        ],
    )
    (path,) = compile_all(cfg, tmp_path, ["llm-lifecycle"], components=False)
    execs = list(yaml.safe_load_all(path.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert KUEUE.items() <= execs["exec-pretrain"]["podMetadata"]["labels"].items()
    assert "kueue.x-k8s.io/queue-name" not in execs["exec-finetune"]["podMetadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in execs["exec-evaluate"]["podMetadata"]["labels"]


def test_check_passes_on_manifests_with_queue_labels(capsys: pytest.CaptureFixture) -> None:
    from kubellm.cli import main

    with pytest.raises(SystemExit) as done:
        main(
            ["check", "--config", str(REPO / "configs" / "cluster-gpu.yaml"), *[a for s in QUEUE for a in ("--set", s)]]
        )
    out = capsys.readouterr().out
    assert done.value.code in (0, None) and "0 findings" in out
