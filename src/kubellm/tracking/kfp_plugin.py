"""The MLflow run a step was handed: KFP's MLflow plugin, or any caller that sets MLflow's own variables.

KFP 2.17's MLflow plugin (KEP-12862), when an operator enables it, opens one MLflow parent run per KFP
run and a nested run per task, and gives each task container ``MLFLOW_TRACKING_URI``,
``MLFLOW_WORKSPACE``, ``MLFLOW_EXPERIMENT_ID``, ``MLFLOW_RUN_ID`` (the task's nested run) and
``MLFLOW_TRACKING_AUTH``; its launcher ends the task's run when the container exits and its API server
closes the parent (and any run left open) when the KFP run ends, reopening them on a retry.

When ``MLFLOW_RUN_ID`` is set, kubellm obeys it as MLflow's own clients do (``mlflow.start_run()``
resumes that run): every stage logs into that run, and kubellm opens no run of its own —
:func:`~kubellm.tracking.runs.stage_run` attaches to it, the pipeline's parent run is the
handed run's parent (its ``mlflow.parentRunId`` tag; the plugin's run of the whole KFP run), where
:func:`~kubellm.tracking.runs.end_parent_run` writes the headline without ending it (the plugin
owns its status). The tracking URI is then ``$MLFLOW_TRACKING_URI`` whatever ``tracking.uri`` says: the
handed run exists nowhere else. Without ``MLFLOW_RUN_ID`` nothing here changes anything.

What the pinned MLflow (3.17.2) does with the rest, by itself, in every ``MlflowClient`` kubellm makes
(pipeline steps, training pods, ``kubellm`` commands, ``kubellm serve --model models:/…``):

- ``MLFLOW_WORKSPACE``: sent as the ``X-MLFLOW-WORKSPACE`` header on every REST request
  (``mlflow.utils.rest_utils``), which a server started with ``--enable-workspaces`` uses to keep
  teams' experiments, runs and registered models apart. A ``sqlite://`` store ignores it.
- ``MLFLOW_TRACKING_AUTH=kubernetes``: a bearer token from the pod's service account
  (``/var/run/secrets/kubernetes.io/serviceaccount/token``, re-read at most every 60 s), else from the
  kubeconfig's current context; ``kubernetes-namespaced`` adds ``X-MLFLOW-WORKSPACE`` from the pod's
  namespace (or the kubeconfig context's) unless ``MLFLOW_WORKSPACE`` names one. Both need the
  ``kubernetes`` package, which kubellm's stack has (30.1.0). Any other value names an auth plugin
  registered under the ``mlflow.request_auth_provider`` entry point.

A training job's pods are not KFP tasks: the plugin gives them nothing. The step that launches them
passes on what its own client uses (:func:`client_env`) and the run to log into
(``KUBELLM_STAGE_RUN_ID``) — but not the ``kubernetes`` auth modes: kubellm's training pods mount no
service-account token (``automountServiceAccountToken: false``, least privilege), so MLflow's Kubernetes
auth could not find one there. Under those modes the pods need MLflow credentials of their own
(``platform.stages.<stage>.secret_env``: ``MLFLOW_TRACKING_TOKEN``), or the stage trains in the step's
own pod (``platform.distributed.<stage>.engine: none``); the launching step says so in one warning line.
KServe's predictor pod makes no MLflow client on a cluster (its storage initializer fetches the model
from the deployed storage URI), so it gets none of these.
"""

from __future__ import annotations

import os

#: The variables the plugin sets on a task container, as MLflow names them.
RUN_ENV = "MLFLOW_RUN_ID"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_ID"
URI_ENV = "MLFLOW_TRACKING_URI"
WORKSPACE_ENV = "MLFLOW_WORKSPACE"
AUTH_ENV = "MLFLOW_TRACKING_AUTH"
PLUGIN_ENV = (URI_ENV, WORKSPACE_ENV, EXPERIMENT_ENV, RUN_ENV, AUTH_ENV)

#: How an MLflow client reaches the server, workspace included: what a process a step starts needs.
_CLIENT_ENV = (URI_ENV, WORKSPACE_ENV, AUTH_ENV)

#: Set on the handed parent run when kubellm's exit handler has run: the pipeline's own verdict
#: (FINISHED, FAILED, KILLED), since the run's status is the plugin's to set.
TAG_KUBELLM_STATUS = "kubellm.status"


def handed_run_id() -> str | None:
    """``$MLFLOW_RUN_ID`` when set (and not blank): the run this process must log into."""
    value = os.environ.get(RUN_ENV, "").strip()
    return value or None


def handed_experiment_id() -> str | None:
    value = os.environ.get(EXPERIMENT_ENV, "").strip()
    return value or None


def kubernetes_auth() -> bool:
    """Whether MLflow authenticates with this pod's service-account token (``kubernetes``,
    ``kubernetes-namespaced``)."""
    return os.environ.get(AUTH_ENV, "").strip().startswith("kubernetes")


def client_env() -> dict[str, str]:
    """The MLflow client settings of this process (URI, workspace, auth mode) that are set: passed to a
    training job's pods so rank 0 reaches the same server, in the same workspace. Never the run id (pods
    attach to the step's run by ``KUBELLM_STAGE_RUN_ID``), nor any credential, nor a ``kubernetes`` auth
    mode (the pods have no token for it: see the module doc)."""
    return {
        name: os.environ[name]
        for name in _CLIENT_ENV
        if os.environ.get(name, "").strip() and not (name == AUTH_ENV and kubernetes_auth())
    }
