"""The evaluation's human side: the loss-curve PNG and the Markdown report.

The plot draws on a ``matplotlib.figure.Figure`` with the Agg canvas directly instead of switching
``pyplot``'s process-wide backend, so it works headless (pods, CI) and never disturbs a caller's
own matplotlib setup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.evaluate.benchmarks import METRIC_PREFIX

# Metric rows of the report, in this order, with how to read them.
_REPORT_METRICS = (
    ("perplexity", "held-out perplexity (lower is better)"),
    ("eval_loss", "mean token negative log-likelihood"),
    ("rouge_l", "ROUGE-L F1 of greedy answers"),
    ("token_f1", "token F1 of greedy answers"),
    ("exact_match", "exact-match rate of greedy answers"),
    ("code_parse_rate", "share of greedy answers that are Python code (ast.parse, a statement)"),
    ("empty_answer_rate", "share of empty greedy answers (lower is better)"),
)


@dataclass(frozen=True)
class GateRule:
    """One gate rule's outcome; ``value`` is None when the rule could not be evaluated."""

    rule: str
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    note: str = ""

    def reason(self) -> str:
        """One line: ``max_perplexity_ratio: perplexity_ratio 0.81 <= 0.95: pass``."""
        if self.value is None:
            return f"{self.rule}: not evaluable ({self.note}): FAIL"
        return (
            f"{self.rule}: {self.metric} {self.value:.4g} {self.op} {self.threshold:g}: "
            f"{'pass' if self.passed else 'FAIL'}"
        )

    def shortfall(self) -> str:
        """What a failed rule missed, for a headline: ``empty_answer_rate 0.913 (needs <= 0.5)``."""
        if self.value is None:
            return f"{self.rule} not evaluable ({self.note})"
        return f"{self.metric} {self.value:.4g} (needs {self.op} {self.threshold:g})"

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "value": self.value,
            "passed": self.passed,
            **({"note": self.note} if self.note else {}),
        }


def gate_failure(rules: Sequence[GateRule]) -> str:
    """One line naming every failed rule with its value and threshold (what a headline shows)."""
    failed = [r.shortfall() for r in rules if not r.passed]
    return "gate failed on " + ("; ".join(failed) or "no rule (none is set)")


def read_history(model_dir: str | Path) -> list[dict[str, Any]]:
    """The ``history.jsonl`` a training stage left in ``model_dir`` (empty when there is none)."""
    path = Path(model_dir) / "history.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed writer: keep the rest
                continue
    return [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]


def plot_loss_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> bool:
    """Draw one panel per history (training loss, and validation loss where logged) into ``path``.
    Returns False, writing nothing, when no history has any point."""
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(curves), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, rows) in enumerate(curves.items(), 1):
        ax = fig.add_subplot(1, len(curves), i)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1.2)
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(str(path), format="png")
    return True


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _fenced(text: str) -> str:
    """``text`` in a code fence longer than any backtick run inside it (answers are often code)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_report(
    *,
    title: str,
    metrics: Mapping[str, float],
    rules: Sequence[GateRule],
    passed: bool,
    samples: Sequence[Mapping[str, Any]],
    num_samples: int,
    plot_name: str | None,
    sources: Mapping[str, str],
) -> str:
    """The Markdown report: gate verdict and rules, metrics base vs candidate, the loss curve, samples."""
    lines = [f"# Evaluation: {title}", ""]
    lines += [f"**Gate: {'PASSED' if passed else 'FAILED'}**", ""]
    if rules:
        lines += ["| rule | metric | value | threshold | result |", "|---|---|---|---|---|"]
        for r in rules:
            result = "pass" if r.passed else ("FAIL (not evaluable: " + r.note + ")" if r.value is None else "FAIL")
            lines.append(f"| {r.rule} | {r.metric} | {_fmt(r.value)} | {r.op} {r.threshold:g} | {result} |")
    else:
        lines.append("No gate rule is set (evaluate.gate): the gate passes.")
    lines += ["", "## Metrics", ""]
    has_base = any(k.startswith("base_") for k in metrics)
    lines += (
        ["| metric | base | candidate | meaning |", "|---|---|---|---|"]
        if has_base
        else ["| metric | candidate | meaning |", "|---|---|---|"]
    )
    for key, meaning in _REPORT_METRICS:
        if key not in metrics:
            continue
        cells = [key, *([_fmt(metrics.get(f"base_{key}"))] if has_base else []), _fmt(metrics[key]), meaning]
        lines.append("| " + " | ".join(cells) + " |")
    for key in sorted(k for k in metrics if k.startswith(METRIC_PREFIX)):
        task, _, metric = key.removeprefix(METRIC_PREFIX).rpartition(".")
        cells = [
            key,
            *([_fmt(metrics.get(f"base_{key}"))] if has_base else []),
            _fmt(metrics[key]),
            f"lm-eval {task}: {metric}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for key in ("perplexity_ratio", "eval_tokens", "num_prompts", "gen_tokens_per_s"):
        if key in metrics:
            lines.append(f"| {key} |{' |' if has_base else ''} {_fmt(metrics[key])} | |")
    lines += ["", "| model | source |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in sources.items()]
    if plot_name:
        lines += ["", "## Training loss", "", f"![loss curve]({plot_name})"]
    shown = list(samples)[:num_samples]
    if shown:
        lines += ["", "## Sample generations"]
        for i, s in enumerate(shown, 1):
            lines += [
                "",
                f"### {i}. ROUGE-L {_fmt(s.get('rouge_l'))}, token F1 {_fmt(s.get('token_f1'))}",
                "",
                "Prompt:",
                "",
                _fenced(s["prompt"]),
                "",
                "Reference:",
                "",
                _fenced(s["reference"]),
                "",
                "Candidate:",
                "",
                _fenced(s["candidate"]),
            ]
            if "base" in s:
                lines += ["", "Base:", "", _fenced(s["base"])]
    return "\n".join(lines) + "\n"
