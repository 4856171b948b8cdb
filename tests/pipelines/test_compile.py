"""Compiled pipelines: deterministic, up to date with their source, and carrying what we promise
(retries, the exit handler, the gate, placement, no secrets) in the IR a cluster runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubellm import yamlio
from kubellm.config import load_config
from kubellm.pipeline_params import builtin_pipelines
from kubellm.pipelines._runner import COMPONENTS, compile_all

PIPELINES = sorted(builtin_pipelines())

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO / "pipelines" / "compiled"
CLUSTER_OVERRIDES = [
    "tracking.uri=http://mlflow.kubellm.svc:5000",
    "finetune.base_model=models:/kubellm@champion",
    "platform.default.resources.cpu_request=2",
    "platform.default.resources.memory_limit=16Gi",
    "platform.stages.pretrain.resources.gpus=2",
    "platform.stages.pretrain.resources.accelerator=nvidia-h100-80gb",
    "platform.stages.pretrain.node_selector={pool: gpu}",
    "platform.stages.pretrain.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "platform.stages.pretrain.pvcs=[{claim: kubellm-data, mount_path: /data}]",
    "platform.stages.pretrain.secret_env=[{secret: mlflow-auth, key: password, env: MLFLOW_TRACKING_PASSWORD}]",
    "platform.stages.pretrain.timeout_seconds=86400",
    "platform.image_pull_secrets=[regcred]",
]


def _docs(path: Path) -> list[dict]:
    return yamlio.load_all(path.read_text(encoding="utf-8"))


SECRET_VALUES = {"MLFLOW_TRACKING_PASSWORD": "hunter2-pw", "KFP_TOKEN": "t0ken-kfp", "HF_TOKEN": "hf_s3cret"}


@pytest.fixture(scope="module")
def cluster_files(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, bytes]:
    """Compiled for a cluster, with secrets in the environment of the compiling process (as on a CI
    runner): none of them may end up in the compiled files. Every file's bytes, by relative path."""
    mp = pytest.MonkeyPatch()
    for k, v in SECRET_VALUES.items():
        mp.setenv(k, v)
    try:
        cfg = load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES)
        out = tmp_path_factory.mktemp("compiled")
        return {p.relative_to(out): p.read_bytes() for p in compile_all(cfg, out)}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def cluster_build(cluster_files: dict[Path, bytes]) -> dict[str, list[dict]]:
    return {name: yamlio.load_all(cluster_files[Path(f"{name}.yaml")].decode()) for name in PIPELINES}


def test_compiling_twice_gives_identical_bytes(cluster_files: dict[Path, bytes], tmp_path: Path) -> None:
    """A second compile, without the secrets in its environment, gives the same bytes as the fixture's."""
    cfg = load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES)
    again = {p.relative_to(tmp_path): p.read_bytes() for p in compile_all(cfg, tmp_path)}
    assert again == cluster_files
    assert len(again) == len(PIPELINES) + len(COMPONENTS)


def test_committed_pipelines_match_their_source(tmp_path: Path) -> None:
    """pipelines/compiled/ is what `kubellm compile --config configs/local.yaml --out pipelines/compiled`
    writes; a change to a pipeline or component without recompiling fails here."""
    cfg = load_config(REPO / "configs" / "local.yaml")
    fresh = compile_all(cfg, tmp_path)
    stale = [
        str(p.relative_to(tmp_path))
        for p in fresh
        if not (SNAPSHOT / p.relative_to(tmp_path)).is_file()
        or (SNAPSHOT / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()
    ]
    assert not stale, (
        f"compiled pipelines are out of date: {stale}; run "
        "`kubellm compile --config configs/local.yaml --out pipelines/compiled`"
    )


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root and sub-DAGs), by name."""
    out = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        out.update(dag.get("tasks", {}))
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_every_task_retries_and_the_exit_handler_records_status(cluster_build, name: str) -> None:
    spec = cluster_build[name][0]
    tasks = _tasks(spec)
    containers = {
        n: t
        for n, t in tasks.items()
        if "componentRef" in t and "dag" not in spec["components"][t["componentRef"]["name"]]
    }
    assert containers
    missing = [n for n, t in containers.items() if not t.get("retryPolicy", {}).get("maxRetryCount")]
    assert not missing, f"tasks without retries: {missing}"
    exit_tasks = [
        n for n, t in tasks.items() if t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"
    ]
    assert exit_tasks == ["finish-run"]


#: Exactly these steps are cacheable, per pipeline (pipelines/_common.py says why): pure steps only;
#: never the parent run's start/finish, check_data, compare-with-champion, select-best, register, deploy;
#: the continuous pipeline's instruction prep neither (its data changes behind the same URI).
CACHEABLE = {
    "llm-lifecycle": {"prepare-data", "pretrain", "prepare-instructions", "finetune", "evaluate"},
    "llm-finetune": {"fetch-model", "prepare-instructions", "finetune", "evaluate"},
    "llm-lora-sweep": {"fetch-model", "prepare-instructions", "finetune", "evaluate"},
    "llm-continuous-finetune": {"fetch-model", "finetune", "evaluate"},
}


def _containers(spec: dict) -> dict[str, dict]:
    return {n: t for n, t in _tasks(spec).items() if "dag" not in spec["components"][t["componentRef"]["name"]]}


@pytest.mark.parametrize("name", PIPELINES)
def test_exactly_the_pure_steps_are_cacheable_and_have_no_run_specific_input(cluster_build, name: str) -> None:
    spec = cluster_build[name][0]
    containers = _containers(spec)
    cached = {n for n, t in containers.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == CACHEABLE[name]
    for task in cached:  # nothing that differs from run to run: no parent run id, no KFP run id
        inputs = containers[task]["inputs"].get("parameters", {})
        assert "parent_run_id" not in inputs and "kfp_run_id" not in inputs, task
        assert "PIPELINE_JOB" not in str(inputs) and "taskOutputParameter" not in str(
            {k: v for k, v in inputs.items() if k in ("tracking", "workdir")}
        ), task
        # a step that logs a stage run starts after the parent run exists (directly or through its inputs)
        assert (
            task == "fetch-model"
            or "start-run" in containers[task].get("dependentTasks", [])
            or any(
                "OutputArtifact" in str(a) or "InputArtifact" in str(a)
                for a in containers[task]["inputs"].get("artifacts", {}).values()
            )
        ), task
    # the side-effecting steps still get the parent run as an input
    assert "parent_run_id" in containers["register"]["inputs"]["parameters"]


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pod_finds_its_run_by_the_kfp_run_id_label(cluster_build, name: str) -> None:
    from kubellm.pipelines._common import RUN_ID_LABEL
    from kubellm.stages import KFP_RUN_ENV

    executors = cluster_build[name][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor, conf in executors.items():
        assert {"name": KFP_RUN_ENV, "fieldPath": f"metadata.labels['{RUN_ID_LABEL}']"} in conf["fieldPathAsEnv"], (
            executor
        )


def test_without_caching_no_step_is_cacheable(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES)
    for path in compile_all(cfg, tmp_path, components=False, caching=False):
        spec = _docs(path)[0]
        assert not [n for n, t in _containers(spec).items() if t.get("cachingOptions", {}).get("enableCache")]


def test_the_cli_knows_every_pipelines_parameters(cluster_build) -> None:
    """`kubellm run --help` and its --param check read the pipeline files (no kfp import): they must
    name exactly each pipeline's run parameters, in order, each documented."""
    from kubellm.pipeline_params import PARAM_DOCS
    from kubellm.pipelines.api import Builder, load_file, pipeline_parameters

    cfg = load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES)
    for name, docs in cluster_build.items():
        params = builtin_pipelines()[name].params
        assert params is not None and sorted(params) == sorted(docs[0]["root"]["inputDefinitions"]["parameters"])
        assert params == list(pipeline_parameters(load_file(name, Builder(cfg, "cluster")))), name  # in order
        assert set(params) <= set(PARAM_DOCS)


#: The MLflow stages each built-in's steps log, in the order they run: the run summary's rows, which
#: ``kubellm run`` takes from what the builder recorded (``finetune.*``: every trial of the sweep).
STAGES = {
    "llm-lifecycle": ["prep", "pretrain", "prep_instruct", "finetune", "evaluate", "register", "deploy"],
    "llm-finetune": ["prep_instruct", "finetune", "evaluate", "register", "deploy"],
    "llm-lora-sweep": ["prep_instruct", "finetune.*", "evaluate.*", "register", "deploy"],
    "llm-continuous-finetune": [
        "check_data",
        "prep_instruct",
        "finetune",
        "evaluate",
        "evaluate_champion",
        "register",
        "deploy",
    ],
}


@pytest.mark.parametrize("name", PIPELINES)
def test_the_builder_records_the_stages_each_pipeline_logs_in_order(name: str) -> None:
    from kubellm.pipelines.api import Builder, load_file

    builder = Builder(load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES), "local", run_id="run-1")
    load_file(name, builder)
    assert builder.name == name and builder.stages == STAGES[name]


@pytest.mark.parametrize("name", PIPELINES)
def test_release_is_behind_the_gate(cluster_build, name: str) -> None:
    spec = cluster_build[name][0]
    tasks = _tasks(spec)
    conditions = [
        t["triggerPolicy"]["condition"] for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")
    ]
    assert conditions, "no dsl.If in the pipeline"
    # register/deploy live only in conditional sub-DAGs, never in the root DAG
    assert "register" not in spec["root"]["dag"]["tasks"] and "deploy" not in spec["root"]["dag"]["tasks"]
    assert "register" in tasks and "deploy" in tasks


def test_placement_from_the_cluster_config(cluster_build) -> None:
    pipeline, platform = cluster_build["llm-lifecycle"]
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pre = execs["exec-pretrain"]
    assert pre["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": "gpu"}
    assert pre["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pre["pvcMount"][0]["mountPath"] == "/data"
    assert pre["secretAsEnv"][0]["keyToEnv"] == [{"secretKey": "password", "envVar": "MLFLOW_TRACKING_PASSWORD"}]
    assert pre["activeDeadlineSeconds"] == "86400"
    assert pre["imagePullSecret"][0]["secretName"] == "regcred"
    assert pre["securityContext"]["runAsNonRoot"] is True and int(pre["securityContext"]["runAsUser"]) == 1000
    assert pre["podMetadata"]["labels"]["kubellm.io/stage"] == "pretrain"
    containers = pipeline["deploymentSpec"]["executors"]
    gpu = containers["exec-pretrain"]["container"]["resources"]
    assert gpu["accelerator"]["resourceCount"] == "2"
    assert containers["exec-prepare-data"]["container"]["resources"]["resourceCpuRequest"] == "2"
    assert all(e["container"]["image"] == "ghcr.io/kubellm/kubellm:0.1.0" for e in containers.values())


SECRETISH = re.compile(r"(token|passw|secret|api[_-]?key|credential)", re.I)


@pytest.mark.parametrize("name", PIPELINES)
def test_no_parameter_is_a_secret_and_no_secret_is_compiled_in(cluster_build, name: str) -> None:
    spec = cluster_build[name][0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if SECRETISH.search(p)]
    text = yaml.safe_dump(cluster_build[name])
    for value in SECRET_VALUES.values():
        assert value not in text


def test_ui_parameters_are_described(cluster_build) -> None:
    spec = cluster_build["llm-lifecycle"][0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"run_name", "dataset_uri", "instruct_dataset_uri", "data_config", "pretrain_config"} <= set(params)
    assert all(p.get("description") for p in params.values())
    assert spec["pipelineInfo"]["description"].startswith("The whole life")


def test_components_load_back(tmp_path: Path) -> None:
    from kfp import components

    cfg = load_config(REPO / "configs" / "local.yaml")
    compile_all(cfg, tmp_path, names=[])
    for name in COMPONENTS:
        comp = components.load_component_from_file(str(tmp_path / "components" / f"{name}.yaml"))
        assert comp.component_spec.implementation.container.image == "ghcr.io/kubellm/kubellm:0.1.0"


def test_runtime_image_default_matches_the_config_default() -> None:
    from kubellm.components._base import RUNTIME_IMAGE
    from kubellm.config import PlatformConfig

    assert PlatformConfig().image == RUNTIME_IMAGE
