"""The local sqlite store is created once, whatever races it, and a half-migrated one is repaired or
refused in one line (issue 24).

Before: two ``kubellm run`` started together in a new folder both created the store, MLflow's schema
migrations collided (``duplicate column name: step``, ``table _alembic_tmp_latest_metrics already
exists``), both failed, and a store left half-migrated failed every later command with a 158-line
traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubellm.config.tracking import TrackingConfig
from kubellm.errors import KubellmError
from kubellm.tracking.connect import _READY_STORES, mlflow_client

# One process: create the tracker in ``workdir`` and start a parent run, as every task of `kubellm run` does.
START_RUN = textwrap.dedent("""
    import sys
    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking import start_parent_run
    print(start_parent_run(TrackingConfig(experiment="race"), sys.argv[1], pipeline="p", run_name=sys.argv[2],
                           config={}))
""")


def half_migrated(db: Path, *, leftover: bool) -> None:
    """A store as a process that died in MLflow's migration ``39d1c3be5f05`` leaves it: the schema at the
    revision before, and (``leftover``) the partial copy ``_alembic_tmp_latest_metrics`` of its batch
    operation. Without the leftover, the recorded revision is set back on a complete store instead, so
    resuming the migration fails on what is already there."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db import utils
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    uri = f"sqlite:///{db}"
    engine = sqlalchemy.create_engine(uri)
    try:
        if leftover:
            InitialBase.metadata.create_all(engine)
            config = utils._get_alembic_config(uri)
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "a8c4a736bde6")
            statement = "CREATE TABLE _alembic_tmp_latest_metrics AS SELECT * FROM latest_metrics"
        else:
            utils._initialize_tables(engine)
            statement = "UPDATE alembic_version SET version_num = 'a8c4a736bde6'"
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


def _fresh(uri: str) -> None:
    _READY_STORES.discard(uri)  # this process saw the store before the test damaged it


@pytest.mark.slow
@pytest.mark.serial
def test_processes_creating_the_store_together_all_succeed(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_RUN, str(tmp_path), f"run-{i}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, [err[-2000:] for _, err in outs]
    run_ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(run_ids) == 3  # three distinct runs in one store
    # and the store keeps working: a fourth, later, in this process
    client, uri = mlflow_client(TrackingConfig(experiment="race"), tmp_path)
    found = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert {r.info.run_id for r in found} == run_ids
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow.db")) == [
        "mlflow.db",
        "mlflow.db.lock",
    ]


def test_a_half_migrated_store_is_repaired_with_a_copy_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "mlflow.db"
    half_migrated(db, leftover=True)
    from mlflow import MlflowClient

    with pytest.raises(Exception, match="_alembic_tmp_latest_metrics already exists"):
        MlflowClient(f"sqlite:///{shutil.copy(db, tmp_path / 'plain.db')}").search_experiments()  # MLflow alone
    _fresh(f"sqlite:///{db}")
    client, _ = mlflow_client(TrackingConfig(uri=f"sqlite:///{db}"), tmp_path)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    (backup,) = tmp_path.glob("mlflow.db.before-repair-*")
    assert "finished the MLflow schema migration an earlier process left half done" in caplog.text
    assert str(backup) in caplog.text


def test_a_store_that_cannot_be_repaired_is_refused_in_one_line_and_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "mlflow.db"
    half_migrated(db, leftover=False)
    before = db.read_bytes()
    _fresh(f"sqlite:///{db}")
    from kubellm.cli import main

    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_:
        main(["promote", "--version", "1", "--set", f"workdir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith(
        f"error: {db}: the MLflow store was left half-migrated by an earlier process and could not be repaired ("
    )
    assert err[0].endswith(
        f"it is unchanged: move it aside (mv {db} {db}.broken) to start a new store here, or "
        f"repair it with `mlflow db upgrade sqlite:///{db}`"
    )
    assert db.read_bytes() == before and not list(tmp_path.glob("mlflow.db.before-repair-*"))
    _fresh(f"sqlite:///{db}")
    with pytest.raises(KubellmError, match="could not be repaired"):  # every try says the same
        mlflow_client(TrackingConfig(uri=f"sqlite:///{db}"), tmp_path)
