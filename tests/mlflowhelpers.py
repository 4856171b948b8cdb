"""A real ``mlflow server`` on 127.0.0.1 for tests: started in its own process group, stopped by itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    backend_store_uri: str, root: Path, workers: int = 1, port: int | None = None, extra: tuple[str, ...] = ()
) -> Iterator[tuple[Any, str, Path]]:
    """Start ``mlflow server`` on 127.0.0.1 without waiting for it (proxied artifacts under ``root``).
    It forks workers: started in its own process group, the group is stopped. ``port``: a fixed one (to
    restart a server where its clients expect it); ``extra``: more ``mlflow server`` flags."""
    port = port or free_port()
    cmd = [
        str(Path(PY).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra,
    ]
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # the worker, should it outlive its parent
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        log.close()


def healthy(proc: Any, uri: str, log: Path) -> str:
    """``uri`` once the server answers ``/health``; the test fails with the server's log otherwise."""
    # sqlite: ~6–7 s on an idle 2-core machine; a fresh PostgreSQL database is migrated first (70-90 s
    # measured at load average 15-25). Allow for a busy machine.
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return uri
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not healthy after 180 s: {log.read_text()[-2000:]}")
        time.sleep(0.3)
