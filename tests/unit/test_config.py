"""Run configs: every shipped YAML validates; bad configs fail before any work with the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubellm.config import RunConfig, load_config
from kubellm.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# The first document decides: multi-document Kubernetes manifests (configs/cluster-*.yaml) have `kind`.
RUN_CONFIGS = [p for p in CONFIGS if "kind" not in (next(yaml.safe_load_all(p.read_text()), None) or {})]


def test_there_are_configs() -> None:
    assert any(p.name == "local.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_has_a_header_with_its_command(path: Path) -> None:
    head = path.read_text().splitlines()[:15]
    comments = [line for line in head if line.startswith("#")]
    assert len(comments) >= 2, f"{path.name}: needs a header saying what it is for"
    assert any(("kubellm " in c or "make " in c or "kubectl " in c) for c in comments), (
        f"{path.name}: the header must give the command that uses it"
    )


def test_overrides_are_typed_and_dotted() -> None:
    cfg = load_config(
        "configs/local.yaml",
        [
            "data.max_docs=1000",
            "pretrain.loop.precision=fp32",
            "data.sources.0.uri=builtin://stdlib-instruct",
            "evaluate.gate.min_rouge_l=0.2",
        ],
    )
    assert cfg.data.max_docs == 1000
    assert cfg.pretrain.loop.precision == "fp32"
    assert cfg.data.sources[0].uri == "builtin://stdlib-instruct"
    assert cfg.evaluate.gate.min_rouge_l == 0.2


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.max_doc=5"], "data.max_doc: unknown field"),
        (["pretrain.loop.max_steps=0"], "pretrain.loop.max_steps"),
        (["pretrain.loop.precision=fp8"], "pretrain.loop.precision"),
        (["data.cleaning.min_chars=500", "data.cleaning.max_chars=100"], "min_chars (500) is greater"),
        (["pretrain.model.hidden_size=100", "pretrain.model.num_heads=3"], "not divisible"),
        (["finetune.trust_remote_code=true"], "pinned revision"),
        (["name=Has_Upper"], "name:"),
        (["data.kind=instruct"], "data.kind must be 'pretrain'"),
        (["data.sources.7.uri=x"], "not a valid list index"),
        (["data.max_docs"], "expected KEY=VALUE"),
        (["platform.stages.nonsense.timeout_seconds=5"], "unknown stage"),
        (["deploy.runtime=huggingface", "tracking.register_merged=false"], "cannot load an adapter version"),
    ],
)
def test_invalid_config_names_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/local.yaml", overrides)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_the_register_step_stores_adapter_versions_unless_the_deployment_needs_merged_ones() -> None:
    cfg = load_config("configs/local.yaml")
    assert cfg.tracking.register_merged is None
    assert cfg.merged_versions("local") is False  # make run: adapter versions
    assert cfg.merged_versions("cluster") is True  # the kubellm predictor pod cannot fetch the base
    assert load_config("configs/local.yaml", ["serve.base_model=/mnt/base"]).merged_versions("cluster") is False
    assert load_config("configs/local.yaml", ["deploy.runtime=huggingface"]).merged_versions("local") is True
    assert load_config("configs/local.yaml", ["tracking.register_merged=true"]).merged_versions("local") is True
    assert load_config("configs/local.yaml", ["tracking.register_merged=false"]).merged_versions("cluster") is False


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: ok\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_config(p)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)


def test_config_hash_is_stable_and_sensitive() -> None:
    a = load_config("configs/local.yaml")
    b = load_config("configs/local.yaml")
    c = load_config("configs/local.yaml", ["pretrain.loop.max_steps=61"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_every_field_is_documented() -> None:
    """The config classes are the schema: every field carries a description (README reference)."""
    from pydantic import BaseModel

    seen: set[type] = set()
    missing: list[str] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            ann = field.annotation
            nested = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append(ann)
            for sub in nested:
                walk(sub)
            if not field.description and not nested:
                missing.append(f"{model.__name__}.{name}")

    walk(RunConfig)
    assert not missing, f"undocumented config fields: {missing}"
