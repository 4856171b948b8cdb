"""Shipped and generated manifests: strict built-in schemas (kubernetes-validate), CRD schemas, and no
secret in plain text anywhere in what kubellm ships or generates."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.config import RunConfig, load_config
from kubellm.k8s.manifests import generated_manifests, shipped_manifests
from kubellm.k8s.podsecurity import pod_specs
from kubellm.k8s.schema import validate_against_crd

#: Custom resources kubellm generates (validated against the vendored CRD schemas).
CUSTOM_KINDS = {"PyTorchJob", "TrainJob", "RayJob", "InferenceService", "LLMInferenceService", "ScaledObject"}


@pytest.fixture(scope="module")
def everything(repo_root: Path, cluster_cfg: RunConfig) -> list[tuple[str, dict]]:
    configs = repo_root / "configs"
    named = shipped_manifests(configs)
    for path in sorted(configs.glob("*.yaml")):
        first = next(yaml.safe_load_all(path.read_text()), None) or {}
        if "kind" not in first:  # a run config: everything it generates
            named += [(f"{path.name}: {src}", obj) for src, obj in generated_manifests(load_config(path))]
    return named + generated_manifests(cluster_cfg)


def test_builtin_kinds_pass_kubernetes_validate_strict(everything: list[tuple[str, dict]]) -> None:
    import kubernetes_validate

    builtin = [(src, obj) for src, obj in everything if obj["kind"] not in CUSTOM_KINDS]
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    } <= {obj["kind"] for _, obj in builtin}
    version = kubernetes_validate.latest_version()
    for src, obj in builtin:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{src} {obj['kind']}: {err.message} at {list(err.path)}")


def test_custom_resources_pass_their_crd_schemas(everything: list[tuple[str, dict]]) -> None:
    custom = [(src, obj) for src, obj in everything if obj["kind"] in CUSTOM_KINDS]
    assert {"PyTorchJob", "TrainJob", "RayJob", "LLMInferenceService", "ScaledObject"} <= {
        obj["kind"] for _, obj in custom
    }
    for src, obj in custom:
        assert validate_against_crd(obj) == [], src


# ------------------------------------------------------------------------------------ plain-text secrets

SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|credential|private[_-]?key", re.I)
SECRET_TEXT = [
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("AWS access key", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),
    ("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("OpenAI-style key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("credentials in a URL", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@")),
    (
        "password assignment",
        re.compile(
            r"(?im)^[ \t]*[\w.-]*(password|passwd|secret[_-]?key|api[_-]?key|token)"
            r"[ \t]*(?:=(?!=)|:)[ \t]*['\"]?(?!(true|false|null|\d+)\b)[^\s'\"#{$][^\s'\"]*"
        ),
    ),
]


def secrets_in_text(text: str) -> list[str]:
    """Secret-looking strings in free text (a YAML file, a Dockerfile, a serialised manifest)."""
    return [f"{what}: {m.group(0)[:40]}" for what, rx in SECRET_TEXT for m in rx.finditer(text)]


def _envs(obj: dict) -> Iterator[tuple[str, dict[str, Any]]]:
    for pod in pod_specs(obj):
        for path, container in pod.containers:
            for i, env in enumerate(container.get("env") or []):
                yield f"{path}.env[{i}]", env
    if obj.get("kind") == "TrainJob":
        for i, env in enumerate(obj["spec"].get("trainer", {}).get("env") or []):
            yield f"spec.trainer.env[{i}]", env


def secrets_in_manifest(obj: dict) -> list[str]:
    """Secret objects, secret-named env vars with literal values, and secret-looking text."""
    found = []
    if obj.get("kind") == "Secret":
        found.append("a Secret object with its data")
    for path, env in _envs(obj):
        if SECRET_NAME.search(env.get("name", "")) and "value" in env:
            found.append(f"{path}: {env['name']} has a literal value (use valueFrom.secretKeyRef)")
    return found + secrets_in_text(yaml.safe_dump(obj))


def test_no_secret_in_plain_text(everything: list[tuple[str, dict]], repo_root: Path) -> None:
    found = [f"{src}: {s}" for src, obj in everything for s in secrets_in_manifest(obj)]
    shipped_text = sorted((repo_root / "configs").glob("*.yaml")) + sorted(
        p for p in (repo_root / "images").rglob("*") if p.is_file()
    )
    found += [f"{p.name}: {s}" for p in shipped_text for s in secrets_in_text(p.read_text())]
    assert found == []


@pytest.mark.parametrize(
    "planted",
    [
        "tracking:\n  uri: https://admin:hunter2@mlflow.example.com\n",
        "[mlflow]\nadmin_password = hunter2\n",
        "env:\n  HF_TOKEN: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH\n",
        "aws: AKIAABCDEFGHIJKLMNOP\n",
        "key: |\n  -----BEGIN OPENSSH PRIVATE KEY-----\n",
        "ENV GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789\n",
    ],
)
def test_the_scanner_finds_planted_secrets(planted: str) -> None:
    assert secrets_in_text(planted)


@pytest.mark.parametrize(
    "harmless",
    [
        "- {secret: mlflow-auth, key: password, env: MLFLOW_TRACKING_PASSWORD}\n",
        "# No password here: MLFLOW_AUTH_ADMIN_PASSWORD (from the Secret) supplies it.\n",
        "uri: http://mlflow.kubellm.svc:5000\n",
        "FROM python:3.11-slim@sha256:" + "ab" * 32 + " AS base\n",
        "token: ${HF_TOKEN}\n",
    ],
)
def test_the_scanner_leaves_references_alone(harmless: str) -> None:
    assert secrets_in_text(harmless) == []


def test_literal_secret_env_in_a_manifest_is_found() -> None:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "x"}, {"name": "HF_HOME", "value": "/cache"}],
                }
            ]
        },
    }
    assert secrets_in_manifest(pod) == [
        "spec.containers[0].env[0]: MLFLOW_TRACKING_PASSWORD has a literal value (use valueFrom.secretKeyRef)"
    ]
    assert secrets_in_manifest({"kind": "Secret", "stringData": {"a": "b"}}) == ["a Secret object with its data"]


# ------------------------------------------------------------------------------------------------- RBAC

#: What the pipeline's code calls: training_job.launch (get/create/delete), rollout.rollout and
#: playground.apply_playground (get/create/patch), pod diagnostics, Argo's task results.
NEEDED = {
    ("kubeflow.org", "pytorchjobs"): {"get", "create", "delete"},
    ("trainer.kubeflow.org", "trainjobs"): {"get", "create", "delete"},
    ("ray.io", "rayjobs"): {"get", "create", "delete"},
    ("serving.kserve.io", "inferenceservices"): {"get", "create", "patch"},
    ("serving.kserve.io", "llminferenceservices"): {"get", "create", "patch"},
    ("apps", "deployments"): {"get", "create", "patch"},
    ("", "services"): {"get", "create", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
}


def test_rbac_grants_exactly_what_the_pipeline_needs(repo_root: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((repo_root / "configs/cluster-rbac.yaml").read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}  # namespaced only: no ClusterRole
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in docs["Role"]["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not {"bind", "escalate", "impersonate"} & set(rule["verbs"])
        assert not {"secrets", "configmaps"} & set(rule["resources"])
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == NEEDED
    # A Role that may create workloads may run a pod that mounts any Secret of the namespace: say so.
    header = (repo_root / "configs/cluster-rbac.yaml").read_text().split("apiVersion:")[0]
    assert "can run a pod that mounts any Secret of the namespace" in " ".join(header.replace("#", " ").split())
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubellm-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubellm-pipeline", "namespace": "kubellm"}]
    assert docs["ServiceAccount"]["metadata"]["name"] == RunConfig().platform.service_account


def test_namespace_enforces_restricted_and_mlflow_reads_its_credentials_from_a_secret(repo_root: Path) -> None:
    (ns,) = yaml.safe_load_all((repo_root / "configs/cluster-namespace.yaml").read_text())
    labels = ns["metadata"]["labels"]
    assert all(labels[f"pod-security.kubernetes.io/{mode}"] == "restricted" for mode in ("enforce", "audit", "warn"))
    mlflow = {d["kind"]: d for d in yaml.safe_load_all((repo_root / "configs/cluster-mlflow.yaml").read_text())}
    assert {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"} <= set(mlflow)
    (container,) = mlflow["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert "--app-name=basic-auth" in container["args"]
    assert "admin_password" not in mlflow["ConfigMap"]["data"]["basic_auth.ini"]
