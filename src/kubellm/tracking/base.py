"""The tracking interface every stage logs through.

Stages receive a :class:`Tracker` and never import mlflow themselves, so unit tests pass a
:class:`NullTracker` (which also remembers what was logged, for assertions) and the same stage code
logs to MLflow in a real run.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubellm.errors import KubellmError


class TrackingError(KubellmError):
    """A tracking or registry operation that cannot proceed (tracking disabled, unknown model version,
    unreachable server)."""


#: Tag a stage run sets when it decides that the stages after it do not run (the gate failed, the data is
#: unchanged): one line the run's summary shows beside each stage that did not run.
CLOSES_TAG = "closes"
#: The evaluation's gate rules as JSON: rule, metric, op, threshold, value, passed (summary.json reads it).
GATE_RULES_TAG = "gate.rules"


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

    def log_dict(self, obj: Any, name: str) -> None:
        """Log ``obj`` as a JSON artifact called ``name`` (for example ``config.json``)."""
        with tempfile.TemporaryDirectory(prefix="kubellm-log-") as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            self.log_artifact(path)


class NullTracker(Tracker):
    """Logs nowhere; keeps everything in memory so tests can look at it."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tags: dict[str, str] = {}
        self.dicts: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_dict(self, obj: Any, name: str) -> None:
        self.dicts[name] = obj

    def last(self, name: str) -> float | None:
        """The last value logged for metric ``name`` (``None`` if never logged)."""
        for _, m in reversed(self.metrics):
            if name in m:
                return m[name]
        return None


# MLflow rejects longer keys (250) and, on servers created before MLflow 2.x's schema change, param
# values over 500 characters; truncating to the older limit keeps one code path for every server.
MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 500


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat MLflow params: dotted keys, string values of at most 500 characters.

    Nested mappings and lists of mappings become dotted keys (``data.sources.0.uri``); scalars and lists
    of scalars become JSON text (``true``, ``null``, ``[1, 2]``); strings stay as they are.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten_params(item, f"{name}.{i}."))
        else:
            flat[name[:MAX_PARAM_KEY]] = _param_value(value)
    return flat
