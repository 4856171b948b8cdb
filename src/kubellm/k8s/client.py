"""Kubernetes API credentials and API errors as one-line :class:`~kubellm.errors.ClusterError`.

Inside a pod the service-account token is used (``configs/cluster-rbac.yaml`` grants it exactly what the
pipeline needs); elsewhere the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``). Everything is read when
:func:`load_api_client` is called, never at import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from kubellm.errors import ClusterError

#: Hints for API statuses a user can act on.
_STATUS_HINTS = {
    401: "the API server rejected the credentials (expired token or kubeconfig?)",
    403: "forbidden (does the service account have the Role in configs/cluster-rbac.yaml?)",
    404: "not found (is the operator that serves this resource installed?)",
    409: "already exists",
    422: "rejected by the API server's validation",
}


def load_api_client() -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster config in a pod, else the kubeconfig.

    Raises :class:`ClusterError` (one line) when neither is available.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException:
        pass  # not in a pod (no KUBERNETES_SERVICE_HOST or no token file): try the kubeconfig
    # The kubernetes package reads $KUBECONFIG once at import; read it now so a changed env counts.
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    except (config.ConfigException, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ClusterError(
            f"no Kubernetes credentials: not in a pod (no service-account token) and "
            f"no usable kubeconfig at {path} ({reason})"
        ) from None
    return client.ApiClient(cfg)


@contextlib.contextmanager
def api_errors(action: str) -> Iterator[None]:
    """Turn API and connection errors inside the block into a one-line ClusterError about ``action``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as err:
        raise ClusterError(f"{action}: HTTP {err.status} {_api_message(err)}") from None
    except HTTPError as err:
        raise ClusterError(
            f"{action}: cannot reach the Kubernetes API ({type(err).__name__}: {_first_line(err)})"
        ) from None


def get_custom_object(api: Any, coords: tuple[str, str, str, str, str], where: str) -> dict | None:
    """The custom object at ``(group, version, namespace, plural, name)`` through ``api`` (a
    ``CustomObjectsApi``), ``None`` when it does not exist; other errors as :func:`api_errors` says."""
    from kubernetes.client.exceptions import ApiException

    with api_errors(f"get {where}"):
        try:
            return api.get_namespaced_custom_object(*coords)
        except ApiException as err:
            if err.status == 404:
                return None
            raise


def _api_message(err: Any) -> str:
    import json

    message = ""
    with contextlib.suppress(ValueError, TypeError):
        message = json.loads(err.body or "{}").get("message", "")
    hint = _STATUS_HINTS.get(err.status, err.reason or "")
    return f"{hint}: {_first_line(message)}" if message else hint


def _first_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
