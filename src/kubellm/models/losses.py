"""The token loss and token log-probabilities: one definition for training, evaluation and serving.

Every one of them is the fp32 ``log_softmax`` of the model's raw logits over the vocabulary
(:func:`log_probs`), read at the *next* token: position ``t`` predicts token ``t + 1``
(:func:`next_token_targets`, :func:`next_token_log_probs`). Training sums the negative log-likelihood of
the labelled tokens (:func:`token_nll_sum`, labels ``-100`` skipped); evaluation's perplexity sums the
same over the positions it scored (:func:`nll_sum`); serving reports the log-probability rows themselves
(``logprobs`` in the OpenAI API, :mod:`kubellm.serve.logprobs`). Here, below ``train``, ``evaluate`` and
``serve``, so none of them imports another for it.

The loss is ``nll_loss(log_probs(logits))``, which is what ``F.cross_entropy`` computes; with bf16 logits
on a CPU it takes the chunked path below, the same arithmetic without an fp32 copy of the logits.
"""

from __future__ import annotations

import functools
from typing import Any

#: The label of a position that is not scored (prompt tokens, padding): PyTorch's ``ignore_index``
#: default and Hugging Face's convention; the prepared data's ``labels`` use it (:mod:`kubellm.data.format`).
IGNORE_INDEX = -100


def log_probs(logits: Any) -> Any:
    """``log_softmax`` over the last (vocabulary) axis, in fp32 whatever the logits' dtype."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1)


def next_token_log_probs(logits: Any) -> Any:
    """Row ``t`` of ``logits[..., :-1, :]`` as log-probabilities: the distribution of token ``t + 1``
    given the tokens up to ``t`` (the last position predicts nothing within the sequence)."""
    return log_probs(logits[..., :-1, :])


def next_token_targets(labels: Any) -> Any:
    """``labels`` shifted left by one, :data:`IGNORE_INDEX` at the end: position ``t``'s target is the
    label of token ``t + 1``, aligned with the logits of position ``t``."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_nll_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token negative log-likelihood over the positions whose label is not -100.

    Summed rather than averaged so the caller can normalise by the tokens of the whole optimizer step
    (all micro-batches, all ranks): variable-length instruction rows then weigh every response token
    equally, as one big batch would.
    """
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest activation of the
    # step (8 × 256 × 4 k vocab × 4 B = 33 MB for the small preset) forward and again backward.
    return nll_sum(logits.reshape(-1, logits.size(-1)), next_token_targets(labels).reshape(-1))


def nll_sum(flat_logits: Any, targets: Any) -> Any:
    """The one definition of the token loss: summed negative log-likelihood of ``targets`` (one per row of
    ``flat_logits``; -100 rows skipped) under :func:`log_probs`. Training reaches it through
    :func:`token_nll_sum`; evaluation's perplexity calls it on the positions it scored."""
    import torch
    import torch.nn.functional as F

    if flat_logits.dtype == torch.bfloat16 and flat_logits.device.type == "cpu":
        return _bf16_nll().apply(flat_logits, targets)
    return F.nll_loss(log_probs(flat_logits), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@functools.cache
def _bf16_nll() -> Any:
    """The autograd function below, defined on first use (this module imports without torch)."""
    import torch

    class Bf16TokenNLL(torch.autograd.Function):
        """Cross-entropy of bf16 logits computed in fp32 row chunks, without an fp32 copy of the logits.

        ``F.cross_entropy(logits.float())`` makes a full fp32 copy, a log-softmax, a zero-filled
        gradient and a cast back: on a bf16 ``small``-preset step (2048 × 4096 logits) those were 17 %
        of the step. Here the forward keeps only a per-row log-sum-exp, and the backward writes
        ``softmax − one_hot`` straight into a bf16 gradient, 128 rows (2 MB of fp32) at a time. The
        arithmetic is the same as the fp32 path's (fp32 log-sum-exp, fp32 gradient rounded to bf16).
        """

        CHUNK = 128

        @staticmethod
        def forward(ctx: Any, logits: Any, targets: Any) -> Any:
            valid = targets != IGNORE_INDEX
            safe = targets.clamp_min(0)
            lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            for start in range(0, logits.shape[0], Bf16TokenNLL.CHUNK):
                rows = slice(start, start + Bf16TokenNLL.CHUNK)
                lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1).float()
            ctx.save_for_backward(logits, safe, valid, lse)
            return ((lse - picked) * valid).sum()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None]:
            logits, safe, valid, lse = ctx.saved_tensors
            out = torch.empty_like(logits)
            weight = valid.float() * grad
            for start in range(0, logits.shape[0], Bf16TokenNLL.CHUNK):
                rows = slice(start, start + Bf16TokenNLL.CHUNK)
                probs = logits[rows].float().sub_(lse[rows, None]).exp_()
                probs.scatter_add_(1, safe[rows, None], torch.full_like(lse[rows, None], -1.0))
                out[rows] = probs.mul_(weight[rows, None])
            return out, None

    return Bf16TokenNLL
