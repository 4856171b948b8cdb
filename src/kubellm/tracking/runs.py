"""MLflow runs' lifecycle: one *parent* run per lifecycle run and one nested *stage* run per step.

One parent run per lifecycle run (a KFP pipeline run, or one ``kubellm run``) and one nested stage run per
step. Every run carries the tags ``pipeline``, ``kfp_run_id`` (when there is one), ``config_hash`` and
``git_revision``; stage runs carry ``stage`` too, so the MLflow UI can filter them. A run the server never
heard end is closed (``KILLED``) by the next run of the same stage on the same host once its process is gone.

Steps fail in three ways and none leaves a run stuck ``RUNNING``:

* an exception ends the stage run ``FAILED`` (with the error as the ``error`` tag);
* SIGTERM (Kubernetes stopping a pod, KFP cancelling a run) ends it ``KILLED`` before the process exits;
* SIGKILL (out of memory) cannot be caught: the retried step re-attaches to its own unfinished run
  instead of creating a duplicate, and :func:`end_parent_run` marks stragglers ``KILLED``.

Under KFP's MLflow plugin (or any caller that sets ``MLFLOW_RUN_ID``) kubellm opens no run of its own:
see :mod:`kubellm.tracking.kfp_plugin`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubellm.config.secrets import redact
from kubellm.config.tracking import TrackingConfig
from kubellm.log import get_logger
from kubellm.tracking.base import NullTracker, Tracker, TrackingError
from kubellm.tracking.connect import (
    _check_filter_value,
    _credentials_to_env,
    _experiment_id,
    _search,
    mlflow_client,
    mlflow_errors,
    unreachable,
)
from kubellm.tracking.kfp_plugin import TAG_KUBELLM_STATUS, handed_run_id
from kubellm.tracking.mlflow_tracker import MlflowTracker

log = get_logger("tracking")

# Tag names. Plain words: they are what a person types into the MLflow UI's search box.
TAG_PIPELINE = "pipeline"
TAG_KFP_RUN_ID = "kfp_run_id"
TAG_RUN_NAME = "run_name"  # the pipeline run's own name (`kubellm run`'s folder); the MLflow name tells the story
TAG_CONFIG_HASH = "config_hash"
TAG_GIT_REVISION = "git_revision"
TAG_STAGE = "stage"
TAG_RUN_KIND = "run_kind"  # "parent" | "stage"
TAG_ERROR = "error"
TAG_ATTEMPT = "attempt"  # 2, 3, … on a run a retried step re-attached to
TAG_HOST = "kubellm.host"  # where the stage's process runs, and its pid: a later run of the stage on the
TAG_PID = "kubellm.pid"  # same host closes the run of a process that is gone
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under its parent

EndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of the config's canonical JSON (equal to ``RunConfig.config_hash()`` for a
    ``RunConfig.model_dump(mode="json")``)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.cache
def git_revision() -> str | None:
    """The code's revision: ``$KUBELLM_GIT_REVISION`` (set in images, where there is no ``.git``), else
    ``git describe`` of the checkout kubellm runs from (``-dirty`` when it has local edits), else None."""
    env = os.environ.get("KUBELLM_GIT_REVISION")
    if env:
        return _credentials_to_env(env)
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def _log_config(tracker: MlflowTracker, config: Mapping[str, Any]) -> None:
    """A config as flat params and ``config.json``, redacted: every MLflow user can read both."""
    safe = redact(dict(config))
    tracker.log_params(safe)
    tracker.log_dict(safe, "config.json")


def _context_tags(config: Mapping[str, Any] | None) -> dict[str, str]:
    tags = {}
    if config:
        tags[TAG_CONFIG_HASH] = config_hash(config)
    rev = git_revision()
    if rev:
        tags[TAG_GIT_REVISION] = rev
    return tags


def start_parent_run(
    cfg: TrackingConfig,
    workdir: str | Path,
    *,
    pipeline: str,
    run_name: str,
    config: dict,
    tags: dict[str, str] | None = None,
) -> str:
    """Start the parent run of one lifecycle run and return its id.

    ``config`` (the whole run config as JSON-able data) is logged as one ``config.json`` artifact (its
    stages log their own sections as params), secret-like values masked
    (:func:`kubellm.config.secrets.redact`). Its MLflow name tells it apart in the runs list
    (:func:`~kubellm.tracking.headline.parent_run_name`; the outcome is added when it ends), ``run_name``
    (``kubellm run``'s folder, the KFP run's name) is its ``run_name`` tag.
    Idempotent per KFP run: when ``tags`` holds a ``kfp_run_id`` that already has a parent run (a
    retried or resumed KFP run), that run is set back to ``RUNNING`` and its id returned. With
    ``cfg.enabled`` false nothing is logged and the id is ``""`` (a KFP output cannot be None);
    :func:`stage_run` and :func:`end_parent_run` accept it.
    """
    if not cfg.enabled:
        return ""
    client, uri = mlflow_client(cfg, workdir)
    all_tags = {
        **_context_tags(config),
        TAG_PIPELINE: pipeline,
        TAG_RUN_NAME: run_name,
        **(tags or {}),
        TAG_RUN_KIND: "parent",
    }
    if handed_run_id():  # KFP's MLflow plugin made the parent: describe it, open nothing
        with mlflow_errors(uri, f"reading the run MLFLOW_RUN_ID={handed_run_id()} hands this step"):
            parent = _handed_parent(client)
            MlflowTracker(client, parent.info.run_id).set_tags(
                {k: v for k, v in all_tags.items() if not (k == TAG_CONFIG_HASH and not config)}
            )
            if config:
                MlflowTracker(client, parent.info.run_id).log_dict(redact(config), "config.json")
        log.info("parent run %s: the one MLFLOW_RUN_ID's run is nested under (KFP's MLflow plugin)", parent.info.run_id)
        return parent.info.run_id
    with mlflow_errors(uri, f"starting the parent run of pipeline {pipeline!r}"):
        exp = _experiment_id(client, cfg.experiment, uri)
        kfp_run_id = all_tags.get(TAG_KFP_RUN_ID)
        if kfp_run_id:
            run = _find_parent(client, exp, kfp_run_id)
            if run is not None:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                log.info("re-attached to parent run %s of KFP run %s", run.info.run_id, kfp_run_id)
                return run.info.run_id
        from kubellm.tracking.headline import parent_run_name

        run = client.create_run(exp, tags=all_tags, run_name=parent_run_name(pipeline, int(time.time() * 1000)))
        MlflowTracker(client, run.info.run_id).log_dict(redact(config), "config.json")
    log.info("parent run %s (experiment %r at %s)", run.info.run_id, cfg.experiment, uri)
    return run.info.run_id


def _handed_parent(client: Any) -> Any:
    """The parent of the run ``$MLFLOW_RUN_ID`` hands this process (the plugin's run of the whole KFP
    run), or that run itself when it has none."""
    run = client.get_run(_check_filter_value(handed_run_id() or "", "MLFLOW_RUN_ID"))
    parent_id = run.data.tags.get(PARENT_TAG)
    return client.get_run(parent_id) if parent_id else run


def _find_parent(client: Any, experiment_id: str, kfp_run_id: str) -> Any | None:
    """The parent run of KFP run ``kfp_run_id`` (the newest, should there be several), or None."""
    found = _search(
        client,
        experiment_id,
        f"tags.{TAG_KFP_RUN_ID} = '{_check_filter_value(kfp_run_id, 'kfp_run_id')}' and tags.{TAG_RUN_KIND} = 'parent'",
    )
    return found[0] if found else None


def _reattachable(client: Any, experiment_id: str, parent_run_id: str, stage: str) -> Any | None:
    """The newest unfinished child of ``parent_run_id`` for ``stage``: the run of an earlier attempt of
    this very step (failed, killed, or SIGKILLed and still marked RUNNING)."""
    runs = _search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{TAG_STAGE} = '{stage}'")
    return next((r for r in runs if r.info.status != "FINISHED"), None)


def _logged_steps(client: Any, run: Any) -> dict[str, int]:
    """The last logged step of every metric of ``run`` (one history request per metric key)."""
    return {
        key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
        for key in run.data.metrics
    }


@contextlib.contextmanager
def attached_run(cfg: TrackingConfig, workdir: str | Path, run_id: str) -> Iterator[Tracker]:
    """Log into an existing run that another process owns and ends: rank 0 of a training job logging
    into the stage run of the pipeline step that launched the job. The run's status is left alone (the
    step ends it when the job is done); steps already in its history are not logged again, so a
    restarted pod that resumes from its last checkpoint continues the same loss curve."""
    if not cfg.enabled:
        yield NullTracker()
        return
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"attaching to run {run_id}"):
        run = client.get_run(_check_filter_value(run_id, "run id"))
        steps = _logged_steps(client, run)
    log.info(
        "logging into run %s (stage %s)%s",
        run_id,
        run.data.tags.get(TAG_STAGE, "?"),
        f", continuing after step {max(steps.values())}" if steps else "",
    )
    tracker = MlflowTracker(client, run_id, logged_steps=steps, when_unreachable=cfg.when_unreachable, uri=uri)
    try:
        yield tracker
    finally:
        tracker.flush()


@dataclass
class _KillState:
    killed: bool = False


@contextlib.contextmanager
def _killed_on_sigterm(client: Any, run_id: str) -> Iterator[_KillState]:
    """While the block runs, SIGTERM first marks the run KILLED, then behaves as before: a Python
    handler installed earlier (a training loop's checkpoint-on-SIGTERM) is called; otherwise the
    process exits with status 143 by raising SystemExit, so ``finally`` blocks and atomic outputs
    still clean up. Kubernetes sends SIGTERM 30 s before SIGKILL by default: marking first means the
    status is right even if the clean-up runs out of time."""
    state = _KillState()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield state
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield state
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        state.killed = True
        with contextlib.suppress(Exception):  # never let bookkeeping stop the shutdown
            client.set_terminated(run_id, "KILLED")
        log.warning("SIGTERM: run %s marked KILLED", run_id)
        if callable(previous):
            previous(signum, frame)
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_SIGNAL_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # 130, 143


def _end_status(err: BaseException) -> EndStatus:
    """KILLED for an interruption (Ctrl-C, exit 130/143, or an error that exits 143 such as the training
    loop's checkpoint-then-stop on SIGTERM), FINISHED for a clean ``sys.exit(0)``, FAILED otherwise."""
    if isinstance(err, KeyboardInterrupt):
        return "KILLED"
    if isinstance(err, SystemExit):
        if err.code in (0, None):
            return "FINISHED"
        return "KILLED" if err.code in _SIGNAL_EXITS else "FAILED"
    return "KILLED" if getattr(err, "exit_code", None) in _SIGNAL_EXITS else "FAILED"


@contextlib.contextmanager
def stage_run(
    cfg: TrackingConfig, workdir: str | Path, *, parent_run_id: str | None, stage: str, config: dict | None = None
) -> Iterator[Tracker]:
    """Run one stage inside its own MLflow run, nested under ``parent_run_id`` when given.

    Yields the stage's :class:`Tracker`. With ``$MLFLOW_RUN_ID`` set (KFP's MLflow plugin) the stage logs
    into that run instead, re-attaching to it as below when this stage logged there before, and ends it
    the same way (as ``mlflow.start_run()`` does with that variable). A retried step re-attaches to its
    own earlier run (the newest child of the parent with the same ``stage`` tag that is not FINISHED)
    instead of creating a second one, so stage names must be unique among a parent's concurrently running
    steps. The run ends FINISHED, FAILED on an exception (re-raised), or KILLED on SIGTERM/Ctrl-C. With
    ``cfg.enabled`` false it yields a :class:`NullTracker` and logs nowhere.
    """
    if not cfg.enabled:
        yield NullTracker()
        return
    _check_filter_value(stage, "stage")
    client, uri = mlflow_client(cfg, workdir)
    handed = handed_run_id()
    with mlflow_errors(uri, f"starting stage {stage!r}"):
        if handed:  # KFP's MLflow plugin (or a caller) made this step's run: log into it, open none
            given = client.get_run(_check_filter_value(handed, "MLFLOW_RUN_ID"))
            parent_id = given.data.tags.get(PARENT_TAG)
            inherited = (
                {k: v for k, v in client.get_run(parent_id).data.tags.items() if k in (TAG_PIPELINE, TAG_KFP_RUN_ID)}
                if parent_id
                else {}
            )
            # this stage logged here before: a retried task (the plugin reopens its run) re-attaches
            run = given if given.data.tags.get(TAG_STAGE) == stage else None
            parent_run_id, exp = None, ""
        elif parent_run_id:
            parent = client.get_run(_check_filter_value(parent_run_id, "parent run id"))
            exp = parent.info.experiment_id
            inherited = {k: v for k, v in parent.data.tags.items() if k in (TAG_PIPELINE, TAG_KFP_RUN_ID)}
            run = _reattachable(client, exp, parent_run_id, stage)
        else:
            exp, inherited, run = _experiment_id(client, cfg.experiment, uri), {}, None
            _close_stale(client, exp, stage)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            attempt = int(run.data.tags.get(TAG_ATTEMPT, "1")) + 1
            client.set_tag(run_id, TAG_ATTEMPT, str(attempt))
            if TAG_ERROR in run.data.tags:  # the earlier attempt's error no longer describes this run
                client.delete_tag(run_id, TAG_ERROR)
            log.info("stage %s: attempt %d re-attached to run %s (was %s)", stage, attempt, run_id, run.info.status)
            steps = _logged_steps(client, run)
        else:
            tags = {
                **inherited,
                **_context_tags(config),
                TAG_STAGE: stage,
                TAG_RUN_KIND: "stage",
                TAG_HOST: socket.gethostname(),
                TAG_PID: str(os.getpid()),
            }
            if parent_run_id:
                tags[PARENT_TAG] = parent_run_id
            if handed:
                run_id = handed
                if given.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                MlflowTracker(client, run_id).set_tags(tags)
                steps = _logged_steps(client, given)
            else:
                run_id = client.create_run(exp, tags=tags, run_name=stage).info.run_id
                steps = {}
        tracker = MlflowTracker(client, run_id, logged_steps=steps, when_unreachable=cfg.when_unreachable, uri=uri)
        if config:
            _log_config(tracker, config)

    with _killed_on_sigterm(client, run_id) as kill:
        try:
            yield tracker
        except BaseException as err:
            if not kill.killed:
                status = _end_status(err)
                if status != "FINISHED":
                    with contextlib.suppress(Exception):
                        tracker.set_tags({TAG_ERROR: f"{type(err).__name__}: {err}"})
                _end_run(tracker, status)
            raise
        if not kill.killed:
            _end_run(tracker, "FINISHED")


def _end_run(tracker: MlflowTracker, status: EndStatus) -> None:
    """Send what waits and end the run. A server still away leaves the stage's own verdict alone (its
    outputs are complete): one line says so, and the next run of the stage closes the run."""
    try:
        if not tracker.flush() and tracker.when_unreachable == "buffer":
            raise OSError("the tracking server does not answer")
        tracker.client.set_terminated(tracker.run_id, status)
    except Exception as err:
        if tracker.when_unreachable != "buffer" or not unreachable(err):
            raise
        log.warning(
            "run %s: could not be marked %s, MLflow at %s does not answer; the next run of this stage closes it",
            tracker.run_id,
            status,
            tracker.uri or "?",
        )


def _close_stale(client: Any, experiment_id: str, stage: str) -> None:
    """Mark KILLED the runs of ``stage`` still RUNNING whose process on this host is gone: a stage that
    ended while the server was away, or was SIGKILLed, and is run again (not re-attached: commands run
    without a parent run)."""
    host = socket.gethostname()
    runs = _search(
        client,
        experiment_id,
        f"tags.{TAG_STAGE} = '{stage}' and attributes.status = 'RUNNING' "
        f"and tags.`{TAG_HOST}` = '{_check_filter_value(host, 'host')}'",
    )
    for run in runs:
        pid = run.data.tags.get(TAG_PID, "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning(
                "stage run %s (%s) was still RUNNING, its process %s is gone: marked KILLED",
                run.info.run_id,
                stage,
                pid,
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def end_parent_run(
    cfg: TrackingConfig,
    workdir: str | Path,
    run_id: str,
    status: Literal["FINISHED", "FAILED", "KILLED"],
    summary: dict | None = None,
) -> None:
    """End a parent run with ``status``, logging ``summary`` (numbers and booleans as metrics, the whole
    dict as ``summary.json``). Stage runs still marked RUNNING under it belong to processes that died
    without a word (SIGKILL, out of memory): they are marked KILLED so nothing stays RUNNING forever.
    A no-op when tracking is disabled or ``run_id`` is ``""``. Under KFP's MLflow plugin (``$MLFLOW_RUN_ID``
    set) the parent and its task runs are the plugin's to close: the headline is written and ``status``
    kept as the ``kubellm.status`` tag, and no run's status is touched."""
    if status not in _END_STATUSES:
        raise TrackingError(f"end_parent_run: status {status!r} is not one of {list(_END_STATUSES)}")
    if not cfg.enabled or not run_id:
        return
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"ending parent run {run_id}"):
        parent = client.get_run(_check_filter_value(run_id, "run id"))
        tracker = MlflowTracker(client, run_id)
        if summary:
            numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, str)}
            tracker.log_metrics(numbers)
            tracker.log_dict(summary, "summary.json")
        children = _search(client, parent.info.experiment_id, f"tags.`{PARENT_TAG}` = '{run_id}'")
        if handed_run_id():  # the plugin's parent: the headline and kubellm's verdict, its status left alone
            from kubellm.tracking.headline import write_headline

            client.set_tag(run_id, TAG_KUBELLM_STATUS, status)
            write_headline(client, parent, children, status=status, summary=summary)
            return
        for child in children:
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")
                log.warning(
                    "stage run %s (%s) was still RUNNING: marked KILLED",
                    child.info.run_id,
                    child.data.tags.get(TAG_STAGE, "?"),
                )
        from kubellm.tracking.headline import write_headline

        write_headline(client, parent, children, status=status, summary=summary)
        client.set_terminated(run_id, status)


def find_parent_run(cfg: TrackingConfig, workdir: str | Path, kfp_run_id: str) -> str | None:
    """The parent run a KFP run created (by its ``kfp_run_id`` tag); None when there is none."""
    if not cfg.enabled:
        return None
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"looking up the parent run of KFP run {kfp_run_id}"):
        run = _find_parent(client, _experiment_id(client, cfg.experiment, uri), kfp_run_id)
    return run.info.run_id if run is not None else None
