"""Training progress into a TrainJob's ``status.trainerStatus`` (Kubeflow Trainer v2.2+).

When the controller's ``TrainJobStatus`` feature gate is on, it injects into the trainer pods
``KUBEFLOW_TRAINER_SERVER_URL`` (an HTTPS endpoint), ``KUBEFLOW_TRAINER_SERVER_CA_CERT`` (the CA file
that signed it) and ``KUBEFLOW_TRAINER_SERVER_TOKEN`` (a projected service-account token file, rotated
by the kubelet). A POST of ``{"trainerStatus": {"progressPercentage", "estimatedRemainingSeconds",
"metrics": [{"name", "value"}], "lastUpdatedTime"}}`` with the token as bearer, at most every 5 s, is
what ``kubectl get trainjob X -o jsonpath='{.status.trainerStatus}'`` and the Kubeflow SDK then show.
Rank 0 of :mod:`kubellm.train.loop` reports progress %, the ETA, loss, learning rate and tokens/s.

Our own sender rather than the Kubeflow SDK's ``kubeflow.trainer.update_trainjob_status`` (kubeflow
0.5.0 does install beside the pinned stack: ``pip install --dry-run kubeflow==0.5.0 torch==2.13.0``
adds only ``kubeflow``, ``kubeflow-katib-api`` and ``kubeflow-trainer-api``), because that function, as
released, does not meet what a training loop needs from it:

- it posts in the caller's thread with a 5 s timeout, so a hung endpoint stalls a step 5 s per call;
  here the loop only hands the latest numbers to a background thread (a lock and an assignment);
- it caches the token for 300 s; a rotated token file is re-read here before every request;
- it moves its 5 s throttle only on success, so an endpoint answering 500 gets a request at every call;
  here every attempt, failed or not, starts the 5 s wait;
- its throttle can swallow the final update (100 %); here the last numbers are always sent, once the
  5 s allow it, by a thread that ends by itself (at most 5 s + 2 timeouts after training ends).

Nothing here can fail or slow a step: a server that is down, hangs, answers 401 or 500, a missing CA or
token file — each is one warning line (the first time, and when it recovers) and training goes on.
Outside a TrainJob (no ``KUBEFLOW_TRAINER_SERVER_URL``) :func:`from_env` returns None and nothing runs.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubellm.log import get_logger

log = get_logger("train.status")

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"

#: The controller's contract: at most one update per this many seconds.
MIN_INTERVAL_S = 5.0
#: Seconds per request (connect + answer): a hung endpoint costs the sender thread this, never a step.
TIMEOUT_S = 2.0
#: The metrics reported, in this order (the CRD allows 256 of at most 64 characters each).
METRICS = ("loss", "lr", "tokens_per_s")


@dataclass(frozen=True)
class Snapshot:
    step: int
    total: int
    eta_s: float
    metrics: Mapping[str, float]


def payload(snap: Snapshot, now: float | None = None) -> dict[str, Any]:
    """The request body for ``snap``: the ``trainerStatus`` object as the TrainJob CRD types it
    (integer percentage 0-100, integer seconds ≥ 0, metric values as strings, RFC 3339 time)."""
    status: dict[str, Any] = {
        "progressPercentage": max(0, min(100, int(100 * snap.step / snap.total) if snap.total > 0 else 0)),
        "lastUpdatedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now)),
    }
    if snap.step >= snap.total:
        status["estimatedRemainingSeconds"] = 0
    elif math.isfinite(snap.eta_s):
        status["estimatedRemainingSeconds"] = max(0, int(round(snap.eta_s)))
    metrics = [
        {"name": k, "value": f"{float(snap.metrics[k]):.6g}"}
        for k in METRICS
        if k in snap.metrics and math.isfinite(float(snap.metrics[k]))
    ]
    if metrics:
        status["metrics"] = metrics
    return {"trainerStatus": status}


class TrainerStatusReporter:
    """Sends the latest :class:`Snapshot` from a thread of its own, at most every :data:`MIN_INTERVAL_S`."""

    def __init__(
        self,
        url: str,
        ca_file: str | None,
        token_file: str | None,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.min_interval_s, self.timeout_s = min_interval_s, timeout_s
        self.sent = self.failed = 0
        self._latest: Snapshot | None = None
        self._pending = False
        self._closing = False
        self._failing = False
        self._wake = threading.Condition()
        # not a daemon: the last update still goes out while the process finishes its outputs
        self._thread = threading.Thread(target=self._run, name="kubellm-trainer-status", daemon=False)
        self._thread.start()

    def update(self, step: int, total: int, eta_s: float, metrics: Mapping[str, Any]) -> None:
        """Hand the loop's numbers over (never blocks on the network)."""
        snap = Snapshot(
            step, total, eta_s, {k: float(v) for k, v in metrics.items() if k in METRICS and isinstance(v, int | float)}
        )
        with self._wake:
            self._latest, self._pending = snap, True
            self._wake.notify()

    def close(self) -> None:
        """Send what waits (once the interval allows) and stop; returns at once."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        next_at = 0.0
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
            wait = next_at - time.monotonic()
            if wait > 0:  # the interval, cut short by nothing: updates meanwhile replace the snapshot
                time.sleep(wait)
            with self._wake:
                snap, self._pending = self._latest, False
            next_at = time.monotonic() + self.min_interval_s
            if snap is not None:
                self._send(snap)

    def _send(self, snap: Snapshot) -> None:
        try:
            token = _read(self.token_file)
            context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
            request = urllib.request.Request(
                self.url,
                data=json.dumps(payload(snap)).encode(),
                method="POST",
                headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as answer:
                answer.read()
        except Exception as err:  # whatever the endpoint or the files do, training goes on
            self.failed += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "trainer status not reported to %s (%s); training goes on, later updates are tried every %g s",
                    self.url,
                    _reason(err),
                    self.min_interval_s,
                )
            return
        self.sent += 1
        if self._failing:
            self._failing = False
            log.warning("trainer status reported to %s again", self.url)


def _read(path: str | None) -> str | None:
    """The token, read afresh (the kubelet rotates the file); None when there is none."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)[:200]
    return f"{type(err).__name__}: {str(err)[:200]}"


def from_env(env: Mapping[str, str] | None = None) -> TrainerStatusReporter | None:
    """A reporter when this process runs in a TrainJob that offers progress reporting, else None."""
    env = os.environ if env is None else env
    url = env.get(URL_ENV, "").strip()
    if not url:
        return None
    return TrainerStatusReporter(url, env.get(CA_ENV) or None, env.get(TOKEN_ENV) or None)
