"""Training progress into a TrainJob's ``status.trainerStatus``, against an HTTPS stand-in of the
Trainer controller's endpoint (:mod:`trainer_standin`): its CA, a rotating bearer token, the CRD's schema,
the 5 s throttle; and an endpoint that fails, hangs or refuses never fails or holds up training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from trainer_standin import TrainerStandIn

from kubellm.train.trainer_status import TrainerStatusReporter, from_env

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def _feed(reporter: TrainerStatusReporter, steps: int, every_s: float, on_step=None) -> float:
    """A loop of ``steps`` steps of ``every_s`` seconds; returns the longest time one ``update`` took."""
    slowest = 0.0
    for step in range(1, steps + 1):
        time.sleep(every_s)
        t0 = time.perf_counter()
        reporter.update(
            step,
            steps,
            (steps - step) * every_s,
            {"loss": 5.0 / step, "lr": 1e-3, "tokens_per_s": 900.0, "grad_norm": 1.0},
        )
        slowest = max(slowest, time.perf_counter() - t0)
        if on_step:
            on_step(step)
    return slowest


def _wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_reports_with_a_rotated_token_in_the_crds_schema_throttled_and_ending_at_100(tmp_path: Path) -> None:
    with TrainerStandIn(tmp_path, "token-1") as standin:
        reporter = TrainerStatusReporter(standin.url, str(standin.ca), str(standin.token_file), min_interval_s=0.5)
        rotated = []

        def rotate(step: int) -> None:
            if standin.accepted and not rotated:  # mid-run, after the first update got through
                standin.rotate("token-2")
                rotated.append(step)

        _feed(reporter, 40, 0.05, rotate)
        reporter.close()
        reporter.join(10)
        assert not reporter._thread.is_alive()
    assert rotated and standin.refused == [], standin.refused  # no 401 after rotation, nothing off-schema
    statuses = [s for _, s in standin.accepted]
    assert len(statuses) >= 3
    progress = [s["progressPercentage"] for s in statuses]
    assert progress == sorted(progress) and progress[-1] == 100
    assert statuses[-1]["estimatedRemainingSeconds"] == 0 < statuses[0]["estimatedRemainingSeconds"]
    assert [m["name"] for m in statuses[-1]["metrics"]] == ["loss", "lr", "tokens_per_s"]  # grad_norm not sent
    arrivals = [t for t, _ in standin.accepted]
    # the interval (0.5 s here; unthrottled, updates would come every 0.05 s); arrivals jitter under load
    assert min(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)) >= 0.3


@pytest.mark.parametrize("mode", ["500", "hang", "401", "wrong-ca"])
def test_an_endpoint_that_fails_hangs_or_refuses_never_holds_up_a_step(tmp_path: Path, mode: str) -> None:
    with TrainerStandIn(tmp_path, "good", mode={"500": "500", "hang": "hang"}.get(mode, "ok")) as standin:
        if mode == "401":
            standin.token_file.write_text("stale\n")
        ca = standin.ca
        if mode == "wrong-ca":  # a certificate the client must not trust
            from kfp_standin import self_signed_certificate

            (tmp_path / "other").mkdir()
            ca, _ = self_signed_certificate(tmp_path / "other")
        reporter = TrainerStatusReporter(standin.url, str(ca), str(standin.token_file), min_interval_s=0.2)
        slowest = _feed(reporter, 30, 0.02)
        t0 = time.perf_counter()
        reporter.close()
        closing = time.perf_counter() - t0
        reporter.join(10)  # the sender ends by itself: interval + one timeout
        assert not reporter._thread.is_alive()
    # handing over numbers never waits on the network (a request would take up to its 2 s timeout)
    assert slowest < 1.0 and closing < 1.0
    assert standin.accepted == [] and reporter.sent == 0 and reporter.failed >= 1
    if mode == "401":
        assert standin.refused and {code for code, _ in standin.refused} == {401}


def test_outside_a_trainjob_nothing_runs() -> None:
    assert from_env({}) is None


def _pretrain(tmp_path: Path, data: Path, env: dict[str, str], name: str, steps: int) -> subprocess.CompletedProcess:
    loop = {
        "max_steps": steps,
        "log_every": 2,
        "checkpoint_every": steps,
        "micro_batch_size": 2,
        "precision": "fp32",
        "eval_every": 1000,
    }
    sets = [a for k, v in loop.items() for a in ("--set", f"pretrain.loop.{k}={v}")]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(BIN / "kubellm"),
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(tmp_path / name),
            *sets,
            "--set",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # two torchrun jobs of 2 processes on two busy cores
def test_torchrun_pretrain_reports_rising_progress_to_100_and_survives_a_hung_endpoint(
    pretrain_data: Path, tmp_path: Path
) -> None:
    """`kubellm pretrain` under `torchrun --nproc_per_node 2` with the variables the Trainer controller
    injects: rank 0 alone reports, at most once per 5 s, progress rising to 100 and the ETA falling, while
    the token rotates; then the same against an endpoint that never answers: the job still finishes."""
    (tmp_path / "ok").mkdir()
    with TrainerStandIn(tmp_path / "ok", "jwt-1") as standin:
        done = threading.Event()

        def rotate() -> None:  # the kubelet rotates the token while the job runs
            _wait_until(lambda: bool(standin.accepted) or done.is_set(), "no progress update arrived", 300)
            standin.rotate("jwt-2")

        rotator = threading.Thread(target=rotate, daemon=True)
        rotator.start()
        proc = _pretrain(tmp_path, pretrain_data, standin.env(), "ok-out", 60)
        done.set()
        rotator.join(5)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert standin.refused == [], standin.refused
    statuses = [s for _, s in standin.accepted]
    assert len(statuses) >= 2, statuses
    progress = [s["progressPercentage"] for s in statuses]
    assert progress == sorted(progress) and progress[-1] == 100
    eta = [s["estimatedRemainingSeconds"] for s in statuses if "estimatedRemainingSeconds" in s]
    assert eta[-1] == 0 and eta[0] > 0
    assert {m["name"] for m in statuses[-1]["metrics"]} == {"loss", "lr", "tokens_per_s"}
    arrivals = [t for t, _ in standin.accepted]
    # the sender waits 5 s between attempts; arrivals may jitter by a TLS handshake under load
    assert all(b - a >= 4.5 for a, b in zip(arrivals, arrivals[1:], strict=False)), arrivals
    result = json.loads((tmp_path / "ok-out" / "kubellm_train.json").read_text())
    assert result["steps"] == 60

    (tmp_path / "hang").mkdir()
    with TrainerStandIn(tmp_path / "hang", "jwt", mode="hang") as hung:
        proc = _pretrain(tmp_path, pretrain_data, hung.env(), "hang-out", 20)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "trainer status not reported" in proc.stderr
    assert json.loads((tmp_path / "hang-out" / "kubellm_train.json").read_text())["steps"] == 20
