"""Pipeline-level limits (``platform.run_limits``) compiled through KFP 2.17's ``dsl.PipelineConfig``: a
deadline and time-to-live that KFP's backend applies to the whole run, so a forgotten run does not hold
GPUs or volumes. Unset, the compiled pipeline carries none (the committed snapshots pin that)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm import yamlio
from kubellm.config import load_config
from kubellm.errors import ConfigError
from kubellm.pipeline_params import builtin_pipelines
from kubellm.pipelines._runner import build_for_cluster, compile_all

REPO = Path(__file__).resolve().parents[2]
LIMITS = [
    "platform.run_limits.active_deadline_seconds=172800",
    "platform.run_limits.ttl_seconds_after_finished=86400",
    "platform.run_limits.ttl_seconds_after_failure=604800",
    "finetune.base_model=models:/kubellm@champion",
]


def _platform(path: Path) -> dict:
    docs = yamlio.load_all(path.read_text(encoding="utf-8"))
    return docs[1]["platforms"]["kubernetes"] if len(docs) > 1 else {}


def test_every_pipeline_compiles_the_configs_run_limits(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "local.yaml", LIMITS)
    written = compile_all(cfg, tmp_path, components=False)
    assert {p.stem for p in written} == set(builtin_pipelines())
    for path in written:
        assert _platform(path)["pipelineConfig"] == {
            "activeDeadlineSeconds": 172800,
            "resourceTtlOnCompletion": 86400,
            "resourceTtlOnFailure": 604800,
        }, path.name


def test_a_users_pipeline_file_gets_them_too(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "local.yaml", LIMITS)
    ((name, _),) = build_for_cluster(cfg, [str(REPO / "examples" / "own_data" / "pipeline.py")])
    path = compile_all(cfg, tmp_path, [str(REPO / "examples" / "own_data" / "pipeline.py")], components=False)[0]
    assert path.name == name and _platform(path)["pipelineConfig"]["activeDeadlineSeconds"] == 172800


def test_without_limits_nothing_is_compiled_in(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "local.yaml", ["finetune.base_model=models:/kubellm@champion"])
    for path in compile_all(cfg, tmp_path, components=False):
        assert "pipelineConfig" not in _platform(path), path.name


@pytest.mark.parametrize(
    "bad",
    [
        "platform.run_limits.active_deadline_seconds=0",
        "platform.run_limits.ttl_seconds_after_success=-1",
        "platform.run_limits.deadline=5",
    ],
)
def test_a_bad_limit_is_one_line_naming_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match="run_limits"):
        load_config(REPO / "configs" / "local.yaml", [bad])
