"""Fixtures of the platform tests: run configs with a distributed section and a fake Kubernetes API.

The fake API is kmock's ``KubernetesEmulator``: a stateful in-memory API server (create/get/patch/delete
of any resource, merge-patch semantics) on 127.0.0.1. It runs on its own event loop in a thread because
the official ``kubernetes`` client the launcher uses is synchronous. It validates nothing and runs no
controllers: the tests play the training operator by patching the job's status.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubellm.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]

#: Overrides that make configs/local.yaml a multi-node GPU config exercising every placement field.
CLUSTER_OVERRIDES = [
    "platform.distributed.pretrain.engine=pytorchjob",
    "platform.distributed.pretrain.shared_pvc=kubellm-shared",
    "platform.distributed.pretrain.nodes=2",
    "platform.distributed.pretrain.procs_per_node=4",
    "platform.distributed.finetune.engine=trainjob",
    "platform.distributed.finetune.shared_pvc=kubellm-shared",
    "platform.default.resources.gpus=4",
    "platform.default.resources.cpu_request='8'",
    "platform.default.resources.memory_limit=64Gi",
    "platform.default.resources.accelerator=nvidia-h100-80gb",
    "platform.default.node_selector={pool: gpu}",
    "platform.default.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "platform.default.pvcs=[{claim: hf-models, mount_path: /models}]",
    "platform.default.secret_env=[{secret: mlflow-auth, key: password, env: MLFLOW_TRACKING_PASSWORD}]",
    "platform.default.secret_volumes=[{secret: hub-token, mount_path: /var/run/secrets/hub}]",
    "platform.image_pull_secrets=[regcred]",
    "tracking.uri=http://mlflow.kubellm.svc:5000",
]


@pytest.fixture(scope="session")
def cluster_overrides() -> list[str]:
    return list(CLUSTER_OVERRIDES)


@pytest.fixture(scope="session")
def cluster_cfg() -> RunConfig:
    return load_config(REPO / "configs" / "local.yaml", CLUSTER_OVERRIDES)


class FakeApiServer:
    """kmock's Kubernetes emulator on 127.0.0.1 in a background thread; ``url`` for the client."""

    def __init__(self, emulator: Any = None) -> None:
        self._emulator_class = emulator  # a kmock.KubernetesEmulator subclass (stricter fakes); None: kmock's
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""
        self.emulator: Any = None
        self._thread = threading.Thread(target=self._run, name="fake-k8s-api", daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"fake API server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # surfaced by __enter__
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        import kmock

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with (self._emulator_class or kmock.KubernetesEmulator)() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def api_client(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)


@pytest.fixture()
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server
