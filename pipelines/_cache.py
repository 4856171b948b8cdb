"""Resumable local runs: the outputs of the pure steps, indexed per run and keyed as on a cluster.

Every ``kubellm run`` records, for each cacheable task that succeeded, an entry under
``<workdir>/runs/<run>/cache/<key>.json``: the task's output parameters and output artifacts (paths and
metadata). ``kubellm run --resume RUN`` looks each cacheable task's key up in RUN's entries; on a hit the
task does not run and its outputs are RUN's (the artifacts stay where RUN wrote them, as KFP's own cache
hands out the cached artifact's URI on a cluster). A resumed run records its hits too, so it can itself
be resumed.

The key is what KFP's backend keys a task by, with content instead of artifact identity:
the component (its name, image and command, which holds the component's source), its input parameters
(the stage config, the source URI, the base model reference — no run id: see ``_common``), and a
SHA-256 of each input artifact's files. Content rather than path, because a step upstream that ran
again and produced the same bytes (a deterministic prep) must not invalidate the steps after it. The
library's own code is not in the key (the runtime image is, on a cluster): resuming after a fix to the
failed step — the point of ``--resume`` — must not recompute the hour of training before it.

KFP 2.17's local runner already consults a cache object for tasks compiled cacheable
(``local.init(enable_caching=True)``); :class:`ResumeCache` is that object (the same three methods,
``compute_key``/``get``/``put``), with our key and our index; the runner's internals it meets are in
:mod:`._kfp_local`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

from kfp import dsl

from kubellm.errors import ConfigError
from kubellm.fsutil import write_json_atomic
from kubellm.pipelines import _kfp_local
from kubellm.pipelines.api import STEPS

#: Components whose task logs an MLflow stage run of this name (a sweep trial adds ``.<trial>``); the
#: run summary marks these stages "cached". ``fetch_model`` logs none.
STAGE_OF = {fname.replace("_", "-"): step.logs for fname, step in STEPS.items() if step.cache and step.logs}

_CHUNK = 1 << 20


def content_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and file contents (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        return "missing"
    for f in files:
        rel = "" if f == root else f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _component(name: str) -> str:
    """``comp-prepare-data-2`` → ``prepare-data`` (KFP numbers a component used twice with other specs)."""
    return re.sub(r"-\d+$", "", name.removeprefix("comp-"))


def stage_of(component_name: str, arguments: dict[str, Any]) -> str | None:
    """The MLflow stage name a task of this component logs (None: it logs none)."""
    from kubellm.stages import trial_stage

    comp = _component(component_name)
    stage = arguments.get("stage") if comp == "prepare-data" and arguments.get("stage") else STAGE_OF.get(comp)
    return trial_stage(stage, arguments.get("trial") or None) if stage else None


#: Artifacts whose content lives in the executor output's metadata: the local runner writes no file.
_METADATA_ONLY = ("system.Metrics", "system.ClassificationMetrics", "system.SlicedClassificationMetrics")


def _artifact(doc: dict[str, Any]) -> dsl.Artifact:
    """An artifact of a cache entry, as the runner hands it on. KFP's own ``LocalCache`` treats every
    artifact without a file as deleted, Metrics included, which would make every step with metrics a miss."""
    uri = doc.get("uri", "")
    if uri and doc.get("schema_title") not in _METADATA_ONLY and not Path(uri).exists():
        raise FileNotFoundError(uri)
    return _kfp_local.create_artifact(
        {
            "name": doc.get("name", ""),
            "uri": uri,
            "metadata": doc.get("metadata") or {},
            "type": {"schemaTitle": doc.get("schema_title", "system.Artifact")},
        }
    )


def _output(value: Any) -> Any:
    artifact, artifact_list = _kfp_local.artifact_markers()
    if isinstance(value, dict) and value.get(artifact):
        return _artifact(value)
    if isinstance(value, dict) and value.get(artifact_list):
        return [_artifact(a) for a in value.get("artifacts", [])]
    return value


#: Environment variables a task gets at run time that name this run only (KFP's MLflow plugin's run
#: id): left out of the key, as the parent run's id is (see ``_common``), or nothing could be reused.
_RUN_SPECIFIC_ENV = ("MLFLOW_RUN_ID",)


class ResumeCache:
    """KFP's local task cache with our key, writing ``run``'s index and reading ``resume_from``'s."""

    def __init__(self, runs_dir: str | Path, run: str, resume_from: str | None = None) -> None:
        self.cache_root = str(Path(runs_dir) / run / "cache")
        Path(self.cache_root).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.runs_dir = Path(runs_dir)
        self.run = run
        self.resume_from = resume_from
        self.hits: dict[str, str] = {}  # stage → the run whose outputs it reused
        self._fingerprints: dict[str, str] = {}
        self._stage: dict[str, str | None] = {}
        self._inputs: dict[str, dict[str, Any]] = {}
        self._local = threading.local()
        if resume_from is not None and not (self.runs_dir / resume_from / "cache").is_dir():
            known = sorted(p.parent.name for p in self.runs_dir.glob("*/cache"))
            raise ConfigError(
                f"--resume {resume_from}: no earlier run of that name under {self.runs_dir} "
                f"(runs: {', '.join(known[-5:]) or 'none'})"
            )

    # the key ------------------------------------------------------------------------------------------
    def _fingerprint(self, artifact: dsl.Artifact) -> list[str]:
        uri = artifact.path if artifact.uri else ""
        with self._lock:
            known = self._fingerprints.get(uri)
        if known is None:
            known = content_fingerprint(uri) if uri else "none"
            with self._lock:
                self._fingerprints[uri] = known
        return [type(artifact).schema_title, known]

    def _input(self, value: Any) -> Any:
        if isinstance(value, dsl.Artifact):
            return {"artifact": self._fingerprint(value)}
        if isinstance(value, list):
            return [self._input(v) for v in value]
        return value

    def compute_key(
        self,
        component_name: str,
        image: str,
        full_command: list[str],
        arguments: dict[str, Any],
        env_vars: dict[str, str] | None = None,
        custom_cache_key: str | None = None,
    ) -> str:
        env = {k: v for k, v in (env_vars or {}).items() if k not in _RUN_SPECIFIC_ENV}
        doc = {
            "component": _component(component_name),
            "image": image,
            "command": list(full_command),
            "env": env,
            "custom": custom_cache_key or "",
            "inputs": {k: self._input(v) for k, v in sorted(arguments.items())},
        }
        key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            self._stage[key] = stage_of(component_name, arguments)
            # what the key was made of (but the command, the component's source): explains a miss
            self._inputs[key] = {k: v for k, v in doc.items() if k != "command"} | {
                "command_sha256": hashlib.sha256(json.dumps(doc["command"]).encode()).hexdigest()
            }
        return key

    # the index ----------------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        """``resume_from``'s outputs for this key, or None (then the task runs)."""
        self._local.hit = None
        if self.resume_from is None:
            return None
        path = self.runs_dir / self.resume_from / "cache" / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            outputs = {name: _output(value) for name, value in entry["outputs"].items()}
        except (OSError, ValueError, KeyError, FileNotFoundError):
            return None  # no entry, or RUN's artifacts were deleted since: run the task
        origin = entry.get("origin") or self.resume_from
        self._record(key, entry["outputs"], origin)
        stage = self._stage.get(key)
        if stage:
            with self._lock:
                self.hits[stage] = origin
        self._local.hit = origin
        return outputs

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        self._record(key, _kfp_local.serialize_outputs(outputs), self.run)

    def _record(self, key: str, outputs: dict[str, Any], origin: str) -> None:
        write_json_atomic(
            Path(self.cache_root) / f"{key}.json",
            {"outputs": outputs, "stage": self._stage.get(key), "origin": origin, "key": self._inputs.get(key)},
        )

    def begin_task(self) -> None:
        """Forget this thread's last hit: a task that is not cacheable never calls :meth:`get`."""
        self._local.hit = None

    def hit_in_this_thread(self) -> str | None:
        """The run whose outputs the task just handled in this thread reused (None: it ran)."""
        return getattr(self._local, "hit", None)


def original_stage_runs(runs_dir: str | Path, run: str) -> dict[str, str]:
    """stage → MLflow run id in ``run``'s summary (a stage it reused points at the run that made it)."""
    path = Path(runs_dir) / run / "summary.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8")).get("stages", [])
    return {r["stage"]: r["run_id"] for r in rows if r.get("run_id")}
