"""``kubellm serve`` as the real process ``make serve`` starts, ``kubellm deploy --dry-run``, and the default
model (the registry's champion)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import yaml

from kubellm.cli import main
from kubellm.k8s.schema import validate_against_crd

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local.yaml"


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_deploy_dry_run_prints_valid_manifests(capsys) -> None:
    code, out, _ = _run(
        [
            "deploy",
            "--config",
            str(LOCAL),
            "--dry-run",
            "--storage-uri",
            "s3://models/kubellm/3",
            "--model-version",
            "3",
        ],
        capsys,
    )
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["InferenceService", "Deployment", "Service"]
    assert validate_against_crd(docs[0]) == []
    assert docs[0]["metadata"]["labels"]["kubellm.io/model-version"] == "3"
    args = docs[1]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--endpoint") + 1] == "http://local-predictor.kubellm.svc.cluster.local"

    code, out, _ = _run(
        ["deploy", "-c", str(LOCAL), "--dry-run", "--storage-uri", "gs://b/m", "--set", "deploy.playground=false"],
        capsys,
    )
    assert code == 0 and [d["kind"] for d in yaml.safe_load_all(out)] == ["InferenceService"]


def test_cli_errors_are_one_line(capsys, tmp_path: Path) -> None:
    code, out, err = _run(["deploy", "--config", str(LOCAL), "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: deploy.storage_uri: no model location") and err.count("\n") == 1
    code, _, err = _run(["serve", "--config", str(LOCAL), "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such model directory" in err and err.count("\n") == 1


def test_default_model_is_the_registry_champion(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubellm.config import load_config
    from kubellm.serve.app import load_model
    from kubellm.tracking import registry

    calls = []

    def resolve(cfg, workdir, uri):
        calls.append((cfg.registered_model, str(workdir), uri))
        return tiny_model_dir

    monkeypatch.setattr(registry, "resolve_model_uri", resolve)
    cfg = load_config(LOCAL, [f"workdir={tmp_path}", "serve.precision=fp32"])
    model = load_model(cfg)
    assert calls == [("kubellm-local", str(tmp_path), "models:/kubellm-local@champion")]
    assert model.description == str(tiny_model_dir) and model.ready


@pytest.mark.slow
@pytest.mark.integration
def test_kubellm_serve_process_serves_and_stops_on_sigterm(tiny_model_dir: Path, tmp_path: Path, start_serve) -> None:
    # --config must reach our CLI intact: kserve's import-time parser would take it for --configure_logging.
    with start_serve(tiny_model_dir, tmp_path) as (url, proc):
        answer = httpx.post(
            f"{url}/openai/v1/completions", timeout=30, json={"model": "kubellm", "prompt": "The cat", "max_tokens": 4}
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log, log
        assert f"on {url}" in log  # loopback by default, never 0.0.0.0
