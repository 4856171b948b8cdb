"""`kubellm submit` and `kubellm schedule` against a local stand-in of the KFP v2beta1 REST API, with
every payload checked against the kfp-server-api models."""

from __future__ import annotations

import pytest
import yaml
from kfp_standin import KfpStandIn

from kubellm.cli.app import main


def _unknown_fields(obj: object, model: str) -> list[str]:
    """Keys of ``obj`` that the kfp_server_api model ``model`` does not have (recursively)."""
    import kfp_server_api

    cls = getattr(kfp_server_api.models, model)
    problems = []
    for key, value in (obj or {}).items():  # type: ignore[union-attr]
        if key not in cls.attribute_map.values():
            problems.append(f"{model}.{key}")
            continue
        attr = next(a for a, k in cls.attribute_map.items() if k == key)
        typ = cls.openapi_types[attr]
        if isinstance(value, dict) and hasattr(kfp_server_api.models, typ):
            problems += _unknown_fields(value, typ)
    return problems


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code or 0


@pytest.fixture()
def kfp(monkeypatch: pytest.MonkeyPatch):
    with KfpStandIn() as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        monkeypatch.setenv("KFP_TOKEN", "t0ken")
        server.state.token = "t0ken"
        yield server


def test_submit_uploads_a_version_creates_experiment_and_starts_a_run(kfp, capsys) -> None:
    assert _cli("submit", "--config", "configs/local.yaml", "--param", "dataset_uri=builtin://stdlib",
                "--wait") == 0
    st = kfp.state
    assert [p["display_name"] for p in st.pipelines.values()] == ["llm-lifecycle"]
    (version,) = st.versions.values()
    assert version["display_name"].startswith("0.1.0-")  # package version, git revision, config hash
    spec = next(yaml.safe_load_all(version["package"]))
    assert spec["pipelineInfo"]["name"] == "llm-lifecycle"
    (run,) = st.runs.values()
    body = {k: v for k, v in run.items() if k not in ("run_id", "state") and not k.startswith("_")}
    assert _unknown_fields(body, "V2beta1Run") == []
    assert run["runtime_config"]["parameters"]["dataset_uri"] == "builtin://stdlib"
    assert run["pipeline_version_reference"]["pipeline_version_id"] == version["pipeline_version_id"]
    assert [e["display_name"] for e in st.experiments.values()] == ["kubellm-local"]
    assert "finished: SUCCEEDED" in capsys.readouterr().out


def test_second_submit_reuses_pipeline_version_and_experiment(kfp) -> None:
    assert _cli("submit", "--config", "configs/local.yaml") == 0
    assert _cli("submit", "--config", "configs/local.yaml") == 0
    assert len(kfp.state.pipelines) == len(kfp.state.versions) == len(kfp.state.experiments) == 1
    assert len(kfp.state.runs) == 2
    assert _cli("submit", "--config", "configs/local.yaml", "--set", "finetune.loop.max_steps=7") == 0
    assert len(kfp.state.versions) == 2  # another config is another version


def test_failed_run_with_wait_exits_1(kfp) -> None:
    kfp.state.run_states = ["RUNNING", "FAILED"]
    assert _cli("submit", "--config", "configs/local.yaml", "--wait") == 1


def test_schedule_creates_once_then_updates_in_place(kfp, capsys) -> None:
    args = ("schedule", "--config", "configs/local.yaml", "--set", "finetune.base_model=/models/base",
            "--cron", "0 0 3 * * *")
    assert _cli(*args) == 0
    (rr,) = kfp.state.recurring.values()
    body = {k: v for k, v in rr.items() if k != "recurring_run_id"}
    assert _unknown_fields(body, "V2beta1RecurringRun") == []
    assert rr["max_concurrency"] == "1" and rr["no_catchup"] is True and rr["mode"] == "ENABLE"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert _cli(*args) == 0  # identical: nothing changes
    assert list(kfp.state.recurring.values()) == [rr]
    assert "unchanged" in capsys.readouterr().out
    assert _cli(*args[:-1], "0 30 4 * * *") == 0  # new cron: replaced, never duplicated
    (rr2,) = kfp.state.recurring.values()
    assert rr2["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"


def test_five_field_cron_is_refused_before_anything_is_sent(kfp, capsys) -> None:
    assert _cli("schedule", "--config", "configs/local.yaml", "--cron", "0 3 * * *") == 2
    err = capsys.readouterr().err
    assert "6-field" in err and "'0 0 3 * * *'" in err
    assert kfp.state.requests == []


def test_rejected_token_is_one_line(kfp, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KFP_TOKEN", "wrong")
    assert _cli("submit", "--config", "configs/local.yaml") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rejected the credentials" in err and "\n" not in err


def test_unreachable_host_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KFP_HOST", "http://127.0.0.1:9")
    assert _cli("submit", "--config", "configs/local.yaml") == 2
    err = capsys.readouterr().err.strip()
    assert "unreachable" in err and "Traceback" not in err and "\n" not in err


def test_unknown_pipeline_and_invalid_config_fail_before_sending(kfp, capsys) -> None:
    assert _cli("submit", "--config", "configs/local.yaml", "--pipeline", "nope") == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
    assert _cli("submit", "--config", "configs/local.yaml", "--set", "pretrain.loop.max_steps=0") == 2
    assert "pretrain.loop.max_steps" in capsys.readouterr().err
    assert kfp.state.requests == []
