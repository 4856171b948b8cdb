"""What ``kubellm run`` shows while a pipeline runs: one row per task, each task's full log in a file.

KFP's local runner prints every task's output — its own executor input JSON included, ~3,000 lines for
``make run`` — to the parent's stdout with ``print``, from the thread that dispatched the task (also for
a ``ParallelFor``'s parallel tasks). For the run, :class:`Monitor` replaces ``sys.stdout``/``sys.stderr``
with a router that appends each line to the log of the task running in that thread
(``<run>/logs/<task>.log``; lines outside any task go to ``pipeline.log``), and watches the runner's tasks
(:func:`._kfp_local.watching_tasks`) to know when a task starts, ends, or was answered from the resume cache.

Modes: ``live`` (a terminal: a rich table of the tasks — status, seconds, the latest progress line —
redrawn in place), ``lines`` (off a terminal: one line per task event), ``quiet`` (nothing until the
summary), ``verbose`` (today's full stream, logs still written). Whatever the mode, a failed task's last
lines and its log's path are printed at the end.
"""

from __future__ import annotations

import collections
import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from kubellm.pipelines._kfp_local import watching_tasks

Mode = Literal["live", "lines", "quiet", "verbose"]

#: Lines shown from a failed task's log: enough for a Python traceback's end and the error line.
TAIL_LINES = 15

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: A log line in a task: KFP's executor re-formats the library's log records ("[KFP Executor time
#: LEVEL]: message"); kubellm's own plain format is "time LEVEL kubellm.x: message".
_PROGRESS = re.compile(
    r"^(?:\[KFP Executor [^\]]*\b(?:INFO|WARNING|ERROR)\]:|\S+ \S+ (?:INFO|WARNING|ERROR) kubellm[\w.]*:)"
    r"\s+(?P<msg>.+)$"
)
_ERROR = re.compile(r"^(?:error: |[\w.]+(?:Error|Exception): )")
#: KFP's own chatter around a task: executor JSON, separators, banners, loading the component; and the
#: ^^^^ markers under a traceback's lines.
_NOISE = re.compile(
    r"^(?:[{}\[\]\"]|-{10,}|[~^]+$|Streamed logs:|Executing task|Task .* (?:outputs:|has no outputs)|"
    r"\S+ - INFO - |\[KFP Executor [^\]]*\]: (?:Looking for component|Loading KFP component|"
    r"Got executor_input|Wrote executor output|Did not write output))"
)


@dataclass
class Task:
    """One task of the run as the console shows it."""

    label: str
    display: str
    log: Path
    started: float = field(default_factory=time.monotonic)
    status: str = "running"
    seconds: float | None = None
    latest: str = ""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def elapsed(self) -> float:
        return self.seconds if self.seconds is not None else time.monotonic() - self.started


class Monitor:
    """Routes the runner's output to per-task logs and shows the tasks' progress (see module docstring)."""

    def __init__(self, logs_dir: str | Path, mode: Mode, out: TextIO | None = None) -> None:
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.out = out or sys.stdout
        self.tasks: dict[str, Task] = {}
        self._files: dict[str, TextIO] = {}
        self._lock = threading.RLock()
        self._local = threading.local()
        self._live: Any = None

    # the sys.stdout / sys.stderr replacement -----------------------------------------------------------
    def write(self, text: str) -> int:
        if self.mode == "verbose":
            self.out.write(text)
        buf = getattr(self._local, "buf", "") + text
        *lines, self._local.buf = buf.split("\n")
        for line in lines:
            self._line(getattr(self._local, "task", None), _ANSI.sub("", line).rstrip())
        return len(text)

    def flush(self) -> None:
        if self.mode == "verbose":
            self.out.flush()

    def isatty(self) -> bool:
        return False

    def _line(self, task: Task | None, line: str) -> None:
        key = task.label if task else "pipeline"
        with self._lock:
            fh = self._files.get(key)
            if fh is None:
                fh = self._files[key] = (task.log if task else self.logs_dir / "pipeline.log").open(
                    "a", encoding="utf-8"
                )
            fh.write(line + "\n")
        text = line.strip()
        if task is None or not text or _NOISE.match(text):
            return
        task.tail.append(line)
        m = _PROGRESS.search(text)
        if m or _ERROR.match(text):
            task.latest = m.group("msg") if m else text

    # task events ---------------------------------------------------------------------------------------
    def start(self, name: str, display: str) -> Task:
        with self._lock:
            n = sum(1 for t in self.tasks.values() if t.label.split("#")[0] == name)
            label = name if n == 0 else f"{name}#{n + 1}"
            task = self.tasks[label] = Task(label, display or name, self.logs_dir / f"{label}.log")
        self._local.task = task
        self._event(task, "started")
        return task

    def finish(self, task: Task, ok: bool, cached_from: str | None) -> None:
        self._local.task = None
        with self._lock:
            task.seconds = time.monotonic() - task.started
            task.status = f"cached ({cached_from})" if cached_from else "done" if ok else "FAILED"
            fh = self._files.pop(task.label, None)
            if fh is not None:
                fh.close()
        if cached_from:
            self._event(task, f"cached: outputs of {cached_from}")
        elif ok:
            self._event(task, f"done in {task.seconds:.1f} s")
        else:
            self._event(task, f"FAILED after {task.seconds:.1f} s (log: {task.log})")

    def _event(self, task: Task, what: str) -> None:
        if self.mode == "lines":
            self.out.write(f"{time.strftime('%H:%M:%S')} {task.display:<36} {what}\n")
            self.out.flush()
        elif self._live is not None:
            self._live.refresh()

    def failed(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == "FAILED"]

    # the live table ------------------------------------------------------------------------------------
    def render(self) -> Any:
        from rich.table import Table

        table = Table(box=None, show_edge=False, pad_edge=False)
        for col in ("task", "status", "s", "latest"):
            table.add_column(col, no_wrap=True, overflow="ellipsis", max_width={"task": 28, "latest": 70}.get(col))
        with self._lock:
            rows = list(self.tasks.values())
        for t in rows:
            style = {"done": "green", "FAILED": "bold red", "running": "yellow"}.get(t.status, "cyan")
            table.add_row(t.display, f"[{style}]{t.status}[/]", f"{t.elapsed():.0f}", t.latest)
        return table

    # the run -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, cache: Any = None, task_env: Any = None) -> Iterator[Monitor]:
        """Route output and watch tasks for the block; print the failed tasks' ends afterwards.
        ``task_env`` (``start(label) -> env``, ``end(label, ok)``) adds to each task's environment."""

        def started(name: str, display: str) -> tuple[Task, Mapping[str, str]]:
            task = self.start(name, display)
            if cache is not None:
                cache.begin_task()
            return task, (task_env.start(task.label) if task_env is not None else {})

        def ended(task: Task, ok: bool) -> None:
            self.finish(task, ok, cache.hit_in_this_thread() if cache is not None and ok else None)
            if task_env is not None:
                task_env.end(task.label, ok)

        saved = sys.stdout, sys.stderr
        live = contextlib.nullcontext()
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            live = self._live = Live(
                console=Console(file=self.out),
                get_renderable=self.render,
                refresh_per_second=2,
                redirect_stdout=False,
                redirect_stderr=False,
            )
        try:
            with watching_tasks(started, ended):
                sys.stdout = sys.stderr = self  # type: ignore[assignment]
                with live:
                    yield self
        finally:
            sys.stdout, sys.stderr = saved
            self._live = None
            with self._lock:
                for fh in self._files.values():
                    fh.close()
                self._files.clear()
        self.report_failures()

    def report_failures(self) -> None:
        for task in self.failed():
            self.out.write(f"\n{task.display} ({task.label}) failed; its last lines:\n")
            self.out.writelines(f"  {line.strip()}\n" for line in task.tail)
            self.out.write(f"full log: {task.log}\n")
        self.out.flush()
