"""`kubellm submit` and `kubellm schedule` through kfp.Client against a local stand-in of the KFP v2beta1
REST API, in single-user and multi-user mode (namespaces, rotating and expired tokens, session cookies,
duplicate names, paging), with every payload checked against the kfp-server-api models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from kfp_standin import KfpStandIn, model_problems, self_signed_certificate

from kubellm import yamlio
from kubellm.cli.app import main

pytestmark = pytest.mark.integration

LOCAL = ("--config", "configs/local.yaml")
SCHEDULE = ("schedule", *LOCAL, "--set", "finetune.base_model=/models/base", "--cron", "0 0 3 * * *")


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code or 0


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's error: one line, no traceback (log lines before it are progress, not the error)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture(autouse=True)
def _no_ambient_kfp_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No kube context, pod namespace, token file or kfp context of the machine running the tests; the
    CLI sets up its log handler afresh on this test's captured stderr (not an earlier test's closed one)."""
    from kfp.client import client as kfp_client

    from kubellm import log
    from kubellm.pipelines import submit

    monkeypatch.setattr(log, "_CONFIGURED", False)
    monkeypatch.setattr(logging.getLogger("kubellm"), "handlers", [])

    for var in (
        "KF_PIPELINES_ENDPOINT",
        "KFP_NAMESPACE",
        "KFP_EXISTING_TOKEN",
        "KFP_COOKIE",
        "KFP_CA_BUNDLE",
        "KF_PIPELINES_SA_TOKEN_PATH",
        "KF_PIPELINES_UI_ENDPOINT",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setattr(submit, "SA_NAMESPACE_FILE", tmp_path / "no-pod-namespace")
    monkeypatch.setattr(submit, "SA_TOKEN_FILE", tmp_path / "no-pod-token")
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture()
def kfp(monkeypatch: pytest.MonkeyPatch):
    """Single-user KFP behind a static token (e.g. a port-forward with a gateway in front)."""
    with KfpStandIn(tokens={"t0ken"}) as server:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", server.url)
        monkeypatch.setenv("KFP_EXISTING_TOKEN", "t0ken")
        yield server
        assert server.state.problems == []


@pytest.fixture()
def team(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Multi-user KFP; the caller authenticates with a projected service-account token file."""
    token_file = tmp_path / "sa-token"
    token_file.write_text("sa-token-1\n", encoding="utf-8")
    with KfpStandIn(multi_user=True, tokens={"sa-token-1"}) as server:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", server.url)
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
        server.token_file = token_file  # type: ignore[attr-defined]
        yield server
        assert server.state.problems == []


def _body(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


# single-user ------------------------------------------------------------------------------------------
def test_submit_uploads_a_version_creates_experiment_and_starts_a_run(kfp, capsys) -> None:
    assert _cli("submit", *LOCAL, "--param", "dataset_uri=builtin://stdlib", "--wait", "--poll", "0.01") == 0
    st = kfp.state
    (pipeline,) = st.pipelines.values()
    assert pipeline["display_name"] == "llm-lifecycle" and pipeline["namespace"] == ""
    ours = [v for v in st.versions.values() if v["display_name"].startswith("0.1.0-")]  # package, git, config
    assert len(ours) == 1
    spec = yamlio.load_all(st.packages[ours[0]["pipeline_version_id"]])[0]
    assert spec["pipelineInfo"]["name"] == "llm-lifecycle"
    (run,) = st.runs.values()
    assert model_problems(_body(run), "V2beta1Run") == []
    assert run["runtime_config"]["parameters"]["dataset_uri"] == "builtin://stdlib"
    assert run["pipeline_version_reference"]["pipeline_version_id"] == ours[0]["pipeline_version_id"]
    assert [e["display_name"] for e in st.experiments.values()] == ["kubellm-local"]
    assert all(r.authorization == "Bearer t0ken" for r in st.requests)
    out = capsys.readouterr().out
    assert f"{kfp.url}/#/runs/details/{run['run_id']}" in out and "finished: SUCCEEDED" in out


def test_second_submit_reuses_pipeline_version_and_experiment(kfp) -> None:
    assert _cli("submit", *LOCAL) == 0
    versions = len(kfp.state.versions)
    assert _cli("submit", *LOCAL) == 0
    assert len(kfp.state.pipelines) == len(kfp.state.experiments) == 1
    assert len(kfp.state.versions) == versions and len(kfp.state.runs) == 2
    assert _cli("submit", *LOCAL, "--set", "finetune.loop.max_steps=7") == 0
    assert len(kfp.state.versions) == versions + 1  # another config is another version


def test_failed_run_with_wait_exits_1_with_the_runs_error(kfp, capsys) -> None:
    kfp.state.run_states = ["RUNNING", "FAILED"]
    kfp.state.run_error = "task finetune failed: OOMKilled"
    assert _cli("submit", *LOCAL, "--wait", "--poll", "0.01") == 1
    assert "finished: FAILED (task finetune failed: OOMKilled)" in capsys.readouterr().out


def test_schedule_creates_once_then_updates_in_place(kfp, capsys) -> None:
    assert _cli(*SCHEDULE) == 0
    (rr,) = kfp.state.recurring.values()
    assert model_problems(_body(rr), "V2beta1RecurringRun") == []
    assert rr["max_concurrency"] == "1" and rr["no_catchup"] is True and rr["mode"] == "ENABLE"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert _cli(*SCHEDULE) == 0  # identical: nothing changes
    assert list(kfp.state.recurring.values()) == [rr]
    assert "unchanged" in capsys.readouterr().out
    assert _cli(*SCHEDULE[:-1], "0 30 4 * * *") == 0  # new cron: replaced, never duplicated
    (rr2,) = kfp.state.recurring.values()
    assert rr2["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"


def test_five_field_cron_is_refused_before_anything_is_sent(kfp, capsys) -> None:
    assert _cli("schedule", *LOCAL, "--cron", "0 3 * * *") == 2
    err = capsys.readouterr().err
    assert "6-field" in err and "'0 0 3 * * *'" in err
    assert kfp.state.requests == []


def test_unknown_pipeline_and_invalid_config_fail_before_sending(kfp, capsys) -> None:
    assert _cli("submit", *LOCAL, "--pipeline", "nope") == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
    assert _cli("submit", *LOCAL, "--set", "pretrain.loop.max_steps=0") == 2
    assert "pretrain.loop.max_steps" in capsys.readouterr().err
    assert kfp.state.requests == []


def test_unreachable_host_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "http://127.0.0.1:9")
    assert _cli("submit", *LOCAL) == 2
    err = _one_line_error(capsys)
    assert "Kubeflow Pipelines at http://127.0.0.1:9" in err and "unreachable while connecting" in err


def test_no_host_outside_a_cluster_names_the_variable_and_inside_defaults(monkeypatch, capsys) -> None:
    from kubellm.pipelines.submit import IN_CLUSTER_HOST, resolve_host

    assert _cli("submit", *LOCAL) == 2
    assert "KF_PIPELINES_ENDPOINT" in _one_line_error(capsys)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert resolve_host(None) == IN_CLUSTER_HOST == "http://ml-pipeline-ui.kubeflow"


# multi-user -------------------------------------------------------------------------------------------
def test_multi_user_submit_waits_through_a_token_rotation(team, capsys) -> None:
    st = team.state
    st.run_states = ["PENDING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]

    def kubelet_rotates(reads: int) -> None:  # after the 2nd status read the old token expires
        if reads == 2:
            team.token_file.write_text("sa-token-2\n", encoding="utf-8")
            st.rotate("sa-token-2")

    st.on_get_run = kubelet_rotates
    assert _cli("submit", *LOCAL, "--namespace", "team-a", "--wait", "--poll", "0.01") == 0
    assert "finished: SUCCEEDED" in capsys.readouterr().out
    (pipeline,) = st.pipelines.values()
    (experiment,) = st.experiments.values()
    (run,) = st.runs.values()
    assert pipeline["namespace"] == experiment["namespace"] == run["_namespace"] == "team-a"
    used = [r.authorization for r in st.requests]
    assert "Bearer sa-token-1" in used and used[-1] == "Bearer sa-token-2"  # re-read on every request
    assert st.expired == {"sa-token-1"}
    lists = [r for r in st.requests if r.path.endswith("/experiments") and r.method == "GET"]
    assert lists and all(r.query.get("namespace") == "team-a" for r in lists)


def test_an_expired_fixed_token_is_one_clear_line(team, monkeypatch, capsys) -> None:
    st = team.state
    st.tokens = {"static-1"}
    st.run_states = ["RUNNING", "RUNNING", "SUCCEEDED"]
    st.on_get_run = lambda reads: st.rotate("static-2") if reads == 1 else None
    assert _cli("submit", *LOCAL, "--namespace", "team-a", "--token", "static-1", "--wait", "--poll", "0.01") == 2
    err = _one_line_error(capsys)
    assert f"Kubeflow Pipelines at {team.url} (namespace team-a)" in err
    assert "reading run" in err and "HTTP 401" in err and "Review.Status.Authenticated is false" in err
    assert "--token" in err  # says what to check


def test_without_a_namespace_multi_user_refuses_in_one_line(team, capsys) -> None:
    for args in (("submit", *LOCAL), SCHEDULE):
        assert _cli(*args) == 2
        err = _one_line_error(capsys)
        assert f"Kubeflow Pipelines at {team.url} (namespace none: single-user)" in err
        assert "HTTP 400" in err and "An experiment cannot have an empty namespace in multi-user mode" in err
        assert "pass --namespace" in err
    assert team.state.experiments == {} and team.state.runs == {} and team.state.recurring == {}


def test_namespace_defaults_to_the_kube_context(team, monkeypatch, tmp_path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kf",
                "contexts": [{"name": "kf", "context": {"cluster": "c", "user": "u", "namespace": "team-b"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert _cli("submit", *LOCAL) == 0
    (run,) = team.state.runs.values()
    assert run["_namespace"] == "team-b"


def test_namespace_defaults_to_the_pods_own(monkeypatch, tmp_path) -> None:
    from kubellm.pipelines import submit

    (tmp_path / "no-pod-namespace").write_text("team-c\n", encoding="utf-8")
    assert submit.default_namespace() == "team-c"


def test_multi_user_schedule_is_idempotent_in_the_namespace(team, capsys) -> None:
    args = (*SCHEDULE, "--namespace", "team-a")
    assert _cli(*args) == 0
    (rr,) = team.state.recurring.values()
    assert rr["namespace"] == "team-a" and model_problems(_body(rr), "V2beta1RecurringRun") == []
    assert _cli(*args) == 0 and list(team.state.recurring.values()) == [rr]
    assert "unchanged" in capsys.readouterr().out
    assert _cli(*args, "--param", "instruct_dataset_uri=s3://new") == 0  # a changed spec replaces it
    (rr2,) = team.state.recurring.values()
    assert rr2["recurring_run_id"] != rr["recurring_run_id"]
    assert rr2["runtime_config"]["parameters"]["instruct_dataset_uri"] == "s3://new"


def test_schedule_finds_its_own_recurring_run_past_the_first_page(team, capsys) -> None:
    args = (*SCHEDULE, "--namespace", "team-a")
    assert _cli(*args) == 0
    (ours,) = team.state.recurring.values()
    others = {
        f"rr-{i:03d}": {**ours, "recurring_run_id": f"rr-{i:03d}", "display_name": f"sweep-{i}"} for i in range(150)
    }
    team.state.recurring = {**others, ours["recurring_run_id"]: ours}  # ours is no. 151: on page 2
    assert _cli(*args) == 0
    assert "unchanged" in capsys.readouterr().out and len(team.state.recurring) == 151
    assert _cli(*SCHEDULE[:-1], "0 30 4 * * *", "--namespace", "team-a") == 0
    mine = [r for r in team.state.recurring.values() if r["display_name"] == ours["display_name"]]
    assert len(mine) == 1 and mine[0]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    assert len(team.state.recurring) == 151
    pages = [r for r in team.state.requests if r.path.endswith("/recurringruns") and r.method == "GET"]
    assert any(r.query.get("page_token") for r in pages)


def test_two_pipelines_with_one_name_is_an_error_naming_both(team, capsys) -> None:
    for pid in ("pl-one", "pl-two"):
        team.state.pipelines[pid] = {
            "pipeline_id": pid,
            "display_name": "llm-lifecycle",
            "name": pid,
            "namespace": "team-a",
        }
    assert _cli("submit", *LOCAL, "--namespace", "team-a") == 2
    err = _one_line_error(capsys)
    assert "2 pipelines named 'llm-lifecycle' (pl-one, pl-two)" in err and "team-a" in err
    assert team.state.runs == {}


def test_session_cookie_authenticates_and_a_stale_one_is_refused(monkeypatch, capsys) -> None:
    with KfpStandIn(multi_user=True, cookie="oauth2_proxy_kubeflow=s3ss10n") as server:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", server.url)
        monkeypatch.setenv("KFP_COOKIE", "oauth2_proxy_kubeflow=stale")
        assert _cli("submit", *LOCAL, "--namespace", "team-a") == 2
        err = _one_line_error(capsys)
        assert "HTTP 401" in err and "--cookie" in err
        monkeypatch.setenv("KFP_COOKIE", "oauth2_proxy_kubeflow=s3ss10n")
        assert _cli("submit", *LOCAL, "--namespace", "team-a") == 0
        assert len(server.state.runs) == 1 and server.state.problems == []
        assert server.state.requests[-1].cookie == "oauth2_proxy_kubeflow=s3ss10n"


def test_a_private_ca_is_trusted_only_with_ca_bundle(monkeypatch, tmp_path, capsys) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with KfpStandIn(multi_user=True, tokens={"t"}, tls=(cert, key)) as server:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", server.url)
        monkeypatch.setenv("KFP_EXISTING_TOKEN", "t")
        assert _cli("submit", *LOCAL, "--namespace", "team-a") == 2
        err = _one_line_error(capsys)
        assert f"Kubeflow Pipelines at {server.url}" in err and "CERTIFICATE_VERIFY_FAILED" in err
        assert _cli("submit", *LOCAL, "--namespace", "team-a", "--ca-bundle", str(cert)) == 0
        assert len(server.state.runs) == 1
    assert _cli("submit", *LOCAL, "--ca-bundle", str(tmp_path / "missing.pem")) == 2
    assert "--ca-bundle" in _one_line_error(capsys)


def test_stand_in_rejects_what_the_real_api_would(team) -> None:
    """The stand-in's strictness is real: unknown fields, bad types and a missing namespace are refused."""
    import httpx

    headers = {"Authorization": "Bearer sa-token-1"}
    with httpx.Client(base_url=team.url + "/apis/v2beta1", headers=headers) as http:
        bad = http.post("/experiments", json={"display_name": "x", "namespace": "team-a", "colour": "red"})
        assert bad.status_code == 400 and 'unknown field "colour"' in bad.json()["message"]
        bad = http.post("/experiments", json={"display_name": 7, "namespace": "team-a"})
        assert bad.status_code == 400 and "display_name: expected a string" in bad.json()["message"]
        bad = http.get("/recurringruns")
        assert bad.status_code == 400 and "empty namespace in multi-user mode" in bad.json()["message"]
        assert (
            http.get(
                "/experiments", params={"namespace": "team-a"}, headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )


def _cacheable_tasks(package: str) -> set[str]:
    spec = yamlio.load_all(package)[0]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {n for d in dags for n, t in d.get("tasks", {}).items() if t.get("cachingOptions", {}).get("enableCache")}


def test_cache_is_chosen_per_run_by_the_version_it_runs(kfp) -> None:
    """KFP takes caching from the run's pipeline version: a plain submit runs a version with no step
    cacheable (…-nocache), `--cache` the one whose pure steps are; a recurring run never caches."""
    assert _cli("submit", *LOCAL) == 0
    assert _cli("submit", *LOCAL, "--cache") == 0
    assert _cli(*SCHEDULE) == 0
    st = kfp.state
    by_version = {v["pipeline_version_id"]: v["display_name"] for v in st.versions.values()}
    plain, cached, recurring = [
        r["pipeline_version_reference"]["pipeline_version_id"] for r in [*st.runs.values(), *st.recurring.values()]
    ]
    assert by_version[plain].endswith("-nocache") and not by_version[cached].endswith("-nocache")
    assert by_version[recurring].endswith("-nocache")
    assert _cacheable_tasks(st.packages[plain]) == _cacheable_tasks(st.packages[recurring]) == set()
    assert _cacheable_tasks(st.packages[cached]) == {
        "prepare-data",
        "pretrain",
        "prepare-instructions",
        "finetune",
        "evaluate",
    }


def test_an_unknown_parameter_is_refused_before_anything_is_uploaded(kfp, capsys) -> None:
    assert _cli("submit", *LOCAL, "--param", "datset_uri=s3://x") == 2
    assert (
        "--param datset_uri: llm-lifecycle has no such parameter; did you mean `dataset_uri` or "
        "`instruct_dataset_uri`? its parameters are data_config"
    ) in (_one_line_error(capsys))
    assert not kfp.state.pipelines and not kfp.state.runs


def test_a_pipeline_file_is_submitted_under_its_own_name_and_an_edit_is_a_new_version(kfp, tmp_path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "own_data"
    mine = tmp_path / "mine.py"
    mine.write_text((example / "pipeline.py").read_text(encoding="utf-8"), encoding="utf-8")
    args = (
        "submit",
        "--config",
        str(example / "config.yaml"),
        "--pipeline",
        str(mine),
        "--param",
        "questions_uri=s3://team/qa.csv",
    )
    assert _cli(*args) == 0
    (pipeline,) = kfp.state.pipelines.values()
    assert pipeline["display_name"] == "own-data"
    versions = len(kfp.state.versions)
    (run,) = kfp.state.runs.values()
    assert run["runtime_config"]["parameters"]["questions_uri"] == "s3://team/qa.csv"
    assert run["runtime_config"]["parameters"]["run_name"].startswith("own-data-")
    mine.write_text(mine.read_text(encoding="utf-8").replace('"Report card"', '"Scores"'), encoding="utf-8")
    assert _cli(*args) == 0
    assert len(kfp.state.versions) == versions + 1 and len(kfp.state.pipelines) == 1
