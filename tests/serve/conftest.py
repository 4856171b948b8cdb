"""Fixtures of the serving tests: run configs, a fake Kubernetes API, a tiny trained model and tokenizer.

The model fixtures build everything offline in a few seconds: a byte-level BPE tokenizer trained with
``tokenizers`` on a small text (with a chat template), the ``tiny`` Llama preset trained for a few dozen
steps on that text so greedy answers are real words (the browser test compares them on screen), saved
as safetensors, and a LoRA adapter directory on top of it made with peft.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kubellm.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]

#: Overrides exercising every placement field on the deploy and playground stages.
CLUSTER_OVERRIDES = [
    "platform.namespace=serving",
    "platform.default.resources.cpu_request='2'",
    "platform.default.resources.memory_limit=8Gi",
    "platform.default.node_selector={pool: cpu}",
    "platform.default.tolerations=[{key: dedicated, operator: Equal, value: serve, effect: NoSchedule}]",
    "platform.default.pvcs=[{claim: hf-cache, mount_path: /models}]",
    "platform.default.secret_env=[{secret: s3-creds, key: key, env: AWS_ACCESS_KEY_ID}]",
    "platform.default.secret_volumes=[{secret: hub-token, mount_path: /var/run/secrets/hub}]",
    "platform.image_pull_secrets=[regcred]",
]


def run_config(*overrides: str) -> RunConfig:
    """configs/local.yaml with the cluster overrides and ``overrides`` on top."""
    return load_config(REPO / "configs" / "local.yaml", [*CLUSTER_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def make_cfg():
    """``make_cfg(*overrides)``: configs/local.yaml with the cluster overrides and ``overrides``."""
    return run_config


def _platform_fakes() -> Any:
    # The platform tests' kmock fixture (FakeApiServer) is reused rather than copied; conftest modules
    # are not importable by name, so it is loaded from its file.
    spec = importlib.util.spec_from_file_location("kubellm_platform_fakes", REPO / "tests/platform/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_api():
    """kmock's stateful Kubernetes emulator on 127.0.0.1 (see tests/platform/conftest.py)."""
    with _platform_fakes().FakeApiServer() as server:
        yield server
