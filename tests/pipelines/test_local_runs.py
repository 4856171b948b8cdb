"""The lifecycle pipeline end to end on KFP's local runner, on tiny settings, exactly as `make run` does.

Two lifecycle runs started together in an empty folder are shared (module fixture; a module runs on one
xdist worker); the failure and resume tests resume the first, so they pay only for the steps they are about. The
fine-tuning pipelines have modules of their
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
def first_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, dict | None, str]]]:
    """Two `kubellm run` started together in an empty folder: both race to create the sqlite store, the
    experiment and the registered model (issue 24). Every later test here is a third run in that folder."""
    workdir = tmp_path_factory.mktemp("lifecycle")
    procs = [
        subprocess.Popen(
            command(workdir), cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        results.append(result(p.returncode, stdout, stderr))
    return workdir, results


@pytest.fixture(scope="module")
def lifecycle(first_runs) -> tuple[Path, dict]:
    workdir, results = first_runs
    code, summary, out = results[0]
    assert code == 0, out[-3000:]
    return workdir, summary


def test_two_first_runs_in_an_empty_folder_both_finish_and_the_newest_is_champion(first_runs) -> None:
    workdir, results = first_runs
    for code, s, out in results:
        assert code == 0, out[-3000:]
        assert s["status"] == "FINISHED" and stage(s, "deploy")["status"] == "FINISHED"
    (_, a, _), (_, b, _) = results
    assert a["run_name"] != b["run_name"] and a["mlflow"]["parent_run_id"] != b["mlflow"]["parent_run_id"]
    assert sorted([a["model"]["version"], b["model"]["version"]]) == [1, 2]
    for s in (a, b):  # each summary is its own run's
        written = json.loads((workdir / "runs" / s["run_name"] / "summary.json").read_text())
        assert written["run_name"] == s["run_name"]
    from mlflow import MlflowClient

    client = MlflowClient(a["mlflow"]["tracking_uri"])
    assert int(client.get_registered_model("kubellm-local").aliases["champion"]) == 2  # the newest, whatever the order
    runs = client.search_runs([client.get_experiment_by_name("kubellm-local").experiment_id], max_results=200)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]


def test_lifecycle_runs_end_to_end_and_registers(lifecycle, first_runs) -> None:
    workdir, s = lifecycle
    assert s["status"] == "FINISHED" and s["failed_stage"] is None
    assert [r["stage"] for r in s["stages"]][:7] == [
        "prep",
        "pretrain",
        "prep_instruct",
        "finetune",
        "evaluate",
        "register",
        "deploy",
    ]
    assert all(r["status"] == "FINISHED" and r["seconds"] >= 0 for r in s["stages"])
    ev = s["evaluation"]
    assert ev["gate_passed"] is True
    assert ev["metrics"]["perplexity"] > 1 and ev["metrics"]["base_perplexity"] > 1
    # the embedded default's benchmark, candidate and base, from the evaluate stage's MLflow run
    assert (
        0 <= ev["metrics"]["bench.kubellm_choice.acc"] <= 1 and 0 <= ev["metrics"]["base_bench.kubellm_choice.acc"] <= 1
    )
    # v1 or v2: the other first run registered at the same time (its aliases may have moved on to v2)
    assert s["model"]["name"] == "kubellm-local" and s["model"]["version"] in (1, 2)
    assert Path(s["deployment"]["manifests"]).is_file()
    assert s["mlflow"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"

    from mlflow import MlflowClient

    client = MlflowClient(s["mlflow"]["tracking_uri"])
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline"] == "llm-lifecycle" and parent.data.tags["kfp_run_id"]
    # the release is an adapter version recording its base version, and the summary says what that saves
    model = s["model"]
    mv = client.get_model_version("kubellm-local", str(model["version"]))
    assert model["kind"] == "adapter" and mv.tags["kind"] == "adapter" and mv.tags["base_fingerprint"]
    assert model["base"] == f"models:/kubellm-local-base/{mv.tags['base_version']}"
    assert client.get_model_version("kubellm-local-base", mv.tags["base_version"]).tags["kind"] == "base"
    assert model["storage_factor"] > 2 and model["merged_storage_bytes"] > 2 * model["storage_bytes"]
    assert f"({model['storage_factor']:.3g}x less)" in first_runs[1][0][2]  # printed in the headline


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
    # the resumed run's MLflow parent tells the same story as the console: the reused evaluation's verdict
    # and figures, links to the runs it reused, the version it registered
    from mlflow import MlflowClient

    parent = MlflowClient(s["mlflow"]["tracking_uri"]).get_run(s["mlflow"]["parent_run_id"])
    assert parent.data.metrics["gate_passed"] == 1.0
    assert parent.data.metrics["perplexity"] == pytest.approx(s["evaluation"]["metrics"]["perplexity"])
    assert {f"reused.{name}": stage(done, name)["run_id"] for name in PURE}.items() <= parent.data.tags.items()
    note = parent.data.tags["mlflow.note.content"]
    version = s["model"]["version"]
    assert "| gate | passed |" in note
    assert f"| registered | [kubellm-local v{version}](#/models/kubellm-local/versions/{version}) |" in note
    assert "reused from earlier runs" in note and stage(done, "evaluate")["run_id"] in note
    assert parent.info.run_name.startswith(f"lifecycle · v{s['model']['version']} champion · ")
    assert parent.data.tags["run_name"] == s["run_name"]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_mlflow_ui_tells_the_story_of_the_runs(lifecycle, tmp_path: Path) -> None:
    """What a person sees in MLflow's own UI, in a real browser (screenshots in the test's folder): the
    experiment opens on its runs, and a resumed run's parent shows the gate verdict, the headline figures,
    the version it registered and the runs it reused."""
    import shutil
    import tempfile

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (bash .ci/system-deps.sh)")
    from mlflow import MlflowClient
    from mlflowhelpers import healthy, server
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from kubellm.summary import run_page

    workdir, done = lifecycle
    # its own resumed run (every pure step reused), not another test's: no test reads another's side effects
    code, resumed_summary, out = kubellm_run(workdir, "--resume", done["run_name"])
    assert code == 0, out[-3000:]
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("kubellm-local")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = client.search_runs(
        [exp.experiment_id], "tags.run_kind = 'parent'", order_by=["attributes.start_time DESC"]
    )
    resumed = client.get_run(resumed_summary["mlflow"]["parent_run_id"])
    assert "reused.evaluate" in resumed.data.tags

    def page_text(driver, *needles: str) -> str:
        try:
            WebDriverWait(driver, 90).until(
                lambda d: all(n in d.find_element(By.TAG_NAME, "body").text for n in needles)
            )
        except TimeoutException:
            driver.save_screenshot(str(tmp_path / "timeout.png"))
            body = driver.find_element(By.TAG_NAME, "body").text[:2000]
            raise AssertionError(f"{needles} not on the page: {body}") from None
        return driver.find_element(By.TAG_NAME, "body").text

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    with tempfile.TemporaryDirectory() as profile:
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1600,1100",
        ):
            opts.add_argument(flag)
        root = tmp_path / "ui"
        root.mkdir()
        with server(store, root) as started:
            uri = healthy(*started)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
            try:
                # the model-training view (the link `kubellm run` prints says so: summary.run_page)
                driver.get(f"{uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
                names = [r.info.run_name for r in parents[:3]]
                page_text(driver, *names)  # the runs, not an empty GenAI overview
                driver.save_screenshot(str(tmp_path / "experiment.png"))
                driver.get(f"{uri}/{run_page(exp.experiment_id, resumed.info.run_id)}")
                page_text(driver, "Description", "reused.evaluate")
                for more in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
                    more.click()  # the whole description (the UI folds long ones)
                text = page_text(driver, "reused from earlier runs", "passed", "kubellm-local v")
                driver.save_screenshot(str(tmp_path / "resumed-parent.png"))
            finally:
                driver.quit()
    assert "perplexity" in text and "registered" in text
    assert (tmp_path / "experiment.png").stat().st_size > 10_000 and (tmp_path / "resumed-parent.png").is_file()
