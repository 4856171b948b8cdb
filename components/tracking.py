"""Open and close the MLflow parent run of a pipeline run."""

from kfp import dsl

from kubellm.components._base import component


@component
def start_run(
    run_config: dict, tracking: dict, workdir: str, pipeline_name: str, run_name: str, kfp_run_id: str
) -> str:
    """Start the MLflow parent run of this pipeline run.

    Creates one parent run in the configured experiment, tagged with the pipeline name, the KFP run id,
    the config hash and the git revision, with the whole run config as its ``config.json`` artifact
    (each stage logs its own section as params). A retried task
    re-attaches to the run it created instead of making a second one.

    Args:
        run_config: The validated run config (``kubellm.config.params`` encoding).
        tracking: The tracking section (MLflow URI, experiment, registered model name).
        workdir: Local working directory (the sqlite store lives there when no URI is set).
        pipeline_name: Name of the pipeline, stored as a tag.
        run_name: Human-readable run name shown in MLflow.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``).

    Returns:
        The MLflow parent run id that every stage nests its own run under.
    """
    from kubellm.stages import tracking as stage

    return stage.start_run(
        run_config, tracking, workdir, pipeline=pipeline_name, run_name=run_name, kfp_run_id=kfp_run_id
    )


@component
def finish_run(
    tracking: dict,
    workdir: str,
    pipeline_name: str,
    run_name: str,
    kfp_run_id: str,
    status: dsl.PipelineTaskFinalStatus,
) -> str:
    """Record the pipeline's final state on its MLflow parent run (runs as the exit handler).

    Marks the parent run FINISHED when every task succeeded, FAILED when one failed and KILLED when the
    run was cancelled, so no run is left RUNNING.

    Args:
        tracking: The tracking section.
        workdir: Local working directory.
        pipeline_name: Name of the pipeline.
        run_name: Human-readable run name.
        kfp_run_id: The KFP run id; finds the parent run this pipeline run created.
        status: The final status KFP hands to exit handlers.

    Returns:
        The MLflow status the parent run ended with.
    """
    from kubellm.stages import tracking as stage

    return stage.finish_run(
        tracking,
        workdir,
        pipeline=pipeline_name,
        run_name=run_name,
        kfp_run_id=kfp_run_id,
        state=status.state,
        error=status.error_message,
    )
