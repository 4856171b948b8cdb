"""configs/cluster-mlflow.yaml for real: its container args, env and auth config start an MLflow
server (here on 127.0.0.1) that keeps its runs in PostgreSQL (a fresh database plays the `mlflow-db`
Secret's), wants credentials, takes the Secret's admin password and rejects foreign Host headers.
~20 s on an idle 2-core machine (MLflow migrates the new database, and every authenticated request
verifies a PBKDF2 hash)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pghelpers import fresh_database

# MLflow's migrations on a fresh PostgreSQL database: 30 s idle, 70-90 s on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

PASSWORD = "test-only-" + "x" * 12  # plays the Secret's value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manifest_starts_an_authenticated_server(repo_root: Path, tmp_path: Path) -> None:
    # The basic-auth app imports Flask-WTF, which only mlflow's `auth` extra installs.
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (Flask-WTF) is not installed")
    docs = {d["kind"]: d for d in yaml.safe_load_all((repo_root / "configs/cluster-mlflow.yaml").read_text())}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    data, etc = tmp_path / "mlflow", tmp_path / "etc"
    data.mkdir()
    etc.mkdir()
    # The pod's mounts, moved under tmp_path: /mlflow (the PVC) and /etc/mlflow (the ConfigMap).
    ini = docs["ConfigMap"]["data"]["basic_auth.ini"].replace("////mlflow/", f"///{data}/")
    (etc / "basic_auth.ini").write_text(ini)
    port = _free_port()
    args = [a.replace("/mlflow", str(data)) for a in container["args"]]
    args = [
        f"--port={port}"
        if a.startswith("--port=")
        else "--host=127.0.0.1"
        if a.startswith("--host=")
        else "--workers=1"
        if a.startswith("--workers=")
        else a
        for a in args
    ]
    with fresh_database("kubellm_manifest") as db:
        _serve(container, args, db, tmp_path, etc)


def _serve(container: dict, args: list[str], db: str, tmp_path: Path, etc: Path) -> None:
    port = int(next(a for a in args if a.startswith("--port=")).split("=")[1])
    secrets = {
        ("mlflow-auth", "username"): "admin",
        ("mlflow-auth", "password"): PASSWORD,
        ("mlflow-auth", "flask-secret-key"): "k" * 32,
        ("mlflow-db", "uri"): db,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"], ref["key"]]
        else:
            env[item["name"]] = item["value"].replace("/etc/mlflow", str(etc)).replace("/home/kubellm", str(tmp_path))
    mlflow = Path(sys.executable).parent / container["command"][0]
    proc = subprocess.Popen(
        [str(mlflow), *container["command"][1:], *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
        start_new_session=True,
    )  # its workers are children: stop the whole group
    base = f"http://127.0.0.1:{port}"
    try:
        # MLflow migrates the fresh PostgreSQL database first: ~15 s idle, 50-70 s on a 2-core machine at load 15.
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "MLflow did not answer /health within 180 s"
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=30).status_code == 401
        assert httpx.get(search, auth=("admin", "wrong"), timeout=30).status_code == 401
        assert httpx.get(search, auth=("admin", PASSWORD), timeout=30).status_code == 200
        foreign = httpx.get(search, auth=("admin", PASSWORD), headers={"Host": "evil.example.com"}, timeout=30)
        assert foreign.status_code in (400, 403)
        made = httpx.post(
            f"{base}/api/2.0/mlflow/experiments/create",
            json={"name": "in-postgres"},
            auth=("admin", PASSWORD),
            timeout=30,
        )
        assert made.status_code == 200, made.text
        assert "in-postgres" in _experiments_in(db)  # the run store is the Secret's database
        assert not list(tmp_path.rglob("mlflow.db"))  # and no sqlite file beside it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _experiments_in(db: str) -> list[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(sqlalchemy.text("SELECT name FROM experiments"))]
    finally:
        engine.dispose()
