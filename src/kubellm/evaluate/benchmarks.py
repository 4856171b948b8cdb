"""Benchmarks in the evaluate stage: lm-evaluation-harness 0.4.13 as a library, on the loaded models.

Each task in ``evaluate.benchmarks`` runs through ``lm_eval.simple_evaluate`` with an ``HFLM`` that
wraps the model :func:`kubellm.evaluate.run.evaluate` already loaded, once for the candidate and once
for the base (for a LoRA adapter, the same weights with the adapter off), so nothing is loaded twice.
Scores land in metrics as ``bench.<task>.<metric>`` (and ``base_bench.…``); a metric with an lm-eval
filter other than ``none`` becomes ``<metric>_<filter>`` (``exact_match_strict-match``); standard
errors are left out (``bootstrap_iters=0``: the bootstrap costs more than a tiny model's whole run).

kubellm ships two local tasks (``tasks/*.yaml``) whose data is the user's prepared held-out set, so
they are written at evaluation time into a temporary folder (a JSONL file and a task YAML that
``include``\\ s the shipped one) and found through ``TaskManager(include_path=…)``: nothing is
downloaded. Any other name is looked up in lm-eval's own registry; those tasks fetch their data from
the Hugging Face Hub, which works where the cluster reaches it. Names are checked before any model is
loaded. lm-eval costs ~3 s of CPU to import and indexing its ~12,000 task files ~5 s more, so it is
imported here only when a benchmark is configured, and the registry only indexed for non-local names.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.config.evaluate import LOCAL_TASKS, BenchmarkConfig
from kubellm.errors import DataError, TrainingError
from kubellm.evaluate.metrics import code_parses, exact_match, rouge_l
from kubellm.log import get_logger

log = get_logger("benchmarks")

TASKS_DIR = Path(__file__).with_name("tasks")
#: Choices per ``kubellm_choice`` question: the true answer and 3 distractors (chance: 25 %).
NUM_CHOICES = 4
METRIC_PREFIX = "bench."


@dataclass(frozen=True)
class BenchmarkPlan:
    """Validated tasks, ready to run on any number of models."""

    benchmarks: list[BenchmarkConfig]
    task_manager: Any
    seed: int
    max_new_tokens: int
    """Tokens of a local task's answer (generated, or of a choice): must fit the model's context."""


def score_completion(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``process_results`` of ``kubellm_complete``: one greedy answer against the reference."""
    answer = results[0].strip()
    return {
        "exact_match": exact_match(answer, doc["reference"]),
        "rouge_l": rouge_l(answer, doc["reference"]),
        "code_parse_rate": code_parses(answer),
    }


def choice_rows(prompts: Sequence[str], references: Sequence[str], seed: int) -> list[dict[str, Any]]:
    """One ``kubellm_choice`` question per held-out example: its reference among up to 3 distinct other
    references, in a seeded order. Examples whose reference has no distinct other are skipped."""
    rows = []
    for i, (prompt, ref) in enumerate(zip(prompts, references, strict=True)):
        pool = sorted({r for r in references if r != ref})
        if not pool:
            continue
        rng = random.Random(seed * 1_000_003 + i)  # per example: adding examples keeps earlier questions
        choices = [ref, *rng.sample(pool, min(NUM_CHOICES - 1, len(pool)))]
        rng.shuffle(choices)
        rows.append({"prompt": prompt, "choices": choices, "label": choices.index(ref)})
    return rows


def write_local_tasks(
    names: Sequence[str],
    heldout: Sequence[dict[str, Any]],
    tokenizer: Any,
    out_dir: Path,
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
) -> None:
    """Write the data and task YAML of each local task in ``names`` into ``out_dir`` (an lm-eval
    include path). Prompts are rendered with the dataset's chat template, as training saw them."""
    import yaml

    prompts = [
        tokenizer.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=False) for ex in heldout
    ]
    refs = [ex["reference"] for ex in heldout]
    # A choice is scored in one forward pass with its prompt, so it must fit the model's context (the
    # built-in data's answers run to 1,000+ tokens, a tiny model's context is 128): each is cut to the
    # first max_new_tokens tokens, the budget the generation metrics give an answer. Cutting all choices
    # alike also keeps plain ``acc`` (summed log-likelihood) from simply preferring short answers.
    cut = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"][:max_new_tokens]) for r in refs]
    rows = {
        "kubellm_choice": lambda: choice_rows(prompts, cut, seed),
        "kubellm_complete": lambda: [{"prompt": p, "reference": r} for p, r in zip(prompts, refs, strict=True)],
    }
    for name in names:
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]()), encoding="utf-8")
        task: dict[str, Any] = {
            "include": str(TASKS_DIR / f"{name}.yaml"),
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "cache")},
        }
        if name == "kubellm_complete":
            # eos_token_id goes to generate(): the chat turn's end token stops an answer as it does in
            # `kubellm evaluate`, which a stop *string* cannot (lm-eval decodes without special tokens).
            task["generation_kwargs"] = {
                "until": [],
                "do_sample": False,
                "max_gen_toks": max_new_tokens,
                "eos_token_id": list(stop_ids),
            }
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")


def _import_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TrainingError(
            "evaluate.benchmarks needs lm-evaluation-harness: pip install 'kubellm[eval]' (lm-eval[api]==0.4.13)"
        ) from None


def plan_benchmarks(
    benchmarks: Sequence[BenchmarkConfig],
    *,
    heldout: Sequence[dict[str, Any]],
    tokenizer: Any,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
    work_dir: Path,
    data_dir: Path,
) -> BenchmarkPlan:
    """Check every task name and write the local tasks' data into ``work_dir``; raises one line for an
    unknown task, a local task without held-out examples, or a missing lm-eval."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    local = [b.task for b in benchmarks if b.task in LOCAL_TASKS]
    hub = [b.task for b in benchmarks if b.task not in LOCAL_TASKS]
    if local and len(heldout) < 2:
        raise DataError(
            f"evaluate.benchmarks: {local[0]} is made from held-out instruction examples and "
            f"{data_dir} has {len(heldout)} (prepare instruction data with a validation split)"
        )
    if local and (tokenizer is None or not tokenizer.chat_template):
        raise DataError(f"{data_dir}: the tokenizer has no chat template; {local[0]} renders prompts with it")
    if local:
        write_local_tasks(
            local, heldout, tokenizer, work_dir, stop_ids=stop_ids, max_new_tokens=max_new_tokens, seed=seed
        )
    with _quiet():
        manager = TaskManager(include_path=str(work_dir) if local else None, include_defaults=bool(hub))
    for i, b in enumerate(benchmarks):
        if b.task not in manager.all_tasks:
            near = difflib.get_close_matches(b.task, [*LOCAL_TASKS, *manager.all_tasks], n=3)
            raise TrainingError(
                f"evaluate.benchmarks[{i}].task: unknown task {b.task!r} (kubellm's local tasks: "
                f"{', '.join(LOCAL_TASKS)}; lm-eval {_lm_eval_version()} has "
                f"{len(manager.all_tasks)}{'; did you mean ' + ', '.join(near) + '?' if near else ''})"
            )
    return BenchmarkPlan(list(benchmarks), manager, seed, max_new_tokens)


def run_benchmarks(plan: BenchmarkPlan, model: Any, tokenizer: Any, *, batch_size: int) -> dict[str, Any]:
    """Run every planned task on ``model`` (already in the state to measure); returns
    ``{"scores": {"bench.<task>.<metric>": value}, "higher_is_better": {same keys: bool}}``."""
    from lm_eval import evaluate
    from lm_eval.models.huggingface import HFLM

    scores: dict[str, float] = {}
    better: dict[str, bool] = {}
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        local = [b.task for b in plan.benchmarks if b.task in LOCAL_TASKS]
        if local and plan.max_new_tokens >= lm.max_length:
            raise TrainingError(
                f"evaluate.max_new_tokens={plan.max_new_tokens} does not fit the model's "
                f"{lm.max_length}-token context with a prompt ({local[0]})"
            )
        for b in plan.benchmarks:
            out = evaluate(lm=lm, task_dict=_load(plan, b), limit=b.limit, bootstrap_iters=0, log_samples=False)
            if out is None:  # only on a non-zero rank, which a single process never is
                continue
            got, hib = _task_scores(b.task, out)
            if not got:
                raise TrainingError(f"evaluate.benchmarks: task {b.task!r} reported no numeric score")
            scores.update(got)
            better.update(hib)
    return {"scores": scores, "higher_is_better": better}


def _load(plan: BenchmarkPlan, bench: BenchmarkConfig) -> Any:
    """The task (or group) with its few-shot count and seed set, as ``simple_evaluate`` sets them.
    ``lm_eval.evaluate`` is called rather than ``simple_evaluate``, which also probes the environment
    (``torch.utils.collect_env``, ``git``): ~2 s per call, more than a tiny model's whole task."""
    loaded = plan.task_manager.load([bench.task])
    for task in loaded["tasks"].values():
        if bench.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=bench.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=plan.seed)
    return loaded


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_NOT_SCORES = {"sample_len", "alias"}  # bookkeeping entries of a task's results


def _task_scores(task: str, out: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """The named task's (or group's) scores from ``simple_evaluate``'s result; a group without an
    aggregate contributes each member's."""
    results = out.get("results", {})
    names = [task] if task in results else sorted(results)
    scores, better = {}, {}
    for name in names:
        hib = out.get("higher_is_better", {}).get(name, {})
        for key, value in results[name].items():
            metric, _, filt = key.partition(",")
            if (
                metric in _NOT_SCORES
                or metric.endswith("_stderr")
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                continue
            label = metric if filt in ("", "none") else f"{metric}_{_UNSAFE.sub('-', filt)}"
            full = f"{METRIC_PREFIX}{name}.{label}"
            scores[full] = float(value)
            better[full] = bool(hib.get(metric, True))
    return scores, better


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs every task it builds at INFO and, at WARNING, every context it left-truncates to fit a
    small model (hundreds of lines per task on a 128-token model): keep its errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_benchmarks_served(
    plan: BenchmarkPlan,
    *,
    base_url: str,
    model_name: str,
    tokenizer_dir: str | Path,
    batch_size: int,
    max_length: int = 2048,
    api_path: str = "/openai/v1",
) -> dict[str, Any]:
    """The same tasks against a served model's OpenAI completions API (``kubellm serve``, a KServe
    canary; ``api_path`` ``/v1`` for vLLM's routes): lm-eval's ``local-completions`` with token-id
    prompts, so the server scores exactly what lm-eval tokenized. ``model_name`` picks the model or
    adapter. Returns what :func:`run_benchmarks` returns."""
    from lm_eval import evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    scores: dict[str, float] = {}
    better: dict[str, bool] = {}
    with _quiet():
        lm = LocalCompletionsAPI(
            model=model_name,
            base_url=f"{base_url.rstrip('/')}{api_path}/completions",
            tokenizer=str(tokenizer_dir),
            tokenizer_backend="huggingface",
            batch_size=batch_size,
            max_retries=1,
            max_length=max_length,
            max_gen_toks=plan.max_new_tokens,
        )
        for b in plan.benchmarks:
            out = evaluate(lm=lm, task_dict=_load(plan, b), limit=b.limit, bootstrap_iters=0, log_samples=False)
            got, hib = _task_scores(b.task, out)
            scores.update(got)
            better.update(hib)
    return {"scores": scores, "higher_is_better": better}


def served_drops(evaluated: dict[str, float], served: dict[str, Any], max_drop: float) -> tuple[list[str], bool]:
    """One line per benchmark score (higher is better) comparing the served model with the same model
    as evaluated in-process: ``(lines, passed)``; a drop of more than ``max_drop`` points fails."""
    lines, passed = [], True
    for key, value in sorted(served["scores"].items()):
        if key not in evaluated or not served["higher_is_better"].get(key, True):
            continue
        drop = (evaluated[key] - value) * 100
        ok = drop <= max_drop + 1e-9
        passed &= ok
        lines.append(
            f"{key.removeprefix(METRIC_PREFIX)}: served {value:.4g} vs evaluated {evaluated[key]:.4g} "
            f"(drop {drop:.2f} <= {max_drop:g} points): {'pass' if ok else 'FAIL'}"
        )
    return lines, passed
