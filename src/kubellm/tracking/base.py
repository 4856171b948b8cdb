"""The tracking interface every stage logs through.

Stages receive a :class:`Tracker` and never import mlflow themselves, so unit tests pass a
:class:`NullTracker` (which also remembers what was logged, for assertions) and the same stage code
logs to MLflow in a real run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class Tracker(ABC):
    """One stage's run: params, metrics, artifacts, tags."""

    run_id: str | None = None

    @abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    @abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker(Tracker):
    """Logs nowhere; keeps everything in memory so tests can look at it."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def last(self, name: str) -> float | None:
        """The last value logged for metric ``name`` (``None`` if never logged)."""
        for _, m in reversed(self.metrics):
            if name in m:
                return m[name]
        return None
