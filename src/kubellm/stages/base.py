"""What every stage shares: where it logs (:class:`StageContext`), what it returns (:class:`StageOutput`),
and how a component hands that to KFP (:func:`publish`).

A stage takes its config section either typed (the CLI, which validated the whole run config) or as the
KFP parameter dict a component receives (re-validated here with the same pydantic model), so the CLI
and the component run the same function.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from kubellm.config import TrackingConfig
from kubellm.config.params import from_param
from kubellm.fsutil import user_path
from kubellm.log import get_logger
from kubellm.tracking.base import NullTracker, Tracker
from kubellm.tracking.kfp_plugin import handed_run_id

log = get_logger("stages")

M = TypeVar("M", bound=BaseModel)

#: Set on a training job's pods: the MLflow run of the pipeline step that launched the job. Rank 0 logs
#: into it (and never ends it: the step owns it); a restarted pod logs on without repeating steps.
STAGE_RUN_ENV = "KUBELLM_STAGE_RUN_ID"

#: Set for a pipeline task: the id of the pipeline run it belongs to (on a cluster the pod's
#: ``pipeline/runid`` label, locally ``kubellm run``'s run name). A cacheable step finds its MLflow parent
#: run through it, so the parent run's id is not one of its inputs: an input that differs in every run
#: would make every cache key unique.
KFP_RUN_ENV = "KUBELLM_KFP_RUN_ID"


@dataclass
class StageOutput:
    """What a stage hands back: UI metrics, a Markdown report, named values for the next step."""

    metrics: dict[str, float] = field(default_factory=dict)
    report_md: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """Where a stage logs: the tracking config, the local working directory and the run it belongs to.

    ``parent_run_id`` nests the stage's run under a pipeline's parent run (a CLI command has none and
    gets a run of its own); ``attach_run_id`` makes the stage log into an existing run instead (a
    training job's pod logging into the run of the step that launched it).
    """

    tracking: TrackingConfig
    workdir: str
    parent_run_id: str | None = None
    attach_run_id: str | None = None
    rank: int = 0
    """The process's rank under torchrun (``RANK``): only rank 0 tracks; the others log nowhere."""
    kfp_run_id: str | None = None
    """The pipeline run a component's stage belongs to: a retried attempt of a stage that failed on its
    input fails at once (:mod:`kubellm.stages.attempts`)."""

    def __post_init__(self) -> None:
        # ``workdir: ~/kubellm`` in a config means the same folder for every command and step (on the
        # machine or pod that runs it), as ``~`` in a path flag does
        object.__setattr__(self, "workdir", str(user_path(self.workdir)))  # a frozen dataclass

    @classmethod
    def from_param(
        cls, tracking: dict[str, Any], workdir: str, parent_run_id: str | None = None, *, kfp_run_id: str | None = None
    ) -> StageContext:
        """A component's context. Without ``parent_run_id`` the parent is found by KFP run id:
        ``kfp_run_id``, else :data:`KFP_RUN_ENV` from the task's environment. That is how a cacheable
        step (prep, train, evaluate) reaches its pipeline's MLflow run without the run id in its cache
        key, and how a ``dsl.ParallelFor`` body does (KFP's local runner replaces every task-output
        parameter entering the loop with the loop item, kfp 2.17 ``create_parameter_loop_iteration_task_spec``).
        """
        cfg = from_param(TrackingConfig, tracking, "tracking config")
        kfp_run_id = kfp_run_id or os.environ.get(KFP_RUN_ENV)
        if not parent_run_id and kfp_run_id and cfg.enabled and not handed_run_id():  # the plugin's run: no search
            from kubellm.tracking.runs import find_parent_run

            parent_run_id = find_parent_run(cfg, workdir, kfp_run_id)
        return cls(cfg, workdir, parent_run_id or None, kfp_run_id=kfp_run_id or None)

    @classmethod
    def for_command(cls, tracking: TrackingConfig, workdir: str) -> StageContext:
        """A CLI command's context: a run of its own, or — inside a training job's pod, where the step
        that launched the job set :data:`STAGE_RUN_ENV` — that step's run."""
        return cls(
            tracking,
            workdir,
            attach_run_id=os.environ.get(STAGE_RUN_ENV) or None,
            rank=int(os.environ.get("RANK", "0")),
        )

    @contextlib.contextmanager
    def stage(self, name: str, config: Any = None) -> Iterator[Tracker]:
        """The stage's run: nested under the parent, attached to an existing run, or none at all.

        In a pipeline task, a retried attempt of a stage that failed on its input fails here at once,
        and such a failure is recorded for the retries (:mod:`kubellm.stages.attempts`)."""
        from kubellm.stages import attempts

        attempts.check(self, name)
        try:
            with self._stage_run(name, config) as tracker:
                yield tracker
        except attempts.UNFIXABLE as err:
            attempts.record(self, name, err)
            raise

    @contextlib.contextmanager
    def _stage_run(self, name: str, config: Any = None) -> Iterator[Tracker]:
        if not self.tracking.enabled or self.rank != 0:
            yield NullTracker()
            return
        from kubellm.tracking.runs import attached_run, stage_run

        if self.attach_run_id:
            with attached_run(self.tracking, self.workdir, self.attach_run_id) as tracker:
                yield tracker
            return
        doc = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
        with stage_run(
            self.tracking, self.workdir, parent_run_id=self.parent_run_id, stage=name, config=doc
        ) as tracker:
            yield tracker

    def run_link(self, run_id: str | None) -> str:
        """A Markdown line pointing at the MLflow run (a link when the store is an HTTP server)."""
        if not run_id or not self.tracking.enabled:
            return ""
        from kubellm.tracking.connect import resolve_tracking_uri

        uri = resolve_tracking_uri(self.tracking, self.workdir)
        if uri.startswith(("http://", "https://")):
            return f"MLflow run: [{run_id}]({uri.rstrip('/')}/#/runs/{run_id})\n"
        return f"MLflow run: `{run_id}` in `{uri}`\n"


def section(model_cls: type[M], value: M | dict[str, Any], origin: str) -> M:
    """A stage's config: as given when typed (the CLI), else re-validated from the KFP parameter."""
    return value if isinstance(value, model_cls) else from_param(model_cls, value, origin)


def numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) dict, for the UI's metrics view."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, int | float):  # bool is an int: True → 1.0
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(numeric(v, f"{key}."))
    return out


def publish(out: StageOutput, *, report: str | None = None, metrics: Any = None, artifact: Any = None) -> None:
    """Hand a stage's output to KFP: the Markdown report file, the Metrics artifact (anything with
    ``log_metric``), and the numeric metrics as metadata of the stage's main output artifact."""
    from pathlib import Path

    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(out.report_md, encoding="utf-8")
    for name, value in sorted(out.metrics.items()):
        if metrics is not None:
            metrics.log_metric(name, value)
        if artifact is not None:
            artifact.metadata[name] = value


def preemptible(func: Callable[..., Any]) -> Callable[..., Any]:
    """A training stage interrupted by SIGTERM (its checkpoint written) ends the process with the
    interruption's exit code (143, as a signal-killed process would: KFP's retry policy and the
    training operators count it as preemption) and the CLI's one ``error:`` line, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import sys

        from kubellm.train.loop import TrainingInterrupted

        try:
            return func(*args, **kwargs)
        except TrainingInterrupted as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from err

    return wrapper


def trial_stage(stage: str, trial: dict[str, Any] | None) -> str:
    """``finetune`` → ``finetune.trial-2`` inside a sweep (stage names are unique within a run)."""
    return f"{stage}.{trial['name']}" if trial else stage


def job_run_config(ctx: StageContext, platform: Any, stage: str, run_name: str, **sections: Any) -> Any:
    """The run config a step hands to the cluster job it launches (a training job, the prep RayJob).

    Under KFP's MLflow plugin (a handed run with ``$MLFLOW_TRACKING_URI``) the job's pods get that
    server through :func:`~kubellm.tracking.kfp_plugin.client_env`, not the config's ``tracking.uri``.
    Pods mount no service-account token, so a ``kubernetes`` MLflow auth mode needs credentials of their
    own: one warning line says so when the stage's placement gives none.
    """
    from kubellm.config import RunConfig
    from kubellm.tracking.kfp_plugin import URI_ENV, kubernetes_auth

    tracking = ctx.tracking
    if handed_run_id() and os.environ.get(URI_ENV):  # the handed run's server, forwarded, not tracking.uri
        tracking = tracking.model_copy(update={"uri": None})
    if (
        ctx.tracking.enabled
        and kubernetes_auth()
        and not any(
            s.env in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD") for s in platform.placement(stage).secret_env
        )
    ):
        log.warning(
            "%s job: MLFLOW_TRACKING_AUTH=%s is not passed to its pods (they mount no service-account token), "
            "so its driver or rank 0 cannot log to MLflow; give them credentials with platform.stages.%s.secret_env "
            "(MLFLOW_TRACKING_TOKEN)",
            stage,
            os.environ.get("MLFLOW_TRACKING_AUTH"),
            stage,
        )
    return RunConfig(name=run_name, workdir=ctx.workdir, tracking=tracking, platform=platform, **sections)


def job_env(tracker: Tracker) -> dict[str, str]:
    """Environment of a launched job's pods: this process's MLflow client settings and this step's run,
    which the job's driver (or rank 0) logs into (:data:`STAGE_RUN_ENV`)."""
    from kubellm.tracking.kfp_plugin import client_env

    return {**client_env(), STAGE_RUN_ENV: tracker.run_id or ""}
