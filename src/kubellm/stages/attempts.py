"""A step that failed on its input is not retried: the retried attempt fails at once, saying why.

KFP's retry policy (``set_retry``) has no error classes: a step that fails because a setting or a record
is wrong is run again, backoff and model loading included, and fails the same way minutes later. KFP
runs a retried attempt with the same inputs in the same run, so kubellm keeps the decision itself: when
a stage of a pipeline task (one with a KFP run id, :data:`~kubellm.stages.base.KFP_RUN_ENV`) fails with
an error only a changed input fixes (:data:`UNFIXABLE`), :func:`record` keeps its one-line message,
keyed by the KFP run id and the stage's name (unique within a run), in two places:

- a file under the working directory, ``failed-steps/<kfp run id>/<stage>.json`` (every local task
  shares it; on a cluster, pods that mount the same working directory do);
- a tag of the pipeline's MLflow parent run, ``kubellm.unfixable.<stage>`` (what pods with separate disks
  share).

:func:`check`, called by :meth:`StageContext.stage <kubellm.stages.base.StageContext.stage>` before the
stage opens its MLflow run or loads anything, finds that record and raises the same error class with the
same message and why it is not tried again. Transient errors (a connection, the cluster, storage) are
not recorded: those are what the retry policy is for. A new run (``kubellm run --resume``, a new KFP
run) has a new run id, so the fixed input is tried.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kubellm import errors
from kubellm.log import get_logger

if TYPE_CHECKING:
    from kubellm.stages.base import StageContext

log = get_logger("stages")

#: Errors a retry with the same input meets again: a bad setting, malformed data.
UNFIXABLE: tuple[type[errors.KubellmError], ...] = (errors.ConfigError, errors.DataError)

#: The parent run's tag prefix holding a stage's unfixable error (``<class>: <message>``).
TAG_PREFIX = "kubellm.unfixable."

NOT_RETRIED = (
    "not retried: an earlier attempt of step {stage!r} in this run failed with this error, "
    "and a retry gets the same input; change it and run again"
)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _marker(ctx: StageContext, stage: str) -> Path:
    return Path(ctx.workdir) / "failed-steps" / _safe(ctx.kfp_run_id or "") / f"{_safe(stage)}.json"


def record(ctx: StageContext, stage: str, err: BaseException) -> None:
    """Keep ``err`` for the retried attempts of ``stage`` in this KFP run, when it is :data:`UNFIXABLE`.
    Best effort: a record that cannot be written leaves the retry policy as it is (one warning line)."""
    if not ctx.kfp_run_id or not isinstance(err, UNFIXABLE):
        return
    doc = {"error": type(err).__name__, "message": str(err)}
    try:
        path = _marker(ctx, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc), encoding="utf-8")
    except OSError as write_err:
        log.warning("step %s: could not keep its error for a retry to fail fast (%s)", stage, write_err)
    if ctx.tracking.enabled and ctx.parent_run_id:
        try:
            from kubellm.tracking.connect import mlflow_client

            client, _ = mlflow_client(ctx.tracking, ctx.workdir)
            client.set_tag(ctx.parent_run_id, TAG_PREFIX + stage, f"{doc['error']}: {doc['message']}"[:5000])
        except Exception as tag_err:  # the stage's own error is what the user must see
            log.warning("step %s: could not tag parent run %s with its error (%s)", stage, ctx.parent_run_id, tag_err)


def _recorded(ctx: StageContext, stage: str) -> tuple[str, str] | None:
    path = _marker(ctx, stage)
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return str(doc["error"]), str(doc["message"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if ctx.tracking.enabled and ctx.parent_run_id:
        from kubellm.tracking.connect import mlflow_client

        client, _ = mlflow_client(ctx.tracking, ctx.workdir)
        try:
            value = client.get_run(ctx.parent_run_id).data.tags.get(TAG_PREFIX + stage)
        except Exception:  # no record readable: the attempt runs, as without this module
            return None
        if value and ": " in value:
            name, message = value.split(": ", 1)
            return name, message
    return None


def check(ctx: StageContext, stage: str) -> None:
    """Raise the recorded error of an earlier attempt of ``stage`` in this KFP run, if there is one."""
    if not ctx.kfp_run_id:
        return
    found = _recorded(ctx, stage)
    if found is None:
        return
    name, message = found
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, UNFIXABLE)):
        cls = errors.ConfigError
    raise cls(f"{message} ({NOT_RETRIED.format(stage=stage)})")
