"""MLflow behind the :class:`~kubellm.tracking.base.Tracker` interface: one run's params, metrics, tags, artifacts.

Tracking cannot stall training (``tracking.when_unreachable``). Each call to a server is bounded
(:mod:`kubellm.tracking.connect`). While the server is away, :class:`MlflowTracker` buffers metrics and
tries again at most every ``_RETRY_S`` seconds, so a step pays for one bounded call at most that often;
the points go out once the server answers. Everything goes through ``MlflowClient`` with explicit run ids
(never mlflow's global "active run"), so a component may hold several runs at once. Opening and closing
runs (parent and stage runs, re-attaching, SIGTERM, stale runs) is :mod:`kubellm.tracking.runs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubellm.log import get_logger
from kubellm.tracking.base import Tracker, TrackingError, flatten_params
from kubellm.tracking.connect import unreachable

log = get_logger("tracking")

# MLflow's batch limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per log_batch call.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_TAG_VALUE = 5000  # MLflow allows 8000; error messages beyond 5000 characters help nobody

# While the server is away: how often a call is tried again, and how many metric points wait for it.
_RETRY_S = 30.0
_MAX_BUFFERED = 100_000


class MlflowTracker(Tracker):
    """A :class:`Tracker` writing to one MLflow run through ``MlflowClient``.

    With ``when_unreachable="buffer"`` metrics wait in memory while the server is away (see the module
    doc); :meth:`flush` sends what waits and says in one line what could not be sent.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        logged_steps: Mapping[str, int] | None = None,
        when_unreachable: str = "fail",
        uri: str = "",
    ) -> None:
        self.client = client
        self.run_id = run_id
        # Per metric, the last step already in the run: a re-attached run (a retried step, a restarted
        # training pod) re-runs the steps since its last checkpoint, and those must not appear twice.
        self._logged_steps = dict(logged_steps or {})
        self.when_unreachable, self.uri = when_unreachable, uri
        self._waiting: list[Any] = []
        self.dropped = 0
        self._retry_at = 0.0

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as flat params. Params are immutable in MLflow: on a re-attached run a
        key already logged keeps its first value (a changed one is reported, not fatal)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {}
        for key, value in flatten_params(params).items():
            if key not in existing:
                new[key] = value
            elif existing[key] != value:
                log.warning(
                    "run %s: param %s already logged as %r; keeping it (new value %r)",
                    self.run_id,
                    key,
                    existing[key],
                    value,
                )
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and (step is None or step > self._logged_steps.get(k, -1))
        ]
        room = _MAX_BUFFERED - len(self._waiting)
        self.dropped += max(0, len(items) - room)
        self._waiting += items[: max(room, 0)]
        if time.monotonic() >= self._retry_at:
            self._send_waiting()

    def _send_waiting(self) -> bool:
        """Send the metrics that wait; False (and they keep waiting) when the server does not answer."""
        try:
            while self._waiting:
                self.client.log_batch(self.run_id, metrics=self._waiting[:_METRICS_PER_BATCH])
                del self._waiting[:_METRICS_PER_BATCH]
        except Exception as err:
            if not unreachable(err):
                raise
            if self.when_unreachable != "buffer":
                raise TrackingError(
                    f"MLflow at {self.uri or '?'} does not answer "
                    f"({(str(err).splitlines() or [type(err).__name__])[0][:200]}); the stage stops "
                    "(tracking.when_unreachable: fail)"
                ) from None
            if not self._retry_at:
                log.warning(
                    "tracking degraded: MLflow at %s does not answer (%s); training goes on, metrics wait "
                    "in memory and are sent when it is back",
                    self.uri or "?",
                    (str(err).splitlines() or [type(err).__name__])[0][:200],
                )
            self._retry_at = time.monotonic() + _RETRY_S
            return False
        if self._retry_at:
            log.warning(
                "tracking recovered: MLflow at %s answers again; the metrics that waited were sent", self.uri or "?"
            )
            self._retry_at = 0.0
        return True

    def flush(self) -> bool:
        """Send what waits, now; one warning line says how many points are lost when that fails."""
        sent = self._send_waiting()
        if not sent or self.dropped:
            log.warning(
                "run %s: %d metric points could not be sent to MLflow at %s (server away%s); they are "
                "in the stage's own files (history.jsonl)",
                self.run_id,
                len(self._waiting) + self.dropped,
                self.uri or "?",
                f", {self.dropped} beyond the buffer" if self.dropped else "",
            )
        return sent

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log_one = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._or_skip(f"artifact {path.name}", lambda: log_one(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()]

        def send() -> None:
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[i : i + _PARAMS_PER_BATCH])

        self._or_skip(f"tags {', '.join(sorted(tags))}", send)

    def _or_skip(self, what: str, call: Callable[[], Any]) -> None:
        """``call()``; while the server is away (buffer mode) ``what`` is skipped with one line instead of
        failing the stage, without a call while it is known to be away: an artifact is not kept in memory."""
        if self.when_unreachable == "buffer" and time.monotonic() < self._retry_at:
            log.warning("run %s: %s not logged, MLflow at %s does not answer", self.run_id, what, self.uri or "?")
            return
        try:
            call()
        except Exception as err:
            if self.when_unreachable != "buffer" or not unreachable(err):
                raise
            self._retry_at = time.monotonic() + _RETRY_S
            log.warning("run %s: %s not logged, MLflow at %s does not answer", self.run_id, what, self.uri or "?")
