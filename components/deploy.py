"""Deployment components: the KServe InferenceService rollout and the prompt playground."""

from kfp.dsl import Artifact, Markdown, Output

from kubellm.components._base import component


@component
def deploy(run_config: dict, tracking: dict, workdir: str, parent_run_id: str, model_uri: str, target: str,
           manifests: Output[Artifact], report: Output[Markdown]) -> str:
    """Roll out a registered model version and, when it is healthy, make it the ``champion``.

    On a cluster: create or patch the InferenceService (canary traffic first), wait until Ready,
    smoke-test it, then promote the canary to 100 % or roll back to the previous revision. Locally:
    write and check the same manifests and smoke-test the model in-process.

    Args:
        run_config: The run config (deploy, serve and platform sections are used).
        tracking: The tracking section.
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        model_uri: The registered version (``models:/name/version``).
        target: ``cluster`` or ``local``.
        manifests: The InferenceService manifest that was applied.
        report: Status, endpoint and aliases.

    Returns:
        The endpoint URL of the OpenAI-compatible API.
    """
    from kubellm import stages

    trk = stages.Tracking.from_param(tracking, workdir, parent_run_id)
    out = stages.deploy(run_config, model_uri, manifests.path, trk, target=target)
    stages.publish(out, report=report.path)
    return out.values["endpoint"]


@component
def deploy_playground(run_config: dict, tracking: dict, workdir: str, parent_run_id: str, endpoint: str,
                      target: str, manifests: Output[Artifact], report: Output[Markdown]) -> None:
    """Deploy the prompt playground (a Gradio app) in front of the model's endpoint.

    Args:
        run_config: The run config (playground and platform sections are used).
        tracking: The tracking section.
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        endpoint: The OpenAI-compatible endpoint the playground talks to.
        target: ``cluster`` (apply the Deployment + Service) or ``local`` (write them).
        manifests: The Deployment and Service.
        report: Where the playground is.
    """
    from kubellm import stages

    trk = stages.Tracking.from_param(tracking, workdir, parent_run_id)
    out = stages.deploy_playground(run_config, endpoint, manifests.path, trk, target=target)
    stages.publish(out, report=report.path)
