"""A small client for the Kubeflow Pipelines v2beta1 REST API: submit runs and keep recurring runs.

Plain httpx rather than ``kfp.Client`` so the library never imports kfp, and so every failure is one
line: an unreachable host, a rejected token or a refused request becomes a :class:`ClusterError`
naming the host and what was being done. Payload shapes follow ``kfp_server_api``'s v2beta1 models
(the tests check every payload against them).

Credentials, in order: an explicit token, ``$KFP_TOKEN``, the Kubeflow Pipelines service-account token
projected into pods (``$KF_PIPELINES_SA_TOKEN_PATH``, default
``/var/run/secrets/kubeflow/pipelines/token``), else none (a cluster without auth).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.errors import ClusterError, ConfigError

API = "/apis/v2beta1"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"}


def check_cron(cron: str) -> str:
    """KFP recurring runs take 6-field cron expressions, seconds first; refuse anything else clearly."""
    fields = cron.split()
    if len(fields) == 5:
        raise ConfigError(f"--cron {cron!r}: KFP uses 6-field cron expressions with seconds first; "
                          f"write '0 {cron}' for the same schedule")
    if len(fields) != 6:
        raise ConfigError(f"--cron {cron!r}: expected 6 fields (second minute hour day-of-month month "
                          f"day-of-week), e.g. '0 0 3 * * *' for 03:00 every day; got {len(fields)}")
    return " ".join(fields)


def _token(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("KFP_TOKEN"):
        return os.environ["KFP_TOKEN"]
    path = Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", SA_TOKEN_PATH))
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return None


def _eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"key": key, "operation": "EQUALS", "string_value": value}]})


class KfpClient:
    """The few KFP v2beta1 calls kubellm needs."""

    def __init__(self, host: str | None = None, token: str | None = None, *, timeout_s: float = 30.0,
                 transport: Any = None) -> None:
        import httpx

        host = host or os.environ.get("KFP_HOST")
        if not host:
            raise ConfigError("no Kubeflow Pipelines host: pass --host or set KFP_HOST "
                              "(e.g. https://kubeflow.example.com/pipeline)")
        self.host = host.rstrip("/")
        headers = {"Accept": "application/json"}
        tok = _token(token)
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        self._http = httpx.Client(base_url=self.host, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KfpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        try:
            resp = self._http.request(method, API + path, **kwargs)
        except httpx.HTTPError as err:
            raise ClusterError(f"Kubeflow Pipelines at {self.host} unreachable while {what}: "
                               f"{type(err).__name__}: {err}") from None
        if resp.status_code in (401, 403):
            raise ClusterError(f"Kubeflow Pipelines at {self.host} rejected the credentials while {what} "
                               f"(HTTP {resp.status_code}); check KFP_TOKEN or the service-account token")
        if resp.status_code >= 400:
            try:
                body = resp.json()
                message = body.get("message") or body.get("error") or json.dumps(body)
            except ValueError:
                message = resp.text
            raise ClusterError(f"Kubeflow Pipelines at {self.host}: {what} failed (HTTP {resp.status_code}): "
                               f"{' '.join(str(message).split())[:300]}")
        return resp.json() if resp.content else {}

    # pipelines ----------------------------------------------------------------------------------
    def find_pipeline(self, name: str) -> str | None:
        found = self._call(f"looking up pipeline {name}", "GET", "/pipelines",
                           params={"filter": _eq_filter("display_name", name), "page_size": 2})
        items = found.get("pipelines") or []
        return items[0]["pipeline_id"] if items else None

    def find_version(self, pipeline_id: str, version: str) -> str | None:
        found = self._call(f"looking up version {version}", "GET", f"/pipelines/{pipeline_id}/versions",
                           params={"filter": _eq_filter("display_name", version), "page_size": 2})
        items = found.get("pipeline_versions") or []
        return items[0]["pipeline_version_id"] if items else None

    def upload_pipeline(self, package: Path, name: str, description: str) -> str:
        with package.open("rb") as f:
            body = self._call(f"uploading pipeline {name}", "POST", "/pipelines/upload",
                              params={"name": name, "display_name": name, "description": description},
                              files={"uploadfile": (package.name, f, "application/x-yaml")})
        return body["pipeline_id"]

    def upload_version(self, pipeline_id: str, package: Path, version: str, description: str) -> str:
        with package.open("rb") as f:
            body = self._call(f"uploading version {version}", "POST", "/pipelines/upload_version",
                              params={"pipelineid": pipeline_id, "name": version, "display_name": version,
                                      "description": description},
                              files={"uploadfile": (package.name, f, "application/x-yaml")})
        return body["pipeline_version_id"]

    # experiments ---------------------------------------------------------------------------------
    def ensure_experiment(self, name: str, namespace: str | None = None) -> str:
        params: dict[str, Any] = {"filter": _eq_filter("display_name", name), "page_size": 2}
        if namespace:
            params["namespace"] = namespace
        found = self._call(f"looking up experiment {name}", "GET", "/experiments", params=params)
        items = found.get("experiments") or []
        if items:
            return items[0]["experiment_id"]
        body: dict[str, Any] = {"display_name": name}
        if namespace:
            body["namespace"] = namespace
        return self._call(f"creating experiment {name}", "POST", "/experiments", json=body)["experiment_id"]

    # runs --------------------------------------------------------------------------------------------
    def create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"starting run {body.get('display_name')}", "POST", "/runs", json=body)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._call(f"reading run {run_id}", "GET", f"/runs/{run_id}")

    def wait_run(self, run_id: str, *, timeout_s: float, poll_s: float = 10.0, on_state: Any = None) -> str:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            state = self.get_run(run_id).get("state", "RUNTIME_STATE_UNSPECIFIED")
            if state != last and on_state is not None:
                on_state(state)
            last = state
            if state in FINAL_STATES:
                return state
            if time.monotonic() >= deadline:
                raise ClusterError(f"run {run_id} still {state} after {timeout_s:.0f} s (it keeps running; "
                                   f"see {self.host}/#/runs/details/{run_id})")
            time.sleep(poll_s)

    # recurring runs ----------------------------------------------------------------------------------
    def list_recurring_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        found = self._call("listing recurring runs", "GET", "/recurringruns",
                           params={"experiment_id": experiment_id, "page_size": 100})
        return found.get("recurringRuns") or found.get("recurring_runs") or []

    def create_recurring_run(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"creating recurring run {body.get('display_name')}", "POST", "/recurringruns", json=body)

    def delete_recurring_run(self, recurring_run_id: str) -> None:
        self._call(f"deleting recurring run {recurring_run_id}", "DELETE", f"/recurringruns/{recurring_run_id}")


@dataclass(frozen=True)
class Submitted:
    pipeline_id: str
    version_id: str
    version: str
    experiment_id: str
    run_id: str | None = None
    state: str | None = None
    recurring_run_id: str | None = None
    changed: bool = True
    """For schedules: False when an identical recurring run already existed (nothing was done)."""


def version_name(package_version: str, git_revision: str | None, config_hash: str) -> str:
    """``0.1.0-3f2a9c1d-8e41b0c2a7f3``: what was built (package, source revision) and with what config."""
    return f"{package_version}-{(git_revision or 'nogit')[:8]}-{config_hash}"


def upload(client: KfpClient, package: Path, pipeline: str, version: str, description: str) -> tuple[str, str]:
    """The pipeline (created if new) and the version (uploaded unless it exists): idempotent."""
    pipeline_id = client.find_pipeline(pipeline) or client.upload_pipeline(package, pipeline, description)
    version_id = client.find_version(pipeline_id, version)
    if version_id is None:
        version_id = client.upload_version(pipeline_id, package, version, description)
    return pipeline_id, version_id


def run_body(display_name: str, experiment_id: str, pipeline_id: str, version_id: str,
             params: dict[str, Any], service_account: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "display_name": display_name,
        "experiment_id": experiment_id,
        "pipeline_version_reference": {"pipeline_id": pipeline_id, "pipeline_version_id": version_id},
        "runtime_config": {"parameters": params},
    }
    if service_account:
        body["service_account"] = service_account
    return body


def schedule_body(name: str, cron: str, experiment_id: str, pipeline_id: str, version_id: str,
                  params: dict[str, Any], service_account: str | None) -> dict[str, Any]:
    body = run_body(name, experiment_id, pipeline_id, version_id, params, service_account)
    body.update({
        "trigger": {"cron_schedule": {"cron": check_cron(cron)}},
        "max_concurrency": "1",   # a recurring fine-tune must never overlap the previous one
        "no_catchup": True,       # after a pause, run once, not once per missed slot
        "mode": "ENABLE",
    })
    return body


def _same_schedule(existing: dict[str, Any], body: dict[str, Any]) -> bool:
    ref = existing.get("pipeline_version_reference") or {}
    cron = ((existing.get("trigger") or {}).get("cron_schedule") or {}).get("cron")
    params = (existing.get("runtime_config") or {}).get("parameters") or {}
    return (ref.get("pipeline_version_id") == body["pipeline_version_reference"]["pipeline_version_id"]
            and cron == body["trigger"]["cron_schedule"]["cron"]
            and params == body["runtime_config"]["parameters"]
            and existing.get("mode", "ENABLE") == "ENABLE")


def ensure_schedule(client: KfpClient, body: dict[str, Any], experiment_id: str) -> tuple[str, bool]:
    """Create the recurring run, or replace one of the same name whose spec differs (the v2beta1 API has
    no update); an identical one is left alone. Never two with the same name."""
    same_name = [r for r in client.list_recurring_runs(experiment_id) if r.get("display_name") == body["display_name"]]
    if len(same_name) == 1 and _same_schedule(same_name[0], body):
        return same_name[0]["recurring_run_id"], False
    for old in same_name:
        client.delete_recurring_run(old["recurring_run_id"])
    return client.create_recurring_run(body)["recurring_run_id"], True
