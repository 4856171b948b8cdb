"""Credentials never travel inside a config: user-info in any URI field and secret-like values are
refused when the config is validated (so they are neither compiled into pipeline YAML nor logged), and
:func:`kubellm.config.secrets.redact` masks what reaches a log anyway."""

from __future__ import annotations

import json
import random
import string
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


@pytest.mark.parametrize(
    "field",
    [
        "tracking.uri",
        "deploy.storage_uri",
        "data.sources.0.uri",
        "instruct_data.sources.0.uri",
        "serve.model",
        "playground.endpoint",
        "playground.compare_endpoint",
        "finetune.base_model",
    ],
)
def test_credentials_in_any_uri_field_are_refused(field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(LOCAL, [f"{field}=https://admin:{PASSWORD}@host.example.com/x"])
    message = str(info.value)
    assert f"{field}: credentials in the URI" in message and "secret_env" in message
    assert PASSWORD not in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "where"),
    [
        (
            "platform.default.annotations={note: hf_abcdefghijklmnopqrstuvwxyzABCDEF}",
            "platform.default.annotations.note",
        ),
        ("deploy.hf_args=['--api-key=sk-abcdefghijklmnopqrstuvwx']", "deploy.hf_args.0"),
        ("platform.default.labels={api_token: abc}", "platform.default.labels.api_token"),
    ],
)
def test_secret_like_values_anywhere_are_refused(override: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"{where}: holds "):
        load_config(LOCAL, [override])


def test_ordinary_configs_pass() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "kind" in (next(yaml.safe_load_all(path.read_text()), None) or {}):
            continue  # Kubernetes manifests, not run configs
        assert find_secrets(load_config(path).model_dump(mode="json")) == []
    cfg = load_config(
        LOCAL,
        [
            "tracking.uri=http://mlflow.kubellm.svc:5000",
            "serve.model=models:/kubellm@champion",
            "deploy.storage_uri=hf://org/model@main",
            "serve.max_prompt_tokens=64",
        ],
    )
    assert cfg.serve.model == "models:/kubellm@champion"


def test_redact_masks_what_reaches_a_log() -> None:
    doc = {
        "tracking": {"uri": f"https://admin:{PASSWORD}@mlflow.example.com"},
        "env": {"HF_TOKEN": "abc", "max_new_tokens": 5, "secret_env": [{"secret": "mlflow-auth"}]},
        "args": ["--token=hf_abcdefghijklmnopqrstuvwxyzABCDEF", "plain"],
    }
    assert redact(doc) == {
        "tracking": {"uri": "https://***@mlflow.example.com"},
        "env": {"HF_TOKEN": "***", "max_new_tokens": 5, "secret_env": [{"secret": "mlflow-auth"}]},
        "args": ["--token=***", "plain"],
    }
    assert doc["env"]["HF_TOKEN"] == "abc"  # a copy: the config itself is untouched


def test_compile_refuses_credentials(tmp_path: Path) -> None:
    kubellm = str(Path(sys.executable).with_name("kubellm"))
    out = subprocess.run(
        [
            kubellm,
            "compile",
            "--config",
            str(LOCAL),
            "--out",
            str(tmp_path / "dist"),
            "--set",
            f"tracking.uri=https://admin:{PASSWORD}@mlflow.example.com",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith(f"error: {LOCAL}: invalid config: tracking.uri: credentials in the URI")
    assert PASSWORD not in out.stderr + out.stdout and not (tmp_path / "dist").exists()


# Issue 24: three shapes that slipped through, each into 4 compiled YAML files. Built at run time, so no
# secret-looking literal sits in the repository.
AWS_SECRET = "".join(random.Random(24).choices(string.ascii_letters + string.digits + "+/", k=40))
JWT = "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiJhZG1pbiJ9" + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
SHAPES = {
    "raw key under a neutral key": (
        "platform.default.annotations={note: " + AWS_SECRET + "}",
        AWS_SECRET,
        "platform.default.annotations.note: holds a random-looking key",
    ),
    "password in a URI query": (
        f"deploy.storage_uri=https://host.example.com/m?password={PASSWORD}",
        PASSWORD,
        "deploy.storage_uri: holds credentials in a URI query",
    ),
    "Authorization header": (
        "deploy.hf_args=['--header=Authorization: Bearer " + JWT + "']",
        JWT,
        "deploy.hf_args.0: holds a JSON Web Token",
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_three_shapes_are_refused_in_a_config_file_and_a_set(shape: str, tmp_path: Path) -> None:
    override, secret, message = SHAPES[shape]
    with pytest.raises(ConfigError) as by_set:
        load_config(LOCAL, [override])
    import yaml

    from kubellm.config.run import apply_overrides

    doc = yaml.safe_load(LOCAL.read_text())
    apply_overrides(doc, [override])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as by_file:
        load_config(tmp_path / "run.yaml")
    for err in (str(by_set.value), str(by_file.value)):
        assert message in err and secret not in err and "\n" not in err
    assert secret not in json.dumps(redact({"x": override}))


def test_hashes_hub_ids_and_paths_are_no_secrets() -> None:
    import hashlib
    import uuid

    ordinary = [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "s3://My-Bucket/Models/Llama3/Checkpoints/Step1000",
        "/home/User/Projects/Kubellm2/data/Prepared",
        "gs://Company-ML-Data/Tokenizers/BPE_32000_v2/Tokenizer.json",
        hashlib.sha256(b"x").hexdigest(),
        "sha256:" + hashlib.sha256(b"y").hexdigest(),
        uuid.uuid4().hex,
        "a" * 40 + "0" * 8,
        "http://mlflow.kubellm.svc:5000/?experiment=3",
        "Be the bearer of good news.",
        "Qwen2_5OmniToken2WavBigVGANModel",
    ]
    assert find_secrets({"values": ordinary}) == []
    assert redact({"values": ordinary}) == {"values": ordinary}


@pytest.mark.parametrize(
    ("argv", "secret"),
    [
        (["serve", "--model", f"http://user:{PASSWORD}@host.example.com/m"], PASSWORD),
        (["playground", "--compare-endpoint", f"http://user:{PASSWORD}@host.example.com:8080"], PASSWORD),
        (["serve", "--model", f"https://host.example.com/m?token={PASSWORD}"], PASSWORD),
        (["deploy", "--dry-run", "--storage-uri", f"s3://bucket/m?X-Amz-Signature={PASSWORD}"], PASSWORD),
        (["prep", "--out", "x", "--source", f"https://host.example.com/d.jsonl?access_token={PASSWORD}"], PASSWORD),
        (["run", "--param", f"base_model={AWS_SECRET}"], AWS_SECRET),
        (["finetune", "--data", "d", "--out", "o", "--base", f"Authorization: Bearer {JWT}"], JWT),
    ],
)
def test_flags_that_take_a_uri_or_header_refuse_credentials(
    argv: list[str], secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubellm.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    flag = next(a for a in argv if a.startswith("--") and a not in ("--dry-run", "--out", "--data"))
    assert info.value.code == 2 and err.startswith(f"error: {flag}: holds ") and err.count("\n") == 1
    assert secret not in out + err and list(tmp_path.iterdir()) == []
