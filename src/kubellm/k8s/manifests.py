"""Every Kubernetes manifest kubellm ships (``configs/cluster-*.yaml``) and generates from a run config.

``kubellm check`` with no paths checks all of them; the tests check them for Pod Security, against the
CRD and built-in schemas, and for secrets in plain text. Generated manifests use placeholder paths (the
values do not change what is checked); builders of other areas are imported lazily and skipped while
they do not exist.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kubellm.config.run import RunConfig
from kubellm.k8s.podsecurity import load_manifests

#: Placeholder inputs of generated manifests.
EXAMPLE_DATA = "prepared/example"
EXAMPLE_OUT = "runs/example"
EXAMPLE_BASE = "/mnt/kubellm/runs/example/pretrain"
EXAMPLE_MODEL_URI = "s3://kubellm/models/example"
EXAMPLE_PVC = "kubellm-shared"
EXAMPLE_ENDPOINT = "http://example.kubellm.svc.cluster.local"
EXAMPLE_COMPARE = "http://base.kubellm.svc.cluster.local"
EXAMPLE_PROMETHEUS = "http://prometheus.monitoring.svc.cluster.local:9090"


def shipped_manifests(configs_dir: str | Path = "configs") -> list[tuple[str, dict[str, Any]]]:
    """``(file, object)`` for every document of ``configs_dir/cluster-*.yaml`` that is a manifest
    (has ``kind``; the cluster run config has none)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(Path(configs_dir).glob("cluster-*.yaml")):
        docs = load_manifests(path)
        out += [(f"{path}#{i}", doc) for i, doc in enumerate(docs) if "kind" in doc]
    return out


def generated_manifests(run_cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(label, object)`` for every manifest kubellm builds from ``run_cfg``: the three training-job kinds
    for each training stage the config has, the InferenceService on both runtimes, the LLMInferenceService
    (base and adapters, with and without llm-d's scheduler) and the playground.
    The memory planner is not applied here: ``kubellm check`` reports its verdict as a finding."""
    from kubellm.k8s.training_job import build_job

    out: list[tuple[str, dict[str, Any]]] = []
    for stage in ("pretrain", "finetune"):
        section = getattr(run_cfg, stage)
        if section is None:
            continue
        cfg = run_cfg
        if not run_cfg.platform.distributed_for(stage).shared_pvc:  # engine none: give the builder a PVC
            cfg = run_cfg.model_copy(deep=True)
            getattr(cfg.platform.distributed, stage).shared_pvc = EXAMPLE_PVC
        base = EXAMPLE_BASE if stage == "finetune" else None
        for kind in ("pytorchjob", "trainjob", "rayjob"):
            out.append(
                (
                    f"generated {kind} ({stage})",
                    build_job(kind, stage, cfg, EXAMPLE_DATA, EXAMPLE_OUT, base, plan_memory=False),
                )
            )
    out += _prep_rayjobs(run_cfg)
    out += _inferenceservices(run_cfg)
    out += _playground(run_cfg)
    return out


def _prep_rayjobs(run_cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """The prep RayJob of each data section whose engine is Ray (``data.engine: ray``)."""
    from kubellm.k8s.rayjob import PREP_STAGES, build_prep_rayjob

    out = []
    for section in PREP_STAGES:
        data = getattr(run_cfg, section, None)
        if data is None or data.engine != "ray":
            continue
        if not data.cluster.nodes:  # prepares in place: show the job it would create with one worker
            cluster = data.cluster.model_copy(update={"nodes": 1, "shared_pvc": data.cluster.shared_pvc or EXAMPLE_PVC})
            run_cfg = run_cfg.model_copy(update={section: data.model_copy(update={"cluster": cluster})})
        out.append((f"generated rayjob ({PREP_STAGES[section]})", build_prep_rayjob(run_cfg, section, EXAMPLE_DATA)))
    return out


def _builder(module: str, name: str) -> Any:
    """``module.name`` if the serving area's module exists (yet) and has it, else None."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _inferenceservices(run_cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    build = _builder("kubellm.k8s.inferenceservice", "build_inferenceservice")
    if build is None:
        return []
    out = []
    for runtime in ("kubellm", "huggingface"):
        cfg = run_cfg.model_copy(update={"deploy": run_cfg.deploy.model_copy(update={"runtime": runtime})})
        out.append((f"generated inferenceservice ({runtime})", build(cfg, EXAMPLE_MODEL_URI)))
    build_keda = _builder("kubellm.k8s.keda", "build_scaled_object")
    if build_keda is not None:
        cfg = run_cfg.model_copy(
            update={
                "deploy": run_cfg.deploy.model_copy(
                    update={
                        "runtime": "kubellm",
                        "deployment_mode": "RawDeployment",
                        "keda_prometheus_url": run_cfg.deploy.keda_prometheus_url or EXAMPLE_PROMETHEUS,
                    }
                )
            }
        )
        out.append(("generated keda scaledobject (kubellm runtime)", build_keda(cfg)))
    build_llm = _builder("kubellm.k8s.llmisvc", "build_llm_inference_service")
    if build_llm is not None:
        name = run_cfg.serve.model_name
        adapters = {name: f"{EXAMPLE_MODEL_URI}-adapter-v1", f"{name}-v2": f"{EXAMPLE_MODEL_URI}-adapter-v2"}
        for scheduler in (True, False):
            cfg = run_cfg.model_copy(
                update={
                    "deploy": run_cfg.deploy.model_copy(
                        update={"runtime": "llm-inference-service", "router_scheduler": scheduler}
                    )
                }
            )
            label = f"generated llminferenceservice ({'with' if scheduler else 'without'} the llm-d scheduler)"
            out.append((label, build_llm(cfg, EXAMPLE_MODEL_URI, adapters)))
    return out


def _playground(run_cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    build = _builder("kubellm.k8s.playground", "build_playground")
    if build is None:
        return []
    return [
        (f"generated playground {obj.get('kind', '?').lower()}", obj)
        for obj in build(run_cfg, EXAMPLE_ENDPOINT, EXAMPLE_COMPARE)
    ]
