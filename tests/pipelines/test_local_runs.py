"""The pipelines run end to end on KFP's local runner, on tiny settings, exactly as `make run` does.

One lifecycle run is shared (module fixture); its pretrained model is the base of the sweep and the
continuous pipeline. Every assertion reads what a user reads: the exit code, summary.json and MLflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.max_docs=40", "data.block_size=64", "data.tokenizer.vocab_size=512",
    "pretrain.loop.max_steps=6", "pretrain.loop.micro_batch_size=4", "pretrain.loop.checkpoint_every=3",
    "instruct_data.max_docs=150", "instruct_data.block_size=128",
    "finetune.loop.max_steps=4", "finetune.loop.micro_batch_size=4",
    "evaluate.num_prompts=2", "evaluate.max_new_tokens=4", "evaluate.max_batches=2",
    "evaluate.gate.max_perplexity_ratio=1.5", "deploy.smoke_max_tokens=2",
    # 4 fine-tuning steps teach no answers (both models answer every prompt with nothing): the default
    # gate rightly refuses that, so the mechanics of the release path are tested with those rules off
    "evaluate.gate.max_empty_answer_rate=null", "evaluate.gate.max_generation_drop=null",
    "evaluate.gate.max_benchmark_drop=null",
]


def _command(workdir: Path, *args: str) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return [sys.executable, "-m", "kubellm.cli", "run", "--config", str(REPO / "configs" / "local.yaml"),
            "--set", f"workdir={workdir}", *sets, *args, "--quiet"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _result(code: int, stdout: str, stderr: str) -> tuple[int, dict | None, str]:
    """Exit code, the summary.json the run printed the path of, and the whole output."""
    paths = re.findall(r"^\s*summary: (.+)$", stdout, flags=re.M)
    return code, json.loads(Path(paths[-1]).read_text()) if paths else None, stdout + stderr


def kubellm_run(workdir: Path, *args: str) -> tuple[int, dict | None, str]:
    """`kubellm run` in a subprocess (as a user runs it); returns exit code, summary.json, output."""
    proc = subprocess.run(_command(workdir, *args), capture_output=True, text=True, cwd=workdir, env=ENV, timeout=900)
    return _result(proc.returncode, proc.stdout, proc.stderr)


def stage(summary: dict, name: str) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == name)


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
    workdir, _ = lifecycle
    missing = tmp_path / "nope.jsonl"
    code, s, out = kubellm_run(workdir, "--set", f"instruct_data.sources.0.uri={missing}")
    assert code == 1, out[-3000:]
    assert s["status"] == "FAILED"
    assert s["failed_stage"] == "prep_instruct"
    assert "nope.jsonl" in stage(s, "prep_instruct")["error"]
    for later in ("finetune", "evaluate", "register", "deploy"):
        assert stage(s, later)["status"] == "not run"
    assert s["model"] is None
    assert "failed at prep_instruct" in out


def _pretrained(workdir: Path) -> Path:
    (model,) = sorted(workdir.glob("pipeline-root/llm-lifecycle-*/pretrain/model"))[:1]
    return model


def test_sweep_runs_several_finetunes_and_registers_the_best(lifecycle) -> None:
    workdir, _ = lifecycle
    code, s, out = kubellm_run(workdir, "--pipeline", "llm-lora-sweep", "--param", f"base_model={_pretrained(workdir)}",
                               "--set", "tracking.registered_model=sweep-model",
                               "--set", "sweep.trials=[{lora.r: 2}, {lora.r: 4, optim.lr: 0.005}]")
    assert code == 0, out[-3000:]
    names = [r["stage"] for r in s["stages"] if r["status"] == "FINISHED"]
    assert {"finetune.trial-1", "finetune.trial-2", "evaluate.trial-1", "evaluate.trial-2"} <= set(names)
    assert s["model"]["name"] == "sweep-model" and s["model"]["version"] == 1


def test_continuous_skips_unchanged_data_and_trains_on_changed_data(lifecycle, tmp_path: Path) -> None:
    workdir, _ = lifecycle
    data = tmp_path / "instructions.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(120)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("--pipeline", "llm-continuous-finetune", "--param", f"base_model={_pretrained(workdir)}",
            "--set", "tracking.registered_model=continuous-model", "--set", f"instruct_data.sources.0.uri={data}",
            "--set", "instruct_data.max_docs=500")

    code, first, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(first, "check_data")["status"] == "FINISHED"
    assert stage(first, "finetune")["status"] == "FINISHED"
    assert first["model"]["aliases"] == ["candidate", "champion"]

    code, second, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(second, "check_data")["status"] == "FINISHED"
    assert all(stage(second, n)["status"] == "not run" for n in ("prep_instruct", "finetune", "register"))
    assert second["model"] is None

    with data.open("a") as f:
        f.write(json.dumps({"prompt": "What is 1000 plus 1?", "response": "1000 plus 1 is 1001."}) + "\n")
    code, third, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(third, "finetune")["status"] == "FINISHED"
    assert stage(third, "evaluate_champion")["status"] == "FINISHED"  # compared with the v1 champion


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
    procs = [subprocess.Popen(_command(workdir, "--resume", done["run_name"]), cwd=workdir, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [_result(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, s, out in results:
        assert code == 0, out[-3000:]
        assert s["status"] == "FINISHED" and stage(s, "deploy")["status"] == "FINISHED"
    (_, a, _), (_, b, _) = results
    assert a["run_name"] != b["run_name"]
    assert a["mlflow"]["parent_run_id"] != b["mlflow"]["parent_run_id"]
    for s in (a, b):
        written = json.loads((workdir / "runs" / s["run_name"] / "summary.json").read_text())
        assert written["run_name"] == s["run_name"]
