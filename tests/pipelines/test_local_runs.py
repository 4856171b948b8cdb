"""The lifecycle pipeline end to end on KFP's local runner, on tiny settings, exactly as `make run` does.

One lifecycle run is shared (module fixture; a module runs on one xdist worker); the failure, resume and concurrency tests
resume it, so they pay only for the steps they are about. The fine-tuning pipelines have modules of their
own (test_local_sweep.py, test_local_continuous.py) so they run beside this one.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from localrun import ENV, command, kubellm_run, result, stage

# A real run is ~10 task processes: the fixture's run takes 60-90 s idle, 3x that beside a CPU hog, and
# the first test also waits for it.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("lifecycle")
    code, summary, out = kubellm_run(workdir)
    assert code == 0, out[-3000:]
    return workdir, summary


def test_lifecycle_runs_end_to_end_and_registers(lifecycle) -> None:
    workdir, s = lifecycle
    assert s["status"] == "FINISHED" and s["failed_stage"] is None
    assert [r["stage"] for r in s["stages"]][:7] == ["prep", "pretrain", "prep_instruct", "finetune", "evaluate",
                                                     "register", "deploy"]
    assert all(r["status"] == "FINISHED" and r["seconds"] >= 0 for r in s["stages"])
    ev = s["evaluation"]
    assert ev["gate_passed"] is True
    assert ev["metrics"]["perplexity"] > 1 and ev["metrics"]["base_perplexity"] > 1
    # the embedded default's benchmark, candidate and base, from the evaluate stage's MLflow run
    assert 0 <= ev["metrics"]["bench.kubellm_choice.acc"] <= 1 and 0 <= ev["metrics"]["base_bench.kubellm_choice.acc"] <= 1
    assert s["model"] == {"name": "kubellm-local", "version": 1, "aliases": ["candidate", "champion"]}
    assert Path(s["deployment"]["manifests"]).is_file()
    assert s["mlflow"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"

    from mlflow import MlflowClient

    client = MlflowClient(s["mlflow"]["tracking_uri"])
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline"] == "llm-lifecycle" and parent.data.tags["kfp_run_id"]


def test_a_failing_stage_stops_the_run_and_is_named(lifecycle, tmp_path: Path) -> None:
    """Resumed from the fixture's run so that prep and pretrain are reused: the failure is what is tested."""
    workdir, done = lifecycle
    missing = tmp_path / "nope.jsonl"
    code, s, out = kubellm_run(workdir, "--resume", done["run_name"], "--set", f"instruct_data.sources.0.uri={missing}")
    assert code == 1, out[-3000:]
    assert s["status"] == "FAILED"
    assert s["failed_stage"] == "prep_instruct"
    assert "nope.jsonl" in stage(s, "prep_instruct")["error"]
    for later in ("finetune", "evaluate", "register", "deploy"):
        assert stage(s, later)["status"] == "not run"
    assert s["model"] is None
    assert "failed at prep_instruct" in out


PURE = ("prep", "pretrain", "prep_instruct", "finetune", "evaluate")


def test_resume_after_a_failure_in_deploy_reruns_only_register_and_deploy(lifecycle) -> None:
    """The failed run itself resumes the fixture's run (its pure steps reused: no extra training here);
    resuming the failed run runs register and deploy again and nothing before them."""
    workdir, done = lifecycle
    bad = '{"deploy": {"smoke_max_tokens": 0}}'  # refused by the deploy step's config validation
    code, failed, out = kubellm_run(workdir, "--resume", done["run_name"], "--param", f"deploy_config={bad}")
    assert code == 1, out[-3000:]
    assert failed["status"] == "FAILED" and failed["failed_stage"] == "deploy"
    assert "smoke_max_tokens" in out and f"full log: {workdir}/runs/{failed['run_name']}/logs/deploy.log" in out
    assert [t["task"] for t in failed["failed_tasks"]] == ["deploy"]
    assert stage(failed, "deploy")["status"] == "FAILED" and "smoke_max_tokens" in stage(failed, "deploy")["error"]

    code, s, out = kubellm_run(workdir, "--resume", failed["run_name"])
    assert code == 0, out[-3000:]
    assert s["status"] == "FINISHED" and s["resumed_from"] == failed["run_name"]
    for name in PURE:  # reused, and traced back to the run that made them
        assert stage(s, name)["status"] == "cached" and stage(s, name)["cached_from"] == done["run_name"]
        assert stage(s, name)["run_id"] == stage(done, name)["run_id"]
    assert stage(s, "register")["status"] == stage(s, "deploy")["status"] == "FINISHED"
    assert s["evaluation"]["gate_passed"] is True  # read from the evaluation that was reused
    assert "champion" in s["model"]["aliases"] and s["model"]["version"] >= 2
    assert re.search(r"^prep\s+cached\s+outputs of " + done["run_name"], out, flags=re.M)
    logs = {p.name for p in (workdir / "runs" / s["run_name"] / "logs").glob("*.log")}
    assert {"register.log", "deploy.log", "start-run.log"} <= logs and "pretrain.log" not in logs


def test_two_runs_started_in_the_same_second_keep_their_own_names_and_summaries(lifecycle) -> None:
    """Two `kubellm run` at once in one workdir (resumed from the fixture's run to keep them short):
    each has its own run name, folder, MLflow parent run and summary, and each exits 0."""
    workdir, done = lifecycle
    procs = [subprocess.Popen(command(workdir, "--resume", done["run_name"]), cwd=workdir, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [result(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, s, out in results:
        assert code == 0, out[-3000:]
        assert s["status"] == "FINISHED" and stage(s, "deploy")["status"] == "FINISHED"
    (_, a, _), (_, b, _) = results
    assert a["run_name"] != b["run_name"]
    assert a["mlflow"]["parent_run_id"] != b["mlflow"]["parent_run_id"]
    for s in (a, b):
        written = json.loads((workdir / "runs" / s["run_name"] / "summary.json").read_text())
        assert written["run_name"] == s["run_name"]
