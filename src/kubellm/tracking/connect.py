"""Connecting to MLflow: where runs go, a bounded client, the local sqlite store, MLflow's errors in one line.

:func:`resolve_tracking_uri` decides where runs go (``tracking.uri``, ``$MLFLOW_TRACKING_URI``, or a
sqlite store in the working directory; a handed run's server first). :func:`mlflow_client` gives an
``MlflowClient`` whose every call to a server is bounded: unless the environment says otherwise, 10 s per
request and 2 retries (``MLFLOW_HTTP_REQUEST_TIMEOUT``/``MAX_RETRIES``; MLflow's defaults of 120 s and 7
retries with exponential backoff kept a training loop silent for ~10 minutes when the server died).

A local sqlite store is created (or migrated) once, under an inter-process lock beside it
(:func:`prepare_sqlite_store`): MLflow's tracking and registry stores each create the tables of an empty
database without one, so two ``kubellm run`` started together in a new folder collided in the schema
migration (``duplicate column name: step``, ``table _alembic_tmp_latest_metrics already exists``), both
failed, and a store left half-migrated broke every later command there. A half-migrated store is
repaired under the same lock (leftover ``_alembic_tmp_*`` copies dropped, the migration resumed, on a
backup copy kept beside it) or, when that fails, put back as it was and refused in one line that says
how to recover. mlflow is imported inside the functions: importing this module opens no connection.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from kubellm.config.tracking import TrackingConfig
from kubellm.log import get_logger
from kubellm.tracking.base import TrackingError
from kubellm.tracking.kfp_plugin import URI_ENV, handed_run_id

log = get_logger("tracking")

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
