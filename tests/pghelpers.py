"""PostgreSQL for the tests that run MLflow on the database production uses: the machine's server on
127.0.0.1:5432 (trust auth), started by the project's ``.ci/postgres.sh`` when it does not answer, and
a fresh database per test run, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST, PORT = "127.0.0.1", 5432
USER = os.environ.get("KUBELLM_TEST_PGUSER", "postgres")  # a superuser every Debian cluster has
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"


def _connect(dbname: str = "postgres") -> object:
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=PORT, user=USER, dbname=dbname, connect_timeout=3)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


def _answers() -> bool:
    import psycopg2

    try:
        _connect().close()
    except psycopg2.OperationalError:
        return False
    return True


def ensure_server() -> None:
    """A PostgreSQL server answers on 127.0.0.1:5432, or the test fails saying why (never skips)."""
    if _answers():
        return
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0 or not _answers():
        pytest.fail(
            f"PostgreSQL does not answer on {HOST}:{PORT} and {SCRIPT.name} could not start it: "
            f"{(out.stderr or out.stdout).strip()[-1000:]}"
        )


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, empty database (unique name), its SQLAlchemy URI yielded; dropped afterwards even while
    a server still holds connections to it."""
    from psycopg2 import sql

    ensure_server()
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    conn = _connect()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # The driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, the images ship psycopg2.
        yield f"postgresql+psycopg2://{USER}@{HOST}:{PORT}/{name}"
    finally:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.close()  # type: ignore[attr-defined]
