"""Log-probabilities of prompt and generated tokens, as OpenAI's legacy completions and vLLM report them.

lm-evaluation-harness scores every multiple-choice task (most standard benchmarks) through them: it sends
``prompt = context + continuation`` with ``echo: true, logprobs: 1, max_tokens: 1`` and sums the prompt
tokens' log-probabilities after the context. So the values must be what the model itself gives:

- they are ``log_softmax`` of the model's **raw** logits in fp32 (vLLM's default ``raw_logprobs``), taken
  before temperature, top-p or ``min_tokens`` change the distribution that is sampled from: the
  training loss's own log-probabilities (:func:`kubellm.models.losses.log_probs`);
- a prompt's log-probabilities come from one forward pass over the unpadded positions (right padding
  when several prompts share the pass: positions and the causal mask of every real token are then exactly
  those of the prompt alone); the first prompt token has none (``null``);
- each entry carries the ``k`` most likely tokens at that position plus the chosen token (vLLM: "up to
  logprobs+1 elements"), so a client can tell whether the chosen token was the greedy one.

A forward pass's logits are ``tokens × vocab`` floats; prompts share one pass only while that stays under
``_LOGITS_BUDGET`` (256 MB: 2,048 tokens of a 32 k vocabulary), so a batch of long prompts on a large
vocabulary runs one prompt at a time instead of allocating gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Floats of logits one prompt forward pass may hold (64 M x 4 bytes = 256 MB).
_LOGITS_BUDGET = 64 * 1024 * 1024


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token, its log-probability and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    """``(token, logprob)`` of the ``k`` most likely tokens, best first, plus the chosen one if it is not
    among them."""


def pick(logprobs: Any, token: int, k: int) -> TokenLogprob:
    """The entry of ``token`` in one position's ``log_softmax`` row (a 1-D tensor), with its top ``k``."""
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    chosen = float(logprobs[token])
    if all(t != token for t, _ in top):
        top.append((token, chosen))
    return TokenLogprob(token, chosen, tuple(top))


def prompt_logprobs(
    model: Any,
    prompts: list[list[int]],
    ks: list[int],
    *,
    device: str,
    precision: str,
    adapter_names: list[str] | None = None,
) -> list[list[TokenLogprob | None]]:
    """Per prompt: ``None`` for the first token, then each token's entry given the tokens before it.

    ``adapter_names``: each prompt's LoRA adapter in a peft model serving several (peft's mixed batch).
    """
    out: list[list[TokenLogprob | None]] = []
    vocab = int(model.config.vocab_size)
    start = 0
    while start < len(prompts):
        end, width = start + 1, len(prompts[start])
        while end < len(prompts) and (end - start + 1) * max(width, len(prompts[end])) * vocab <= _LOGITS_BUDGET:
            width = max(width, len(prompts[end]))
            end += 1
        names = None if adapter_names is None else adapter_names[start:end]
        out += _forward(model, prompts[start:end], ks[start:end], device, precision, names)
        start = end
    return out


def _forward(
    model: Any, prompts: list[list[int]], ks: list[int], device: str, precision: str, adapter_names: list[str] | None
) -> list[list[TokenLogprob | None]]:
    import torch

    from kubellm.models.losses import next_token_log_probs
    from kubellm.models.precision import autocast

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[row, : len(p)] = 1
    with torch.inference_mode(), autocast(precision, device):
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
    out: list[list[TokenLogprob | None]] = []
    with torch.inference_mode():
        for row, (p, k) in enumerate(zip(prompts, ks, strict=True)):
            # Position i predicts token i + 1: the last position predicts nothing in the prompt.
            rows = next_token_log_probs(logits[row, : len(p)]).cpu()
            out.append([None] + [pick(rows[i], p[i + 1], k) for i in range(len(p) - 1)])
    return out


class StepLogprobs:
    """A logits processor keeping the current step's ``log_softmax`` of the rows that asked for it.

    It must run first, on the raw logits; :meth:`take` reads the chosen token's entry once ``generate``
    has picked it (the stopping criterion runs after every step).
    """

    def __init__(self, wanted: list[int | None]) -> None:
        self.rows = [i for i, k in enumerate(wanted) if k is not None]
        self._position = {row: i for i, row in enumerate(self.rows)}
        self.ks = wanted
        self._last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        from kubellm.models.losses import log_probs

        self._last = log_probs(scores[self.rows]).cpu()
        return scores

    def take(self, row: int, token: int) -> TokenLogprob:
        k = self.ks[row]
        assert k is not None and self._last is not None
        return pick(self._last[self._position[row]], token, k)
