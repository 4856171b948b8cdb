"""A real local Ray cluster for tests: bounded CPUs, 127.0.0.1, no dashboard, session files in a temporary
directory, removed afterwards.

Token authentication (Ray 2.60's default for a new local cluster) is turned off for this loopback-only,
test-lived cluster: it would write a token to ~/.ray/auth_token, and a token given in the environment
after ray was imported is not picked up by the driver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[Any]:
    """``ray``, initialised on a local cluster of ``num_cpus`` CPUs for the block (skips without Ray)."""
    ray = pytest.importorskip("ray", reason="the kubellm[ray] extra is not installed")
    temp = tempfile.mkdtemp(prefix="kray-")  # short: Ray's socket paths must stay under 107 characters
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            log_to_driver=False,
            configure_logging=False,
        )
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)
