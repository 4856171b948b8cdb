"""Console output: rich on a terminal, plain timestamped log lines everywhere else.

Pod logs, CI logs and KFP task logs are not terminals, so long work reports progress as one log line
every N steps there; on a TTY the same calls draw a progress bar. Nothing here is configured at import
time: :func:`setup` is called once by the CLI (or a component body).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

_CONFIGURED = False


def is_tty() -> bool:
    return sys.stderr.isatty()


def setup(level: int | str = logging.INFO) -> None:
    """Route the ``kubellm`` loggers to stderr (rich handler on a TTY, plain format otherwise)."""
    global _CONFIGURED
    root = logging.getLogger("kubellm")
    root.setLevel(level)
    if _CONFIGURED:
        return
    if is_tty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    # MLflow announces creating and migrating its sqlite store at INFO on first use of the embedded
    # default (~40 lines of alembic); kubellm's own lines say where runs go.
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("kubellm") else f"kubellm.{name}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """Progress of a long loop: a rich bar on a TTY, otherwise a log line every ``every`` steps.

    ``update(step, loss=…, lr=…)`` takes the absolute step (so a resumed run starts mid-way) and any
    metrics to show. Rates and the ETA are computed from the steps done in *this* process.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        every: int = 10,
        start: int = 0,
        logger: logging.Logger | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.every = max(1, every)
        self.description = description
        self.start_step = start
        self.logger = logger or get_logger("progress")
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._bar = None
        self._task = None
        if enabled and is_tty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=start, metrics="")

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def update(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=shown)
        elif step % self.every == 0 or step == self.total:
            eta = self.eta(step)
            eta_s = format_eta(eta) if eta == eta else "?"
            self.logger.info("%s step %d/%d %s eta=%s", self.description, step, self.total, shown, eta_s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_table(title: str, rows: list[Mapping[str, Any]]) -> None:
    """Print rows as a table (rich on a TTY, aligned plain text otherwise) to stdout."""
    if not rows:
        print(f"{title}: (empty)")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for row in rows:
            table.add_row(*(_fmt(row.get(c, "")) for c in columns))
        Console().print(table)
        return
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
