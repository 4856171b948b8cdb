"""MLflow behind the :class:`~kubellm.tracking.base.Tracker` interface.

One *parent* run per lifecycle run (a KFP pipeline run, or one ``kubellm run``) and one nested *stage*
run per step. Every run carries the tags ``pipeline``, ``kfp_run_id`` (when there is one),
``config_hash`` and ``git_revision``; stage runs carry ``stage`` too, so the MLflow UI can filter them.

Tracking cannot stall training (``tracking.when_unreachable``). Each call to a server is bounded:
unless the environment says otherwise, MLflow's HTTP client gets 10 s per request and 2 retries
(``MLFLOW_HTTP_REQUEST_TIMEOUT``/``MAX_RETRIES``; its defaults of 120 s and 7 retries with exponential
backoff kept a training loop silent for ~10 minutes when the server died). While the server is away,
:class:`MlflowTracker` buffers metrics and tries again at most every ``_RETRY_S`` seconds, so a step
pays for one bounded call at most that often; the points go out once the server answers. A run the
server never heard end is closed (``KILLED``) by the next run of the same stage on the same host once
its process is gone.

Steps fail in three ways and none leaves a run stuck ``RUNNING``:

* an exception ends the stage run ``FAILED`` (with the error as the ``error`` tag);
* SIGTERM (Kubernetes stopping a pod, KFP cancelling a run) ends it ``KILLED`` before the process exits;
* SIGKILL (out of memory) cannot be caught: the retried step re-attaches to its own unfinished run
  instead of creating a duplicate, and :func:`end_parent_run` marks stragglers ``KILLED``.

Everything goes through ``MlflowClient`` with explicit run ids (never mlflow's global "active run"),
so nesting is explicit and a component may hold several runs at once. mlflow is imported inside the
functions: importing this module costs nothing and opens no connection.

A local sqlite store is created (or migrated) once, under an inter-process lock beside it
(:func:`prepare_sqlite_store`): MLflow's tracking and registry stores each create the tables of an empty
database without one, so two ``kubellm run`` started together in a new folder collided in the schema
migration (``duplicate column name: step``, ``table _alembic_tmp_latest_metrics already exists``), both
failed, and a store left half-migrated broke every later command there. A half-migrated store is
repaired under the same lock (leftover ``_alembic_tmp_*`` copies dropped, the migration resumed, on a
backup copy kept beside it) or, when that fails, put back as it was and refused in one line that says
how to recover.

Under KFP's MLflow plugin (or any caller that sets ``MLFLOW_RUN_ID``) kubellm opens no run of its own:
see :mod:`kubellm.tracking.kfp_plugin`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from kubellm.config.secrets import redact
from kubellm.config.tracking import TrackingConfig
from kubellm.log import get_logger
from kubellm.tracking.base import NullTracker, Tracker, TrackingError, flatten_params
from kubellm.tracking.kfp_plugin import TAG_KUBELLM_STATUS, URI_ENV, handed_run_id

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

# MLflow's batch limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per log_batch call.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_TAG_VALUE = 5000  # MLflow allows 8000; error messages beyond 5000 characters help nobody

EndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")


_WARNED_URIS: set[str] = set()  # tracking.uri values said once to be overridden by a handed run's server


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """Where runs go: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in ``workdir``;
    ``$MLFLOW_TRACKING_URI`` first when ``$MLFLOW_RUN_ID`` hands this process a run (it lives there).

    The sqlite default is ``sqlite:///<absolute workdir>/mlflow.db`` (the directory is created), the
    file ``make mlflow-ui`` opens. A server's credentials come from MLflow's own environment variables
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), which MLflow reads itself;
    a ``$MLFLOW_TRACKING_URI`` of ``https://user:password@host`` is turned into those first
    (:func:`_credentials_to_env`).
    """
    env = os.environ.get(URI_ENV)
    if env and handed_run_id():
        # the handed run (KFP's MLflow plugin) exists only on the server that handed it
        if cfg.uri and cfg.uri.rstrip("/") != env.rstrip("/") and cfg.uri not in _WARNED_URIS:
            _WARNED_URIS.add(cfg.uri)
            log.warning(
                "tracking.uri %s ignored: MLFLOW_RUN_ID is set, and its run lives at $MLFLOW_TRACKING_URI", cfg.uri
            )
        return _credentials_to_env(env)
    if cfg.uri:
        return cfg.uri
    if env:
        return _credentials_to_env(env)
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _credentials_to_env(uri: str) -> str:
    """``uri`` without its ``user:password@``, which go to ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (unless
    those are set) and out of ``$MLFLOW_TRACKING_URI`` itself, for this process and the ones it starts.

    MLflow builds the "View run at" lines it prints from the tracking URI, password included, and
    kubellm's own messages name the URI; both now show the host only. The config's ``tracking.uri``
    refuses user-info at validation; only the environment can still carry it.
    """
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    clean = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


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


# Per request to an MLflow server: seconds and retries (see the module doc); the environment overrides.
_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def mlflow_client(cfg: TrackingConfig, workdir: str | Path) -> tuple[Any, str]:
    """An ``MlflowClient`` for the resolved tracking URI (the registry at the same place), and the URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(cfg, workdir)
    prepare_sqlite_store(uri)
    for name, value in _HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


_READY_STORES: set[str] = set()
# A first migration takes ~2 s on an idle machine and ~10 s on two busy cores: waiting for another
# process's is normal, waiting this long is not.
_STORE_LOCK_S = 300.0


def prepare_sqlite_store(uri: str) -> None:
    """Create, or bring up to date, the sqlite store at ``uri`` once per process, holding an exclusive
    lock (``<db>.lock``) so that concurrent processes never migrate it together (see the module doc).
    Other URIs are left to MLflow."""
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(db.with_name(f"{db.name}.lock"), _STORE_LOCK_S):
        _bring_up_to_date(db, uri)
    _READY_STORES.add(uri)


@contextlib.contextmanager
def _exclusive(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), waited for at most ``timeout_s``."""
    import fcntl

    with path.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"{path}: another process has held this lock for over {timeout_s:g} s; "
                        "if none is running, remove the file and rerun"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bring_up_to_date(db: Path, uri: str) -> None:
    import sqlalchemy
    from mlflow.store.db import utils

    engine = sqlalchemy.create_engine(uri)
    try:
        if utils._is_empty_database(engine):
            utils._initialize_tables(engine)
        elif not (
            utils._all_tables_exist(engine) and utils._get_schema_version(engine) == utils._get_latest_schema_revision()
        ):
            _repair(db, uri, engine)
    finally:
        engine.dispose()


def _repair(db: Path, uri: str, engine: Any) -> None:
    """Finish a migration an earlier process left half done, on the store itself with a copy kept
    beside it; put the copy back and refuse in one line when that fails."""
    import sqlalchemy
    from mlflow.store.db import utils

    backup = db.with_name(f"{db.name}.before-repair-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(db, backup)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        with engine.begin() as connection:
            # A batch migration copies a table into _alembic_tmp_<table>, then swaps them: a copy whose
            # table still exists is a partial leftover, and the migration that made it starts again.
            for leftover in sorted(
                t for t in tables if t.startswith("_alembic_tmp_") and t.removeprefix("_alembic_tmp_") in tables
            ):
                connection.execute(sqlalchemy.text(f'DROP TABLE "{leftover}"'))
        if utils._all_tables_exist(engine):
            utils._upgrade_db(engine)
        else:
            utils._initialize_tables(engine)
    except Exception as err:  # whatever the migration hit, the store goes back to how it was found
        engine.dispose()
        os.replace(backup, db)
        raise TrackingError(
            f"{db}: the MLflow store was left half-migrated by an earlier process and could not "
            f"be repaired ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); it is "
            f"unchanged: move it aside (mv {db} {db}.broken) to start a new store here, or "
            f"repair it with `mlflow db upgrade {uri}`"
        ) from None
    log.warning(
        "%s: finished the MLflow schema migration an earlier process left half done; the store as it was is kept at %s",
        db,
        backup,
    )


@contextlib.contextmanager
def mlflow_errors(uri: str, what: str) -> Iterator[None]:
    """Turn MLflow and connection errors during setup calls into one-line :class:`TrackingError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise TrackingError(f"MLflow at {uri}: {what}: {str(err.message).splitlines()[0]}") from None
    except OSError as err:  # requests' ConnectionError is an OSError
        raise TrackingError(f"MLflow at {uri}: {what}: cannot connect ({str(err).splitlines()[0]})") from None


def _check_filter_value(value: str, what: str) -> str:
    # MLflow's search filter has no escaping: refuse quotes rather than build a broken query.
    if not _SAFE_VALUE.match(value):
        raise TrackingError(f"{what} {value!r}: use letters, digits and _ . : / @ + - only (at most 200)")
    return value


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``<db dir>/mlartifacts``). MLflow's own default is ``./mlruns``
    in whatever directory the process happens to run in, which scatters artifacts across a laptop."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.resolve().parent / "mlartifacts").as_uri()


# MLflow 3's UI opens an experiment of unknown kind on its GenAI overview (traces, no runs in sight);
# kubellm's experiments are model development: they open on their runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=_sqlite_artifact_root(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:  # created meanwhile by a parallel step
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow at {uri}: experiment {name!r} is deleted; restore it in the MLflow UI "
            "or choose another tracking.experiment"
        )
    return exp.experiment_id


def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    return list(
        client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=100, order_by=["attributes.start_time DESC"]
        )
    )


# While the server is away: how often a call is tried again, and how many metric points wait for it.
_RETRY_S = 30.0
_MAX_BUFFERED = 100_000


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the tracking server did not answer (down, restarting, overloaded), rather
    than refusing the request itself."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, OSError):  # requests' ConnectionError and Timeout are OSErrors
        return True
    return isinstance(err, MlflowException) and err.error_code in (
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
        "REQUEST_LIMIT_EXCEEDED",
    )


class MlflowTracker(Tracker):
    """A :class:`Tracker` writing to one MLflow run through ``MlflowClient``.

    With ``when_unreachable="buffer"`` metrics wait in memory while the server is away (see the module
    doc); :meth:`flush` sends what waits and says in one line what could not be sent.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        logged_steps: Mapping[str, int] | None = None,
        when_unreachable: str = "fail",
        uri: str = "",
    ) -> None:
        self.client = client
        self.run_id = run_id
        # Per metric, the last step already in the run: a re-attached run (a retried step, a restarted
        # training pod) re-runs the steps since its last checkpoint, and those must not appear twice.
        self._logged_steps = dict(logged_steps or {})
        self.when_unreachable, self.uri = when_unreachable, uri
        self._waiting: list[Any] = []
        self.dropped = 0
        self._retry_at = 0.0

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as flat params. Params are immutable in MLflow: on a re-attached run a
        key already logged keeps its first value (a changed one is reported, not fatal)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {}
        for key, value in flatten_params(params).items():
            if key not in existing:
                new[key] = value
            elif existing[key] != value:
                log.warning(
                    "run %s: param %s already logged as %r; keeping it (new value %r)",
                    self.run_id,
                    key,
                    existing[key],
                    value,
                )
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and (step is None or step > self._logged_steps.get(k, -1))
        ]
        room = _MAX_BUFFERED - len(self._waiting)
        self.dropped += max(0, len(items) - room)
        self._waiting += items[: max(room, 0)]
        if time.monotonic() >= self._retry_at:
            self._send_waiting()

    def _send_waiting(self) -> bool:
        """Send the metrics that wait; False (and they keep waiting) when the server does not answer."""
        try:
            while self._waiting:
                self.client.log_batch(self.run_id, metrics=self._waiting[:_METRICS_PER_BATCH])
                del self._waiting[:_METRICS_PER_BATCH]
        except Exception as err:
            if not unreachable(err):
                raise
            if self.when_unreachable != "buffer":
                raise TrackingError(
                    f"MLflow at {self.uri or '?'} does not answer "
                    f"({(str(err).splitlines() or [type(err).__name__])[0][:200]}); the stage stops "
                    "(tracking.when_unreachable: fail)"
                ) from None
            if not self._retry_at:
                log.warning(
                    "tracking degraded: MLflow at %s does not answer (%s); training goes on, metrics wait "
                    "in memory and are sent when it is back",
                    self.uri or "?",
                    (str(err).splitlines() or [type(err).__name__])[0][:200],
                )
            self._retry_at = time.monotonic() + _RETRY_S
            return False
        if self._retry_at:
            log.warning(
                "tracking recovered: MLflow at %s answers again; the metrics that waited were sent", self.uri or "?"
            )
            self._retry_at = 0.0
        return True

    def flush(self) -> bool:
        """Send what waits, now; one warning line says how many points are lost when that fails."""
        sent = self._send_waiting()
        if not sent or self.dropped:
            log.warning(
                "run %s: %d metric points could not be sent to MLflow at %s (server away%s); they are "
                "in the stage's own files (history.jsonl)",
                self.run_id,
                len(self._waiting) + self.dropped,
                self.uri or "?",
                f", {self.dropped} beyond the buffer" if self.dropped else "",
            )
        return sent

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log_one = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._or_skip(f"artifact {path.name}", lambda: log_one(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()]

        def send() -> None:
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[i : i + _PARAMS_PER_BATCH])

        self._or_skip(f"tags {', '.join(sorted(tags))}", send)

    def _or_skip(self, what: str, call: Callable[[], Any]) -> None:
        """``call()``; while the server is away (buffer mode) ``what`` is skipped with one line instead of
        failing the stage, without a call while it is known to be away: an artifact is not kept in memory."""
        if self.when_unreachable == "buffer" and time.monotonic() < self._retry_at:
            log.warning("run %s: %s not logged, MLflow at %s does not answer", self.run_id, what, self.uri or "?")
            return
        try:
            call()
        except Exception as err:
            if self.when_unreachable != "buffer" or not unreachable(err):
                raise
            self._retry_at = time.monotonic() + _RETRY_S
            log.warning("run %s: %s not logged, MLflow at %s does not answer", self.run_id, what, self.uri or "?")


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
