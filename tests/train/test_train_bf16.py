"""The bf16 fast path on the CPU and the batched perplexity: same numbers as the plain way, within bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubellm.config.train import LoraConfig, PretrainConfig
from kubellm.models.losses import token_nll_sum
from kubellm.models.precision import CPU_BF16_ATTENTION, cpu_bf16_fast_path
from kubellm.train.loop import HISTORY_FILE


def _llama(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **over}))
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain multi-head and grouped-query attention
def test_cpu_bf16_attention_matches_sdpa_within_bf16_error(kv_heads: int):
    model = _llama(num_key_value_heads=kv_heads).eval()
    ids = torch.randint(3, 96, (3, 24), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(ids)
    padded[1, 17:] = 0
    padded[2, 5:] = 0
    for mask in (None, padded):
        keep = (mask if mask is not None else torch.ones_like(ids)).bool()
        with torch.no_grad():
            exact = model(input_ids=ids, attention_mask=mask).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = model(input_ids=ids, attention_mask=mask).logits.float()
            with cpu_bf16_fast_path(model, "bf16", "cpu") as on:
                assert on and model.config._attn_implementation == CPU_BF16_ATTENTION
                fp32_inside = model(input_ids=ids, attention_mask=mask).logits  # no autocast: SDPA as before
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fast = model(input_ids=ids, attention_mask=mask).logits.float()
        assert torch.equal(fp32_inside, exact)
        plain_err = (plain - exact)[keep].abs().max().item()
        fast_err = (fast - exact)[keep].abs().max().item()
        assert fast_err <= 2 * plain_err + 1e-2, (fast_err, plain_err)
    assert model.config._attn_implementation == "sdpa"  # restored: saved configs never name the fast path


def test_fast_path_stays_off_for_fp32_and_cuda():
    model = _llama()
    for precision, device in (("fp32", "cpu"), ("bf16", "cuda")):
        with cpu_bf16_fast_path(model, precision, device) as on:
            assert not on and model.config._attn_implementation == "sdpa"


def test_bf16_token_nll_equals_fp32_cross_entropy_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 50, 300, generator=gen) * 4).bfloat16()
    labels = torch.randint(0, 300, (3, 50), generator=gen)
    labels[0, :20] = -100
    labels[2, 30:] = -100
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = token_nll_sum(ours, labels)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    expected = F.cross_entropy(ref.reshape(-1, 300).float(), targets, ignore_index=-100, reduction="sum")
    (loss * 0.5).backward()
    (expected * 0.5).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ours.grad.dtype == torch.bfloat16
    assert torch.allclose(ours.grad.float(), ref.grad.float(), atol=2e-3)
    assert ours.grad[0, :19].abs().sum() == 0  # masked positions get no gradient


def test_adapter_dropout_is_shared_per_input_and_drops_at_rate_p():
    from kubellm.train.lora import apply_lora

    model = apply_lora(_llama(), LoraConfig(dropout=0.25), seed=0)
    dropouts = {
        id(d)
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
        for d in m.lora_dropout.values()
    }
    assert len(dropouts) == 1  # one shared module for all 14 adapters
    drop = next(m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout"))
    model.train()
    x = torch.ones(64, 128, 32)
    out = drop(x)
    assert drop(x) is out  # q/k/v receive the same input: one mask
    again = drop(x.clone())
    assert not torch.equal(again, out)  # another input: a fresh mask
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))
    model.eval()
    assert drop(x) is x


def test_bf16_pretraining_follows_the_fp32_loss_curve(pretrain_data: Path, tmp_path: Path):
    from kubellm.train.pretrain import pretrain

    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = PretrainConfig.model_validate(
            {
                "model": {"preset": "tiny"},
                "optim": {"lr": 3e-3, "warmup_steps": 3},
                "loop": {"max_steps": 12, "micro_batch_size": 4, "log_every": 2, "precision": precision},
            }
        )
        res = pretrain(cfg, pretrain_data, tmp_path / precision)
        assert res.precision == precision
        curves[precision] = [
            json.loads(x)["loss"] for x in (tmp_path / precision / HISTORY_FILE).read_text().splitlines()
        ]
    assert curves["bf16"][-1] < 0.8 * curves["bf16"][0]  # it learns
    assert max(abs(b / f - 1) for f, b in zip(curves["fp32"], curves["bf16"], strict=True)) < 0.02


def test_batched_perplexity_equals_a_forward_pass_per_row(instruct_data: Path):
    from kubellm.data.format import open_prepared
    from kubellm.evaluate.run import heldout_nll

    prepared = open_prepared(instruct_data)
    split = prepared.load_split("validation")
    model = _llama(vocab_size=prepared.manifest.vocab_size + 8).eval()
    nll, tokens = heldout_nll(
        model, split, pad_id=prepared.manifest.pad_token_id, batch_size=8, max_batches=None, device="cpu"
    )
    ref_nll = ref_tokens = 0
    with torch.no_grad():
        for row in split:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            ref_nll += token_nll_sum(model(input_ids=ids).logits, labels).item()
            ref_tokens += int((labels[:, 1:] != -100).sum())
    assert tokens == ref_tokens > 0
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    first, n_first = heldout_nll(
        model, split, pad_id=prepared.manifest.pad_token_id, batch_size=4, max_batches=1, device="cpu"
    )
    assert 0 < n_first < tokens and first < nll  # max_batches: the first 4 rows only
