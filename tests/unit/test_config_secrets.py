"""Credentials never travel inside a config: user-info in any URI field and secret-like values are
refused when the config is validated (so they are neither compiled into pipeline YAML nor logged), and
:func:`kubellm.config.secrets.redact` masks what reaches a log anyway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubellm.config import load_config
from kubellm.config.secrets import find_secrets, redact
from kubellm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local.yaml"
PASSWORD = "hunter2-" + "q" * 8  # never a real one


@pytest.mark.parametrize("field", [
    "tracking.uri", "deploy.storage_uri", "data.sources.0.uri", "instruct_data.sources.0.uri", "serve.model",
    "playground.endpoint", "playground.compare_endpoint", "finetune.base_model",
])
def test_credentials_in_any_uri_field_are_refused(field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(LOCAL, [f"{field}=https://admin:{PASSWORD}@host.example.com/x"])
    message = str(info.value)
    assert f"{field}: credentials in the URI" in message and "secret_env" in message
    assert PASSWORD not in message and "\n" not in message


@pytest.mark.parametrize(("override", "where"), [
    ("platform.default.annotations={note: hf_abcdefghijklmnopqrstuvwxyzABCDEF}", "platform.default.annotations.note"),
    ("deploy.hf_args=['--api-key=sk-abcdefghijklmnopqrstuvwx']", "deploy.hf_args.0"),
    ("platform.default.labels={api_token: abc}", "platform.default.labels.api_token"),
])
def test_secret_like_values_anywhere_are_refused(override: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"{where}: holds "):
        load_config(LOCAL, [override])


def test_ordinary_configs_pass() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "kind" in (next(yaml.safe_load_all(path.read_text()), None) or {}):
            continue  # Kubernetes manifests, not run configs
        assert find_secrets(load_config(path).model_dump(mode="json")) == []
    cfg = load_config(LOCAL, ["tracking.uri=http://mlflow.kubellm.svc:5000", "serve.model=models:/kubellm@champion",
                              "deploy.storage_uri=hf://org/model@main", "serve.max_prompt_tokens=64"])
    assert cfg.serve.model == "models:/kubellm@champion"


def test_redact_masks_what_reaches_a_log() -> None:
    doc = {"tracking": {"uri": f"https://admin:{PASSWORD}@mlflow.example.com"},
           "env": {"HF_TOKEN": "abc", "max_new_tokens": 5, "secret_env": [{"secret": "mlflow-auth"}]},
           "args": ["--token=hf_abcdefghijklmnopqrstuvwxyzABCDEF", "plain"]}
    assert redact(doc) == {"tracking": {"uri": "https://***@mlflow.example.com"},
                           "env": {"HF_TOKEN": "***", "max_new_tokens": 5, "secret_env": [{"secret": "mlflow-auth"}]},
                           "args": ["--token=***", "plain"]}
    assert doc["env"]["HF_TOKEN"] == "abc"  # a copy: the config itself is untouched


def test_compile_refuses_credentials(tmp_path: Path) -> None:
    kubellm = str(Path(sys.executable).with_name("kubellm"))
    out = subprocess.run([kubellm, "compile", "--config", str(LOCAL), "--out", str(tmp_path / "dist"),
                          "--set", f"tracking.uri=https://admin:{PASSWORD}@mlflow.example.com"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith(f"error: {LOCAL}: invalid config: tracking.uri: credentials in the URI")
    assert PASSWORD not in out.stderr + out.stdout and not (tmp_path / "dist").exists()
