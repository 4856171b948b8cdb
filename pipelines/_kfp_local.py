"""Everything ``kubellm run`` takes from KFP's local runner beyond its public API, in one place.

``kfp.local``'s public surface is ``init``, ``SubprocessRunner`` and ``DockerRunner``: enough to run a
pipeline, not to show it (per-task logs, the live table), resume it from an earlier run's outputs, or
fix its Metrics cache. Those need the runner's internals, all of them reached through this module and
listed in :data:`PRIVATE` (a test pins that each exists in the installed kfp):

- ``kfp.local.orchestrator.task_executor.execute_single_task``, wrapped for the run: when each task
  starts and ends (the console) and, per task, the environment a KFP backend would add at run time
  (:func:`watching_tasks`); the executor spec is copied for that one call, never changed.
- ``kfp.local.status.Status.SUCCESS``: how that function says a task succeeded.
- ``kfp.local.cache.get_local_cache``, replaced for the run by kubellm's resume cache
  (:func:`cache_installed`), with ``LocalCache._serialize_outputs`` and its two artifact markers for the
  entries' format, and ``kfp.dsl.executor.create_artifact_instance`` to hand a cached artifact back.
- ``kfp.local.logging_utils.indented_print``, which swaps ``builtins.print`` and, inside a
  ``ParallelFor``, can leave the swapped one behind: :func:`print_restored` puts it back.

:func:`check` runs first in ``kubellm run``: a kfp outside :data:`SUPPORTED`, or one where a name has
moved, stops the command with one line naming the supported range, instead of a traceback from deep
inside a run. Nothing else in kubellm uses a private kfp name (compiling uses the public compiler).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kubellm.errors import KubellmError

#: The kfp releases whose local-runner internals this module was written against (lower inclusive).
SUPPORTED = ("2.17.0", "2.18.0")

#: Every private name used here: (module, attribute path).
PRIVATE: tuple[tuple[str, str], ...] = (
    ("kfp.local.orchestrator.task_executor", "execute_single_task"),
    ("kfp.local.status", "Status.SUCCESS"),
    ("kfp.local.cache", "get_local_cache"),
    ("kfp.local.cache", "LocalCache._serialize_outputs"),
    ("kfp.local.cache", "_ARTIFACT_MARKER"),
    ("kfp.local.cache", "_ARTIFACT_LIST_MARKER"),
    ("kfp.dsl.executor", "create_artifact_instance"),
    ("kfp.local.logging_utils", "indented_print"),
)

#: The keyword arguments kfp passes ``execute_single_task`` that the wrapper reads.
_TASK_ARGS = ("task_name", "task_spec", "components", "executors")


class KfpLocalUnsupported(KubellmError):
    """The installed kfp is not one whose local runner ``kubellm run`` supports."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece else ""
        parts.append(int(digits or 0))
    return tuple(parts)


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def missing_names() -> list[str]:
    """The names of :data:`PRIVATE` the installed kfp lacks (``module:attribute``)."""
    missing = []
    for module, path in PRIVATE:
        try:
            _resolve(module, path)
        except (ImportError, AttributeError):
            missing.append(f"{module}:{path}")
    return missing


def check() -> None:
    """Raise :class:`KfpLocalUnsupported` (one line) unless the installed kfp is in :data:`SUPPORTED`
    and has every name of :data:`PRIVATE`."""
    import kfp

    version = getattr(kfp, "__version__", "?")
    low, high = SUPPORTED
    wanted = f"kfp>={low},<{high}"
    if not (_version_tuple(low) <= _version_tuple(version) < _version_tuple(high)):
        raise KfpLocalUnsupported(
            f"kubellm run needs {wanted} (its local runner's internals); kfp {version} "
            f"is installed: pip install '{wanted}'"
        )
    missing = missing_names()
    if missing:
        raise KfpLocalUnsupported(
            f"kubellm run needs {wanted} as released; the installed kfp {version} lacks "
            f"{', '.join(missing)}: pip install --force-reinstall '{wanted}'"
        )


# the resume cache ---------------------------------------------------------------------------------------
def artifact_markers() -> tuple[str, str]:
    """The keys that mark an artifact and a list of artifacts in a cache entry's outputs."""
    cache = importlib.import_module("kfp.local.cache")
    return cache._ARTIFACT_MARKER, cache._ARTIFACT_LIST_MARKER


def serialize_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """A task's outputs as KFP's own local cache writes them (JSON-able; artifacts by URI)."""
    return _resolve("kfp.local.cache", "LocalCache._serialize_outputs")(outputs)


def create_artifact(runtime_artifact: dict[str, Any]) -> Any:
    """An artifact object of the right class from its runtime description (name, uri, metadata, type)."""
    return _resolve("kfp.dsl.executor", "create_artifact_instance")(runtime_artifact)


@contextlib.contextmanager
def cache_installed(cache: Any) -> Iterator[Any]:
    """Make the local runner consult ``cache`` (``compute_key``/``get``/``put``) for every task compiled
    cacheable, for a ``with`` block."""
    module = importlib.import_module("kfp.local.cache")
    saved = module.get_local_cache
    module.get_local_cache = lambda: cache
    try:
        yield cache
    finally:
        module.get_local_cache = saved


# the tasks ----------------------------------------------------------------------------------------------
#: Called as a task starts with (task name, display name); returns a token for ``TaskEnd`` and the
#: environment variables the task's process gets beyond the runner's own.
TaskStart = Callable[[str, str], tuple[Any, Mapping[str, str]]]
#: Called as a task ends with (the token, whether it succeeded).
TaskEnd = Callable[[Any, bool], None]


def _with_env(kwargs: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``kwargs`` whose ``executors`` hold, for this task's executor only, a copy with ``env`` added."""
    component = kwargs["components"][kwargs["task_spec"].component_ref.name]
    label = component.executor_label
    spec = type(kwargs["executors"][label])()
    spec.CopyFrom(kwargs["executors"][label])
    for name, value in env.items():
        var = spec.container.env.add()
        var.name, var.value = name, value
    return {**kwargs, "executors": {**kwargs["executors"], label: spec}}


@contextlib.contextmanager
def watching_tasks(start: TaskStart, end: TaskEnd) -> Iterator[None]:
    """Call ``start`` and ``end`` around every task the local runner executes, for a ``with`` block
    (tasks of a ``ParallelFor`` run in threads of their own: both are called in the task's thread)."""
    module = importlib.import_module("kfp.local.orchestrator.task_executor")
    success = _resolve("kfp.local.status", "Status.SUCCESS")
    original = module.execute_single_task

    def watched(**kwargs: Any) -> Any:
        missing = [a for a in _TASK_ARGS if a not in kwargs]
        if missing:  # kfp called it another way than the supported releases do
            raise KfpLocalUnsupported(
                f"kubellm run needs kfp>={SUPPORTED[0]},<{SUPPORTED[1]}: its task executor "
                f"was called without {', '.join(missing)}"
            )
        token, env = start(kwargs["task_name"], kwargs["task_spec"].task_info.name)
        ok = False
        try:
            outputs, state = original(**(_with_env(kwargs, env) if env else kwargs))
            ok = state == success
            return outputs, state
        finally:
            end(token, ok)

    module.execute_single_task = watched
    try:
        yield
    finally:
        module.execute_single_task = original


@contextlib.contextmanager
def print_restored() -> Iterator[None]:
    """``builtins.print`` as it was before the block, whatever the runner left behind in it."""
    real_print = builtins.print
    try:
        yield
    finally:
        builtins.print = real_print
