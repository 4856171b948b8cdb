"""The prompt playground on a cluster: a Deployment running ``kubellm playground`` and its Service.

The pod runs the same Gradio app as ``kubellm playground`` on a laptop, bound to 0.0.0.0:7860 inside
the pod, calling the InferenceService's OpenAI-compatible API (and optionally a second endpoint to
compare against). It gets the ``playground`` stage's placement and the same restricted pod security as
every kubellm pod (non-root, read-only root filesystem with emptyDir scratch space, no service-account
token: the playground never talks to the Kubernetes API). Reach it with
``kubectl port-forward svc/<name>-playground 7860:80``.

Its endpoints are locked to the ones given here (plus ``playground.allowed_endpoints``): the page's
user cannot make the pod call another URL. With ``playground.auth_secret`` the page asks for the login
held in that Secret, which reaches the pod as environment variables, never as arguments.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kubellm.k8s import pods
from kubellm.k8s.inferenceservice import isvc_name, set_args
from kubellm.serve.playground import PASSWORD_ENV, USERNAME_ENV

if TYPE_CHECKING:
    from kubellm.config.run import RunConfig

PORT = 7860


def playground_name(run_cfg: RunConfig) -> str:
    """``<inferenceservice name>-playground``."""
    return f"{isvc_name(run_cfg)}-playground"


def build_playground(run_cfg: RunConfig, endpoint_url: str, compare_url: str | None = None) -> list[dict]:
    """The Deployment and Service of the playground calling ``endpoint_url`` (and ``compare_url``)."""
    cfg = run_cfg.playground
    name = playground_name(run_cfg)
    namespace = run_cfg.platform.namespace
    placement = run_cfg.platform.placement("playground")
    labels = {
        "app.kubernetes.io/name": "kubellm",
        "app.kubernetes.io/component": "playground",
        "app.kubernetes.io/instance": name,
        "kubellm.io/run": run_cfg.name,
    }

    args = ["playground", "--endpoint", endpoint_url, "--port", str(PORT)]
    if compare_url:
        args += ["--compare-endpoint", compare_url]
    pinned = cfg.model_dump(exclude={"endpoint", "compare_endpoint", "port", "replicas", "auth_secret"})
    pinned["host"] = "0.0.0.0"
    pinned["editable_endpoints"] = False  # in the cluster, a typed URL would be called from inside it
    # The InferenceService serves serve.model_name (see kubellm.k8s.inferenceservice).
    pinned["model"] = cfg.model or run_cfg.serve.model_name
    args += set_args("playground", pinned)

    def probe(period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/", "port": PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 5,
        }

    container = pods.container(
        "playground",
        run_cfg.platform.playground_image,
        placement,
        command=["kubellm"],
        args=args,
        # Gradio writes uploads and its cache under GRADIO_TEMP_DIR: the /tmp emptyDir on a read-only root.
        env={"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": "/tmp/gradio", "HF_HUB_OFFLINE": "1"},
        ports=[{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
    )
    if cfg.auth_secret:
        container["env"] += [
            {"name": env, "valueFrom": {"secretKeyRef": {"name": cfg.auth_secret, "key": key}}}
            for env, key in ((USERNAME_ENV, "username"), (PASSWORD_ENV, "password"))
        ]
    # Gradio imports in ~10 s on a small CPU share: 12 × 5 s before the first liveness check counts.
    container["startupProbe"] = probe(5, 12)
    container["readinessProbe"] = probe(10, 3)
    container["livenessProbe"] = probe(30, 3)

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": cfg.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": pods.pod_metadata(placement, labels),
                "spec": pods.pod_spec([container], placement, run_cfg.platform),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def apply_playground(objects: list[dict], *, namespace: str, api_client: Any = None) -> list[str]:
    """Create or patch the playground's Deployment and Service; returns what happened to each
    (``created``, ``patched`` or ``unchanged``: an object that already holds the spec is not patched)."""
    from kubernetes import client

    from kubellm.k8s.client import api_errors, load_api_client
    from kubellm.k8s.rollout import spec_contains

    api_client = api_client or load_api_client()
    apis = {"Deployment": client.AppsV1Api(api_client), "Service": client.CoreV1Api(api_client)}
    verbs = {"Deployment": "namespaced_deployment", "Service": "namespaced_service"}
    outcome = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        api, verb = apis[kind], verbs[kind]
        where = f"{kind} {namespace}/{name}"
        with api_errors(f"apply {where}"):
            try:
                # Raw JSON rather than the typed model: compared key by key with our camelCase dicts.
                live = json.loads(getattr(api, f"read_{verb}")(name, namespace, _preload_content=False).data)
            except client.ApiException as err:
                if err.status != 404:
                    raise
                getattr(api, f"create_{verb}")(namespace, obj)
                outcome.append("created")
                continue
            if spec_contains(live.get("spec"), obj["spec"]) and spec_contains(
                live.get("metadata"), {"labels": obj["metadata"]["labels"]}
            ):
                outcome.append("unchanged")
                continue
            getattr(api, f"patch_{verb}")(
                name, namespace, {"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]}
            )
            outcome.append("patched")
    return outcome
