"""``kubellm evaluate``: held-out perplexity, generation metrics, base vs candidate, the promotion gate.

* Perplexity is token-weighted over the prepared validation split with exactly the training loss's
  masking (labels shifted by one, ``-100`` excluded; :func:`kubellm.models.losses.token_nll_sum`):
  ``exp(sum of token NLLs / number of scored tokens)``, computed in fp32.
* For instruction data, greedy answers to the held-out prompts (``heldout.jsonl``, rendered with the
  chat template and ``add_generation_prompt``, left-padded batches) are scored by exact match, token F1
  and ROUGE-L (:mod:`kubellm.evaluate.metrics`), for the candidate and the base model on the same prompts.
* With code answers (``evaluate.code_metric``), ``code_parse_rate`` is the share of answers whose code
  parses with :func:`ast.parse` and holds a statement; ``empty_answer_rate`` is the share of blank answers.
* ``evaluate.benchmarks`` run through lm-evaluation-harness on the same loaded models
  (:mod:`kubellm.evaluate.benchmarks`): ``bench.<task>.<metric>``.
* The gate (``evaluate.gate``) checks every rule that is set; a rule whose metric could not be
  measured (no base model, no held-out prompts) is *not evaluable* and fails the gate, saying why.
  By default the candidate must cut perplexity by 5 %, answer at most half of the prompts with
  nothing, match or beat the base on every generation metric, and lose at most 1 point on any
  benchmark. Perplexity is measured with the reference answer given (teacher forcing), so a model
  whose greedy first token ends the turn still scores well on it: the perplexity rule alone once
  promoted a model that answered every prompt with nothing.

The base model is ``base_model`` when given. A LoRA adapter also carries its own base: it is measured
by switching the adapter off (``PeftModel.disable_adapter``), so adapter evaluations always have a base
column without loading the base weights twice.

``out_dir`` receives ``metrics.json`` (the :class:`EvalResult`), ``report.md`` and ``loss_curve.png``,
all at once or not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubellm.config.evaluate import EvalConfig, GateConfig
from kubellm.errors import DataError, TrainingError
from kubellm.evaluate.benchmarks import METRIC_PREFIX, plan_benchmarks, run_benchmarks
from kubellm.evaluate.metrics import is_code, mean_scores, score
from kubellm.evaluate.report import GateRule, gate_failure, plot_loss_curves, read_history, render_report
from kubellm.fsutil import atomic_dir, claim_output, write_json_atomic
from kubellm.log import Progress, get_logger
from kubellm.tracking.base import CLOSES_TAG, GATE_RULES_TAG, Tracker

log = get_logger("evaluate")

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "loss_curve.png"
OUTPUT_KIND = "evaluation"


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation found; ``metrics.json`` holds the same as JSON."""

    metrics: dict[str, float]
    """``perplexity``, ``eval_loss``, ``eval_tokens``; with a base ``base_perplexity``,
    ``perplexity_ratio`` …; with held-out prompts ``rouge_l``, ``token_f1``, ``exact_match``,
    ``empty_answer_rate``, for code answers ``code_parse_rate`` (and ``base_…``), ``num_prompts``,
    ``gen_tokens_per_s``; with benchmarks ``bench.<task>.<metric>`` (and ``base_bench.…``)."""
    passed: bool
    """Whether every gate rule that is set holds."""
    reasons: list[str]
    """One line per gate rule: value, threshold, pass/FAIL (or why it could not be evaluated)."""
    report_path: Path
    plot_path: Path | None
    """``None`` when neither model directory has a ``history.jsonl``."""
    samples: list[dict] = field(default_factory=list)
    """Per held-out prompt: ``prompt``, ``reference``, ``candidate`` (and ``base``) answers and the
    candidate's ``exact_match``/``token_f1``/``rouge_l``."""
    rules: list[dict] = field(default_factory=list)
    """Every gate rule that is set: ``rule``, ``metric``, ``op``, ``threshold``, ``value`` (None when not
    evaluable, with a ``note`` saying why) and ``passed``."""

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["report_path"] = str(self.report_path)
        doc["plot_path"] = str(self.plot_path) if self.plot_path else None
        return doc

    @classmethod
    def read(cls, out_dir: str | Path) -> EvalResult:
        """The result an evaluation wrote to ``out_dir`` (paths re-rooted there: the folder may have
        moved, as a KFP artifact does between steps)."""
        out = Path(out_dir)
        path = out / METRICS_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not an evaluation result ({type(err).__name__})") from None
        return cls(
            metrics=dict(doc["metrics"]),
            passed=bool(doc["passed"]),
            reasons=list(doc.get("reasons", [])),
            report_path=out / REPORT_FILE,
            plot_path=out / PLOT_FILE if doc.get("plot_path") else None,
            samples=list(doc.get("samples", [])),
            rules=list(doc.get("rules", [])),
        )


# ------------------------------------------------------------------------------------------- the gate
# (config field, metric it bounds, comparison, what the metric needs)
_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("max_perplexity_ratio", "perplexity_ratio", "<=", "base"),
    ("max_perplexity", "perplexity", "<=", ""),
    ("min_rouge_l", "rouge_l", ">=", "generation"),
    ("min_token_f1", "token_f1", ">=", "generation"),
    ("max_empty_answer_rate", "empty_answer_rate", "<=", "generation"),
)
#: Generation metrics where higher is better, compared with the base by ``max_generation_drop``.
GENERATION_SCORES = ("exact_match", "token_f1", "rouge_l", "code_parse_rate")
# Means over the same prompts that are equal can differ in the last bits (0.1 + 0.2 != 0.3).
_EPS = 1e-9


def _check(name: str, metric: str, op: str, threshold: float, value: float | None, note: str = "") -> GateRule:
    if value is None:
        return GateRule(name, metric, op, threshold, None, False, note or f"{metric} was not measured")
    ok = value <= threshold + _EPS if op == "<=" else value >= threshold - _EPS  # NaN compares False: fails
    return GateRule(name, metric, op, threshold, value, ok)


def _drops(
    name: str,
    threshold: float | None,
    pairs: list[tuple[str, float | None, float | None]],
    scale: float,
    missing: dict[str, str],
) -> list[GateRule]:
    """``(metric, candidate, base)`` → one rule each: ``scale × (base − candidate) <= threshold``."""
    if threshold is None:
        return []
    rules = []
    for metric, cand, base in pairs:
        value = None if cand is None or base is None else scale * (base - cand)
        note = f"{metric}: {missing.get('base') or 'base_' + metric + ' was not measured'}"
        rules.append(_check(name, f"{metric}_drop", "<=", threshold, value, note))
    return rules


def apply_gate(
    gate: GateConfig,
    metrics: dict[str, float],
    *,
    missing: dict[str, str],
    lower_is_better: frozenset[str] = frozenset(),
) -> list[GateRule]:
    """Check each rule that is set against ``metrics``. ``missing`` says, per need (``base``,
    ``generation``), why its metrics are absent; such rules come back not evaluable, and failed.
    Drop rules compare ``base_<metric>`` with ``<metric>``: generation metrics as differences of means,
    benchmark scores (those not in ``lower_is_better``) in points (× 100)."""
    rules = []
    for name, metric, op, need in _RULES:
        threshold = getattr(gate, name)
        if threshold is not None:
            rules.append(_check(name, metric, op, threshold, metrics.get(metric), missing.get(need, "")))
    if gate.max_generation_drop is not None and "rouge_l" not in metrics:
        rules.append(
            _check(
                "max_generation_drop",
                "generation metrics",
                "<=",
                gate.max_generation_drop,
                None,
                missing.get("generation", ""),
            )
        )
    else:
        rules += _drops(
            "max_generation_drop",
            gate.max_generation_drop,
            [(m, metrics[m], metrics.get(f"base_{m}")) for m in GENERATION_SCORES if m in metrics],
            1.0,
            missing,
        )
    bench = [k for k in metrics if k.startswith(METRIC_PREFIX) and k not in lower_is_better]
    rules += _drops(
        "max_benchmark_drop",
        gate.max_benchmark_drop,
        [(k, metrics[k], metrics.get(f"base_{k}")) for k in bench],
        100.0,
        missing,
    )
    for key, floor in gate.min_benchmark.items():
        metric = METRIC_PREFIX + key
        measured = sorted(k.removeprefix(METRIC_PREFIX) for k in metrics if k.startswith(METRIC_PREFIX))
        rules.append(
            _check(
                "min_benchmark",
                metric,
                ">=",
                floor,
                metrics.get(metric),
                f"{metric} was not measured (measured: {', '.join(measured) or 'none'})",
            )
        )
    return rules


# --------------------------------------------------------------------------------------- perplexity
def heldout_nll(
    model: Any, split: Any, *, pad_id: int, batch_size: int, max_batches: int | None, device: str
) -> tuple[float, int]:
    """Summed token NLL and scored-token count over ``split`` (or its first ``max_batches`` batches'
    rows), with the training loss's masking and loss (:mod:`kubellm.models.losses`).

    Two things make batching pay (1.37× a forward per row before them): rows are batched by length, so
    a batch pads little (the sum does not depend on the order), and the output head projects only the
    positions whose next token is scored (``logits_to_keep``) — on instruction data the prompt is masked,
    and the 4 k-vocabulary head of the ``small`` preset is its largest matmul.
    """
    import torch

    from kubellm.models.losses import IGNORE_INDEX, next_token_targets, nll_sum
    from kubellm.train.batches import PadCollator

    collate = PadCollator(pad_id)
    n = len(split) if max_batches is None else min(len(split), max_batches * batch_size)
    lengths = [len(ids) for ids in split.select_columns("input_ids")[:n]["input_ids"]]
    order = sorted(range(n), key=lengths.__getitem__)
    total, tokens = 0.0, 0
    with torch.inference_mode(), Progress(math.ceil(n / batch_size), "perplexity", every=50) as bar:
        for b, start in enumerate(range(0, n, batch_size), 1):
            batch = {k: v.to(device) for k, v in collate(split.__getitems__(order[start : start + batch_size])).items()}
            targets = next_token_targets(batch["labels"])  # position t predicts label t + 1
            scored = targets != IGNORE_INDEX
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                use_cache=False,
                logits_to_keep=scored,
            ).logits
            total += float(nll_sum(logits.reshape(-1, logits.size(-1)), targets[scored]))
            tokens += int(scored.sum())
            bar.update(b)
    return total, tokens


def _perplexity(nll: float, tokens: int) -> tuple[float, float]:
    loss = nll / tokens
    return loss, math.exp(loss) if loss < 700 else math.inf  # exp(709.8) overflows a double


# --------------------------------------------------------------------------------------- generation
def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
    pad_id: int,
    max_positions: int | None,
    device: str,
) -> tuple[list[str], int]:
    """Greedy answers to chat ``conversations`` (each ending with the user turn), in left-padded
    batches of similar prompt lengths; returns the answers and the number of tokens generated. Prompts longer than the
    model's
    context minus ``max_new_tokens`` keep their last tokens (the question is at the end)."""
    import torch
    from transformers import GenerationConfig

    room = (max_positions - max_new_tokens) if max_positions else None
    if room is not None and room < 1:
        raise TrainingError(
            f"evaluate.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
            f"model's {max_positions}-token context"
        )
    prompts = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(ids[-room:] if room else ids)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id
    )
    # Batches of similar lengths: a 30-token prompt padded to 400 costs the whole 400 in every layer.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    generated = 0
    stops = set(stop_ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            chunk = [prompts[i] for i in index]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
            )
            for i, row in zip(index, out[:, width:].tolist(), strict=True):
                end = next((j for j, t in enumerate(row) if t in stops), len(row))
                generated += end
                answers[i] = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
    return answers, generated


# ---------------------------------------------------------------------------------------- evaluate
@dataclass
class _Model:
    """A model to measure and how to put it in that state (the base of an adapter: adapter off)."""

    name: str
    model: Any
    device: str
    state: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


def _models(model_dir: Path, base_model: str | Path | None) -> Iterator[_Model]:
    from kubellm.models.causal_lm import load_causal_lm

    cand = load_causal_lm(model_dir, base_model=base_model)
    log.info("candidate: %s", cand.source)
    yield _Model("candidate", cand.model, cand.device)
    if cand.is_adapter:
        yield _Model("base", cand.model, cand.device, cand.model.disable_adapter)
    elif base_model is not None:
        base = load_causal_lm(base_model)
        log.info("base: %s", base.source)
        yield _Model("base", base.model, base.device)


def _measures_code(setting: str, heldout: list[dict[str, Any]]) -> bool:
    """Whether to measure ``code_parse_rate``: ``auto`` when ≥ 80 % of the held-out references are
    Python code (:func:`kubellm.evaluate.metrics.is_code`; 100 % of the built-in instruction data's)."""
    if setting != "auto":
        return setting == "on"
    return bool(heldout) and sum(is_code(ex["reference"]) for ex in heldout) >= 0.8 * len(heldout)


def _check_vocab(model: Any, vocab_size: int, model_dir: Path, data_dir: Path) -> None:
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size > model_vocab:
        raise DataError(
            f"{data_dir}: the data's tokenizer has {vocab_size} tokens but {model_dir} embeds only "
            f"{model_vocab}: evaluate on data prepared with the model's tokenizer"
        )


def plan_for_dataset(cfg: EvalConfig, prepared: Any, tokenizer: Any, work_dir: Path) -> Any:
    """The ``evaluate.benchmarks`` plan for a prepared dataset (local tasks written into ``work_dir``):
    what the evaluation runs in-process and the deploy step runs against the served canary."""
    manifest = prepared.manifest
    return plan_benchmarks(
        cfg.benchmarks,
        heldout=prepared.heldout(),
        tokenizer=tokenizer,
        stop_ids=list(manifest.stop_token_ids) or [manifest.eos_token_id],
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        work_dir=work_dir,
        data_dir=prepared.path,
    )


def evaluate(
    cfg: EvalConfig,
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    tracker: Tracker | None = None,
) -> EvalResult:
    """Evaluate ``model_dir`` (a full model or a LoRA adapter) on the prepared dataset ``data_dir``,
    against ``base_model`` when given, apply the gate and write the results to ``out_dir`` (new, empty
    or earlier evaluation results, and holding none of the inputs: checked before any work)."""
    from kubellm.data.format import open_prepared
    from kubellm.models.causal_lm import adapter_base, is_adapter_dir

    t0 = time.perf_counter()
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    out = claim_output(
        out_dir, OUTPUT_KIND, inputs=[model_dir, data_dir, *([Path(base_model)] if base_model is not None else [])]
    )
    if not model_dir.is_dir():
        raise TrainingError(f"{model_dir}: model directory not found")
    prepared = open_prepared(data_dir)
    manifest = prepared.manifest
    if not manifest.splits.get("validation"):
        raise DataError(
            f"{data_dir}: the prepared dataset has no validation split to evaluate on (prepare it "
            "with split.validation_fraction > 0)"
        )
    split = prepared.load_split("validation")
    all_heldout = prepared.heldout()
    heldout = all_heldout[: cfg.num_prompts]
    tokenizer = prepared.load_tokenizer() if heldout or cfg.benchmarks else None
    if heldout and not tokenizer.chat_template:
        raise DataError(f"{prepared.tokenizer_dir}: the tokenizer has no chat template; held-out prompts need one")
    stop_ids = list(manifest.stop_token_ids) or [manifest.eos_token_id]
    code = _measures_code(cfg.code_metric, all_heldout)
    # Benchmark names are checked and local task data written before any model is loaded; the folder is
    # removed at the end, or by its finalizer if evaluation fails.
    bench_dir = tempfile.TemporaryDirectory(prefix="kubellm-bench-") if cfg.benchmarks else None
    plan = None if bench_dir is None else plan_for_dataset(cfg, prepared, tokenizer, Path(bench_dir.name))

    metrics: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    lower_is_better: frozenset[str] = frozenset()
    for m in _models(model_dir, base_model):
        prefix = "" if m.name == "candidate" else "base_"
        _check_vocab(m.model, manifest.vocab_size, model_dir, data_dir)
        with m.state():
            nll, tokens = heldout_nll(
                m.model,
                split,
                pad_id=manifest.pad_token_id,
                batch_size=cfg.batch_size,
                max_batches=cfg.max_batches,
                device=m.device,
            )
            if tokens == 0:
                raise DataError(f"{data_dir}: the validation split has no tokens in the loss (all labels -100)")
            loss, ppl = _perplexity(nll, tokens)
            metrics.update({f"{prefix}eval_loss": loss, f"{prefix}perplexity": ppl})
            if m.name == "candidate":
                metrics["eval_tokens"] = float(tokens)
            if heldout:
                t = time.perf_counter()
                answers[m.name], n_new = generate_answers(
                    m.model,
                    tokenizer,
                    [ex["messages"] for ex in heldout],
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size,
                    stop_ids=stop_ids,
                    pad_id=manifest.pad_token_id,
                    max_positions=getattr(m.model.config, "max_position_embeddings", None),
                    device=m.device,
                )
                refs = [ex["reference"] for ex in heldout]
                metrics.update({f"{prefix}{k}": v for k, v in mean_scores(answers[m.name], refs, code=code).items()})
                if m.name == "candidate":
                    metrics["gen_tokens_per_s"] = n_new / max(time.perf_counter() - t, 1e-9)
            if plan is not None:
                t = time.perf_counter()
                bench = run_benchmarks(plan, m.model, tokenizer, batch_size=cfg.batch_size)
                metrics.update({f"{prefix}{k}": v for k, v in bench["scores"].items()})
                lower_is_better |= {k for k, higher in bench["higher_is_better"].items() if not higher}
                log.info("%s: %d benchmark scores in %.1f s", m.name, len(bench["scores"]), time.perf_counter() - t)
        log.info("%s: perplexity %.4g over %d tokens", m.name, ppl, tokens)
    if bench_dir is not None:
        bench_dir.cleanup()
    if "base_perplexity" in metrics:
        metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["base_perplexity"]
    if heldout:
        metrics["num_prompts"] = float(len(heldout))

    samples = []
    for i, ex in enumerate(heldout):
        sample = {
            "prompt": ex["messages"][-1]["content"],
            "reference": ex["reference"],
            "candidate": answers["candidate"][i],
            **score(answers["candidate"][i], ex["reference"], code=code),
        }
        if "base" in answers:
            sample["base"] = answers["base"][i]
        samples.append(sample)

    missing = {"base": "no base model to compare with: pass --base (base_model)"}
    if manifest.kind != "instruct":
        missing["generation"] = "no generation metrics: pretraining data has no held-out prompts"
    elif cfg.num_prompts == 0:
        missing["generation"] = "no generation metrics: evaluate.num_prompts is 0"
    else:
        missing["generation"] = f"no generation metrics: {data_dir}/heldout.jsonl has no prompts"
    rules = apply_gate(cfg.gate, metrics, missing=missing, lower_is_better=lower_is_better)
    passed = all(r.passed for r in rules)
    reasons = [r.reason() for r in rules] or ["no gate rule is set (evaluate.gate): passes"]

    # the base measured above: the one given, or the one an adapter records
    base_ref = (
        base_model if base_model is not None else (adapter_base(model_dir) if is_adapter_dir(model_dir) else None)
    )
    curves = {"candidate training": read_history(model_dir)}
    if base_ref is not None and Path(base_ref).is_dir():
        curves["base training"] = read_history(base_ref)
    with atomic_dir(out, OUTPUT_KIND) as tmp:
        has_plot = plot_loss_curves(curves, tmp / PLOT_FILE)
        sources = {"candidate": str(model_dir), **({"base": str(base_ref)} if base_ref is not None else {})}
        (tmp / REPORT_FILE).write_text(
            render_report(
                title=model_dir.name,
                metrics=metrics,
                rules=rules,
                passed=passed,
                samples=samples,
                num_samples=cfg.num_samples_in_report,
                plot_name=PLOT_FILE if has_plot else None,
                sources=sources,
            ),
            encoding="utf-8",
        )
        result = EvalResult(
            metrics=metrics,
            passed=passed,
            reasons=reasons,
            report_path=out / REPORT_FILE,
            plot_path=out / PLOT_FILE if has_plot else None,
            samples=samples,
            rules=[r.to_json() for r in rules],
        )
        write_json_atomic(tmp / METRICS_FILE, result.to_json())
    log.info("gate %s in %.1f s: %s", "PASSED" if passed else "FAILED", time.perf_counter() - t0, "; ".join(reasons))

    if tracker is not None:
        tracker.log_metrics({**metrics, "gate_passed": float(passed)})
        tracker.set_tags(
            {
                "gate": "passed" if passed else "failed",
                GATE_RULES_TAG: json.dumps(result.rules),
                **({} if passed else {CLOSES_TAG: gate_failure(rules)}),
            }
        )
        tracker.log_artifact(out, "evaluation")
    return result
