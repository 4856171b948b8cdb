"""Deployment component: roll out on KServe, promote to ``champion``, open the prompt playground."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from kubellm.components._base import component


@component
def deploy(
    config: dict,
    tracking: dict,
    workdir: str,
    parent_run_id: str,
    model_uri: str,
    target: str,
    evaluation: Input[Artifact],
    data: Input[Dataset],
    manifests: Output[Artifact],
    report: Output[Markdown],
    eval_config: dict = {},
    platform: dict = {},
    run_name: str = "",
) -> str:
    """Roll out a registered model version and, when it is healthy, make it the ``champion``.

    On a cluster: create or patch the InferenceService (canary traffic first), wait until Ready,
    smoke-test it, then promote the canary to 100 % or roll back to the previous revision. Locally:
    write and check the same manifests and smoke-test the model in-process. After a healthy rollout the
    version becomes ``champion`` and, with ``deploy.playground``, the prompt playground is created in
    front of it (the same path as ``kubellm deploy``).

    Args:
        config: The deploy, serve and playground sections (``kubellm.config.run.ReleaseConfig``).
        tracking: The tracking section.
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        model_uri: The registered version (``models:/name/version``).
        target: ``cluster`` or ``local``.
        evaluation: The candidate's evaluation results (its benchmark scores).
        data: The prepared instruction data the evaluation used (the benchmarks' local tasks).
        manifests: The InferenceService (and playground) manifests.
        report: Status, endpoint and aliases.
        eval_config: The ``evaluate`` section: with ``benchmarks``, the served canary is scored on them
            before promotion (``deploy.benchmark_gate``) and rolled back when it falls below its evaluation.
        platform: The ``platform`` section (namespace, images, placement), set at compile time.
        run_name: The run's name (names the InferenceService).

    Returns:
        The endpoint URL of the OpenAI-compatible API.
    """
    from kubellm.stages import StageContext, deploy, publish

    ctx = StageContext.from_param(tracking, workdir, parent_run_id)
    out = deploy.deploy(
        config,
        manifests.path,
        ctx,
        target=target,
        model_uri=model_uri,
        platform=platform or None,
        run_name=run_name or None,
        eval_config=eval_config or None,
        evaluation_dir=evaluation.path,
        data_dir=data.path,
    )
    publish(out, report=report.path)
    return out.values["endpoint"]
