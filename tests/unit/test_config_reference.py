"""The config reference a user finds settings in: `kubellm config`, the JSON Schema, "did you mean"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from kubellm.config import RunConfig, load_config
from kubellm.config.reference import SCHEMA_FILE, fields, json_schema, suggest
from kubellm.errors import ConfigError

BIN = Path(sys.executable).parent


def _kubellm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubellm"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_field_of_every_section_is_listed_with_type_default_and_meaning() -> None:
    rows = {r.path: r for r in fields()}
    timeout = rows["deploy.startup_timeout_s"]
    assert timeout.type == "int" and int(timeout.default) > 0 and timeout.doc
    assert rows["pretrain.loop.max_steps"].type == "int"
    assert "data.sources[].text_field" in rows and rows["data.sources[].text_field"].default == '"text"'
    # every leaf field of the models is there: nothing documented by hand can be missing
    assert {
        "name",
        "workdir",
        "evaluate.gate.max_perplexity_ratio",
        "serve.max_prompt_tokens",
        "platform.stages",
        "sweep.trials",
    } <= set(rows)
    undocumented = [p for p, r in rows.items() if not r.doc]
    assert len(undocumented) < len(rows) // 4, undocumented  # most fields carry their docstring


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("startup_timeout", "startup_timeout_s"),
        ("max_step", "max_steps"),
        ("base", "base_model"),
    ],
)
def test_suggestions_find_what_a_person_meant(typo: str, meant: str) -> None:
    candidates = [r.path.rsplit(".", 1)[-1] for r in fields()]
    assert meant in suggest(typo, sorted(set(candidates)))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("deploy.startup_timeout=60", "deploy.startup_timeout: unknown field; did you mean `startup_timeout_s`?"),
        ("pretrain.loop.max_step=5", "pretrain.loop.max_step: unknown field; did you mean `max_steps`?"),
        ("finetune.base=x", "finetune.base: unknown field; did you mean `base_model`?"),
        ("servve.port=1", "servve: unknown field; did you mean `serve`?"),
        ("data.sources.0.text_feild=body", "data.sources.0.text_feild: unknown field; did you mean `text_field`?"),
    ],
)
def test_a_misspelt_field_in_a_config_gets_a_did_you_mean(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/local.yaml", [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_sweep_trial_with_a_misspelt_field_names_the_trial_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"sweep.trials.0: optim.lrr: unknown field; did you mean `lr`\?"):
        load_config("configs/local.yaml", ['sweep.trials=[{"optim.lrr": 0.1}]'])


def test_the_json_schema_accepts_every_shipped_config_and_refuses_a_typo() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(Path("configs").glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        doc = docs[0] if len(docs) == 1 else None
        if isinstance(doc, dict) and "kind" not in doc:  # Kubernetes manifests live there too
            errors = [e.message for e in validator.iter_errors(doc)]
            assert not errors, f"{path}: {errors[:3]}"
    bad = yaml.safe_load(Path("configs/local.yaml").read_text())
    bad["deploy"] = {"startup_timeout": 5}
    assert any("startup_timeout" in e.message for e in validator.iter_errors(bad))
    assert RunConfig.model_validate(yaml.safe_load(Path("configs/local.yaml").read_text()))


def test_kubellm_config_lists_a_section_and_says_did_you_mean_for_an_unknown_one(tmp_path: Path) -> None:
    out = _kubellm(tmp_path, "config", "deploy")
    assert out.returncode == 0, out.stderr
    assert "deploy.startup_timeout_s  (int, default 1200)" in out.stdout
    assert not [line for line in out.stdout.splitlines() if line.startswith("serve.")]  # only the section asked
    bad = _kubellm(tmp_path, "config", "deplyo")
    assert bad.returncode == 2 and "did you mean `deploy`?" in bad.stderr
    schema = json.loads(_kubellm(tmp_path, "config", "--schema").stdout)
    assert "deploy" in schema["properties"]


def test_init_writes_the_schema_and_the_editor_comment_for_a_pip_user(tmp_path: Path) -> None:
    out = _kubellm(tmp_path, "init", "mine.yaml")
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "mine.yaml").read_text()
    assert f"# yaml-language-server: $schema=./{SCHEMA_FILE}" in text
    header = text.split("\nname:")[0]
    # nothing a pip user cannot do: no make targets, no repository paths
    assert "make " not in header and "configs/" not in header and "kubellm config" in header
    assert json.loads((tmp_path / SCHEMA_FILE).read_text())["$comment"].startswith("kubellm ")
    # a second config in the same folder refreshes kubellm's own schema; a user's file there is never touched
    assert _kubellm(tmp_path, "init", "second.yaml").returncode == 0
    other = tmp_path / "theirs"
    other.mkdir()
    (other / SCHEMA_FILE).write_text('{"mine": true}')
    refused = _kubellm(other, "init")
    assert refused.returncode == 2 and "not a kubellm config schema" in refused.stderr
    assert (other / SCHEMA_FILE).read_text() == '{"mine": true}' and not (other / "kubellm.yaml").exists()
