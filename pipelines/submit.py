"""Submit and schedule pipelines on Kubeflow Pipelines through ``kfp.Client``, multi-user aware.

Most Kubeflow installations are multi-user: one profile namespace per team, Dex/OIDC in front. There the
API server rejects listing or creating experiments, runs and recurring runs without a namespace, and a
pod's projected service-account token lives about an hour (the kubelet rotates it at 80 % of its life), so
a six-hour ``--wait`` must re-read it on every request. ``kfp.Client`` and its
``ServiceAccountTokenVolumeCredentials`` do exactly that; this module adds what is ours on top:

- where to connect: ``--host`` (else ``$KF_PIPELINES_ENDPOINT``, kfp's own variable; ``$KFP_HOST`` is an
  alias), else inside a pod ``http://ml-pipeline-ui.kubeflow`` — the in-cluster address the Kubeflow docs
  give; the namespace from ``--namespace``, else the current kube context's, else the pod's own;
- credentials: an explicit token, else the projected token file (``$KF_PIPELINES_SA_TOKEN_PATH``, default
  ``/var/run/secrets/kubeflow/pipelines/token``) re-read per request, plus an optional session cookie for
  Dex/OIDC behind oauth2-proxy, and a CA bundle for a private certificate authority;
- a version per build and config (``<package>-<git>-<config hash>``), reused when it exists; two pipelines
  with the same name are an error naming both ids, never a silent pick of the first;
- recurring runs that are idempotent: an identical one is left alone, a changed one replaced, never two
  with one name — found by paging through every recurring run of the experiment (100 a page);
- ``--wait`` with a final state and the run's own error message;
- every failure one line naming the host, namespace and operation (kfp's ``ApiException`` is a
  multi-line dump of headers and body).

It lives in the pipelines layer because the library (``kubellm``) never imports kfp.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubellm.errors import ClusterError, ConfigError
from kubellm.log import get_logger

#: The in-cluster address of the Pipelines API (through the UI's proxy), as the Kubeflow docs give it.
IN_CLUSTER_HOST = "http://ml-pipeline-ui.kubeflow"
#: A pod's own namespace, mounted by Kubernetes into every pod with a service account.
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Where Kubeflow's PodDefault projects the Pipelines service-account token (kfp's default too).
SA_TOKEN_FILE = Path("/var/run/secrets/kubeflow/pipelines/token")
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
PAGE_SIZE = 100

T = TypeVar("T")
log = get_logger("submit")


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to talk to Kubeflow Pipelines (the CLI fills it from flags and env vars)."""

    host: str | None = None
    """API base URL, e.g. ``https://kubeflow.example.com/pipeline``; None: the in-cluster default."""
    namespace: str | None = None
    """Profile namespace (multi-user); None: the kube context's, else the pod's, else single-user."""
    token: str | None = None
    """Bearer token; None: the projected service-account token file when there is one."""
    cookie: str | None = None
    """``name=value`` session cookie (Dex/OIDC behind oauth2-proxy: ``oauth2_proxy_kubeflow=…``)."""
    ca_bundle: Path | None = None
    """PEM file of the certificate authority that signed the host's certificate."""


def check_cron(cron: str) -> str:
    """KFP recurring runs take 6-field cron expressions, seconds first; refuse anything else clearly."""
    fields = cron.split()
    if len(fields) == 5:
        raise ConfigError(
            f"--cron {cron!r}: KFP uses 6-field cron expressions with seconds first; "
            f"write '0 {cron}' for the same schedule"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"--cron {cron!r}: expected 6 fields (second minute hour day-of-month month "
            f"day-of-week), e.g. '0 0 3 * * *' for 03:00 every day; got {len(fields)}"
        )
    return " ".join(fields)


def version_name(package_version: str, git_revision: str | None, config_hash: str) -> str:
    """``0.1.0-3f2a9c1d-8e41b0c2a7f3``: what was built (package, source revision) and with what config."""
    return f"{package_version}-{(git_revision or 'nogit')[:8]}-{config_hash}"


def default_namespace() -> str | None:
    """The current kube context's namespace, else the pod's own (in-cluster), else None (single-user)."""
    from kubernetes.config import ConfigException, list_kube_config_contexts

    try:
        # $KUBECONFIG read now: the kubernetes client reads it once, at import
        _, active = list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
        namespace = ((active or {}).get("context") or {}).get("namespace")
        if namespace:
            return str(namespace)
    except (ConfigException, OSError):
        pass  # no kubeconfig: a pod, a CI runner
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text(encoding="utf-8").strip() or None
    return None


def resolve_host(host: str | None) -> str:
    """The given host, else the in-cluster address inside a pod; outside one there is no default."""
    if host:
        return host.rstrip("/")
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return IN_CLUSTER_HOST
    raise ConfigError(
        "no Kubeflow Pipelines host: pass --host or set KF_PIPELINES_ENDPOINT "
        f"(e.g. https://kubeflow.example.com/pipeline); inside a cluster it is {IN_CLUSTER_HOST}"
    )


def _token_file() -> Path | None:
    """The projected token file when there is one; a path named in the environment must exist."""
    named = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    if named and not Path(named).is_file():
        raise ConfigError(
            f"KF_PIPELINES_SA_TOKEN_PATH={named}: no such file (the projected "
            "service-account token; unset it or mount the token)"
        )
    path = Path(named) if named else SA_TOKEN_FILE
    return path if path.is_file() else None


def _server_message(err: Any) -> str:
    """The API server's own message from an ``ApiException`` (JSON ``message``, else the raw body)."""
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else (err.body or "")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    message = (parsed.get("message") or parsed.get("error")) if isinstance(parsed, dict) else None
    message = message or body or err.reason or ""
    return " ".join(str(message).split())[:400]


def _hint(status: int | None, message: str) -> str:
    if status in (401, 403):
        return (
            "; check the token (--token / KFP_EXISTING_TOKEN), the service-account token "
            "(KF_PIPELINES_SA_TOKEN_PATH) or the session cookie (--cookie / KFP_COOKIE)"
        )
    if "empty namespace" in message:
        return "; this is a multi-user Kubeflow: pass --namespace (your profile namespace) or set KFP_NAMESPACE"
    return ""


class Pipelines:
    """``kfp.Client`` with kubellm's rules; every call's failure is one line naming host, namespace, operation."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.host = resolve_host(endpoint.host)
        self.namespace = endpoint.namespace or default_namespace()
        if endpoint.ca_bundle is not None and not endpoint.ca_bundle.is_file():
            raise ConfigError(f"--ca-bundle {endpoint.ca_bundle}: no such file")
        auth: dict[str, Any] = {}
        if endpoint.token:
            auth["existing_token"] = endpoint.token
        elif (path := _token_file()) is not None:
            from kfp.client import ServiceAccountTokenVolumeCredentials

            auth["credentials"] = ServiceAccountTokenVolumeCredentials(str(path))  # re-read per request
        self.client = self._call(
            "connecting",
            lambda: _client_class()(
                host=self.host,
                namespace=self.namespace or "",
                cookies=endpoint.cookie,
                ssl_ca_cert=str(endpoint.ca_bundle) if endpoint.ca_bundle else None,
                **auth,
            ),
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one kfp call; its links printed to stdout go to the log, its errors become one line."""
        import kfp_server_api
        import urllib3

        where = f"Kubeflow Pipelines at {self.host} (namespace {self.namespace or 'none: single-user'})"
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
                return fn()
        except kfp_server_api.ApiException as err:
            if not err.status:  # transport failures kfp_server_api wraps itself (TLS)
                raise ClusterError(f"{where} unreachable while {what}: {' '.join(str(err.reason).split())}") from None
            message = _server_message(err)
            raise ClusterError(
                f"{where}: {what} failed (HTTP {err.status}): {message}{_hint(err.status, message)}"
            ) from None
        except urllib3.exceptions.HTTPError as err:
            raise ClusterError(f"{where} unreachable while {what}: {type(err).__name__}: {err}") from None
        except OSError as err:  # the projected token file vanished between requests
            raise ClusterError(f"{where}: {what} failed: {err}") from None
        finally:
            for line in out.getvalue().splitlines():
                log.debug("kfp: %s", line)

    # pipelines and versions ------------------------------------------------------------------------
    def find_pipeline(self, name: str) -> str | None:
        """The id of the pipeline called ``name`` in our namespace; two of them are an error, not a guess."""
        found = self._call(
            f"looking up pipeline {name}",
            lambda: self.client.list_pipelines(
                filter=_eq_filter("display_name", name), namespace=self.namespace, page_size=10
            ),
        )
        ids = [p.pipeline_id for p in found.pipelines or []]
        if len(ids) > 1:
            raise ClusterError(
                f"Kubeflow Pipelines at {self.host} (namespace {self.namespace or 'none'}) has "
                f"{len(ids)} pipelines named {name!r} ({', '.join(ids)}); kubellm cannot tell "
                "which one to add a version to: delete or rename all but one"
            )
        return ids[0] if ids else None

    def find_version(self, pipeline_id: str, version: str) -> str | None:
        found = self._call(
            f"looking up version {version}",
            lambda: self.client.list_pipeline_versions(
                pipeline_id, filter=_eq_filter("display_name", version), page_size=10
            ),
        )
        return next((v.pipeline_version_id for v in found.pipeline_versions or []), None)

    def upload(self, package: Path, pipeline: str, version: str, description: str) -> tuple[str, str]:
        """The pipeline (created in our namespace if new) and the version (uploaded unless it exists)."""
        pipeline_id = (
            self.find_pipeline(pipeline)
            or self._call(
                f"uploading pipeline {pipeline}",
                lambda: self.client.upload_pipeline(
                    str(package), pipeline_name=pipeline, description=description, namespace=self.namespace
                ),
            ).pipeline_id
        )
        version_id = (
            self.find_version(pipeline_id, version)
            or self._call(
                f"uploading version {version}",
                lambda: self.client.upload_pipeline_version(
                    str(package), version, pipeline_id=pipeline_id, description=description
                ),
            ).pipeline_version_id
        )
        return pipeline_id, version_id

    # experiments and runs ---------------------------------------------------------------------------
    def ensure_experiment(self, name: str) -> str:
        """The experiment's id in our namespace, created when missing (kfp's get-or-create)."""
        try:
            experiment = self._call(
                f"looking up or creating experiment {name}",
                lambda: self.client.create_experiment(name, namespace=self.namespace),
            )
        except ValueError as err:  # kfp: "Multiple experiments is found with name …"
            raise ClusterError(
                f"Kubeflow Pipelines at {self.host} (namespace {self.namespace or 'none'}): experiment {name!r}: {err}"
            ) from None
        return experiment.experiment_id

    def start_run(
        self,
        name: str,
        experiment_id: str,
        pipeline_id: str,
        version_id: str,
        params: dict[str, Any],
        service_account: str | None,
    ) -> str:
        run = self._call(
            f"starting run {name}",
            lambda: self.client.run_pipeline(
                experiment_id,
                name,
                params=params,
                pipeline_id=pipeline_id,
                version_id=version_id,
                service_account=service_account,
            ),
        )
        return run.run_id

    def wait(
        self, run_id: str, *, timeout_s: float, poll_s: float = 10.0, on_state: Callable[[str], None] | None = None
    ) -> tuple[str, str | None]:
        """Poll until the run ends: (final state, the run's error message if it has one)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            run = self._call(f"reading run {run_id}", lambda: self.client.get_run(run_id))
            state = run.state or "RUNTIME_STATE_UNSPECIFIED"
            if state != last and on_state is not None:
                on_state(state)
            last = state
            if state in FINAL_STATES:
                return state, (run.error.message if run.error is not None else None) or None
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"run {run_id} still {state} after {timeout_s:.0f} s (it keeps running; see {self.run_url(run_id)})"
                )
            time.sleep(poll_s)

    def run_url(self, run_id: str) -> str:
        return f"{self.host}/#/runs/details/{run_id}"

    # recurring runs ---------------------------------------------------------------------------------
    def recurring_runs(self, experiment_id: str) -> Iterator[Any]:
        """Every recurring run of the experiment, page by page (the API returns at most a page at a time)."""
        token = ""
        while True:
            page = self._call(
                "listing recurring runs",
                lambda token=token: self.client.list_recurring_runs(
                    page_token=token, page_size=PAGE_SIZE, experiment_id=experiment_id
                ),
            )
            yield from page.recurring_runs or []
            token = page.next_page_token or ""
            if not token:
                return

    def ensure_schedule(self, spec: Schedule) -> tuple[str, bool]:
        """Create the recurring run, or replace those of its name whose spec differs (the v2beta1 API has no
        update); an identical one is left alone. Returns (id, changed). Never two with the same name."""
        same_name = [r for r in self.recurring_runs(spec.experiment_id) if r.display_name == spec.name]
        if len(same_name) == 1 and spec.matches(same_name[0]):
            return same_name[0].recurring_run_id, False
        for old in same_name:
            self._call(
                f"deleting recurring run {old.recurring_run_id}",
                lambda old=old: self.client.delete_recurring_run(old.recurring_run_id),
            )
        created = self._call(
            f"creating recurring run {spec.name}",
            lambda: self.client.create_recurring_run(
                spec.experiment_id,
                spec.name,
                cron_expression=spec.cron,
                max_concurrency=1,  # a recurring fine-tune must never overlap the previous one
                no_catchup=True,  # after a pause, run once, not once per missed slot
                params=spec.params,
                pipeline_id=spec.pipeline_id,
                version_id=spec.version_id,
                enabled=True,
                service_account=spec.service_account,
            ),
        )
        return created.recurring_run_id, True


@dataclass(frozen=True)
class Schedule:
    """What a recurring run should be; compared field by field with what the server holds."""

    name: str
    cron: str
    experiment_id: str
    pipeline_id: str
    version_id: str
    params: dict[str, Any]
    service_account: str | None

    def matches(self, existing: Any) -> bool:
        ref = existing.pipeline_version_reference
        cron = existing.trigger.cron_schedule.cron if existing.trigger and existing.trigger.cron_schedule else None
        params = (existing.runtime_config.parameters if existing.runtime_config else None) or {}
        return (
            ref is not None
            and ref.pipeline_version_id == self.version_id
            and cron == self.cron
            and params == self.params
            and existing.mode in (None, "ENABLE")
            and str(existing.max_concurrency or "") == "1"
            and bool(existing.no_catchup)
            and (existing.service_account or None) == (self.service_account or None)
        )


def _eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"key": key, "operation": "EQUALS", "string_value": value}]})


def _client_class() -> type:
    """``kfp.Client`` asking for /healthz once rather than five times 5 s apart (it asks when no namespace
    is set, to learn whether the server is multi-user): an unreachable host fails in a second, not 25."""
    import kfp

    class Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
            return self._healthz_api.healthz_service_get_healthz()

    return Client
