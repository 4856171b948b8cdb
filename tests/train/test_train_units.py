"""Fast unit tests of the loop's parts: schedule, sampler, collation, loss masking, checkpoints, LoRA targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kubellm.errors import TrainingError
from kubellm.models.losses import token_nll_sum
from kubellm.train import checkpoint as ckpt
from kubellm.train.batches import PadCollator, StreamSampler
from kubellm.train.loop import TrainResult, lr_factor


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert lr_factor(20, warmup=4, total=20, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(12, warmup=4, total=20, min_ratio=0.1) == pytest.approx(0.55)  # cosine midpoint


def _take(sampler: StreamSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_seeded_resumable_and_covers_every_row_each_epoch():
    full = _take(StreamSampler(10, 3, seed=7), 8)
    assert full == _take(StreamSampler(10, 3, seed=7), 8)
    assert full != _take(StreamSampler(10, 3, seed=8), 8)
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # resuming at a position continues the very same stream
    assert _take(StreamSampler(10, 3, seed=7, start=9), 5) == full[3:]


def test_sampler_shards_the_single_process_stream_over_ranks():
    single = [i for b in _take(StreamSampler(11, 2, seed=1), 6) for i in b]
    r0 = _take(StreamSampler(11, 2, seed=1, rank=0, world_size=2), 3)
    r1 = _take(StreamSampler(11, 2, seed=1, rank=1, world_size=2), 3)
    assert [i for a, b in zip(r0, r1, strict=True) for i in a + b] == single


def test_collator_pads_with_pad_id_and_masks_labels():
    batch = PadCollator(pad_id=9)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    same = PadCollator(pad_id=9)([{"input_ids": [1, 2], "labels": [1, 2]}] * 2)
    assert "attention_mask" not in same  # packed blocks need none


def test_masked_tokens_do_not_contribute_to_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 6, 7, -100, -100]])
    loss = token_nll_sum(logits, labels)
    # by hand: position t predicts label t+1, only where that label is not -100
    logp = torch.log_softmax(logits.detach(), -1)
    expected = -sum(logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(4) if labels[b, t + 1] >= 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # logits at positions whose next label is masked get no gradient at all
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0


def _fake_state(step: int) -> ckpt.TrainState:
    return ckpt.TrainState(
        step=step, samples_seen=step * 4, tokens_seen=step * 100, history=[{"step": step, "loss": 1.0}]
    )


def _save(out: Path, step: int, keep: int = 5) -> Path:
    return ckpt.save_checkpoint(
        out,
        _fake_state(step),
        weights={"w": torch.full((2,), float(step))},
        trainer={"optimizer": {"state": {}}},
        rng=[{"torch": torch.get_rng_state()}],
        keep=keep,
    )


def test_checkpoints_round_trip_prune_and_ignore_incomplete(tmp_path: Path):
    assert ckpt.latest_complete(tmp_path) is None  # no checkpoint: a fresh start, not an error
    for step in (10, 20, 30):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [20, 30]
    # a newer directory without its completion marker (a crash mid-copy) is never picked
    broken = ckpt.checkpoint_root(tmp_path) / "step-00000040"
    broken.mkdir()
    (broken / ckpt.WEIGHTS).write_bytes(b"partial")
    c = ckpt.load_checkpoint(ckpt.latest_complete(tmp_path))
    assert c.state.step == 30 and c.state.samples_seen == 120
    assert c.weights["w"].tolist() == [30.0, 30.0]
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".step-*"))  # no temp dirs left behind


def test_unreadable_checkpoint_is_a_one_line_error(tmp_path: Path):
    path = _save(tmp_path, 5)
    (path / ckpt.TRAINER).write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="unreadable checkpoint") as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_run_spec_mismatch_names_the_changed_fields(tmp_path: Path):
    spec = {"model": {"preset": "tiny"}, "loop": {"max_steps": 10}}
    ckpt.check_run_spec(tmp_path, spec)  # nothing recorded yet: fine
    ckpt.record_run_spec(tmp_path, spec)
    ckpt.check_run_spec(tmp_path, json.loads(json.dumps(spec)))
    with pytest.raises(TrainingError, match=r"loop\.max_steps changed"):
        ckpt.check_run_spec(tmp_path, {**spec, "loop": {"max_steps": 11}})


def test_train_result_json_round_trip(tmp_path: Path):
    r = TrainResult(
        output_dir=tmp_path,
        steps=3,
        final_loss=1.5,
        val_loss=None,
        tokens_seen=96,
        seconds=0.5,
        tokens_per_s=192.0,
        resumed_from_step=2,
        precision="fp32",
        parameters=10,
        trainable_parameters=4,
    )
    (tmp_path / "kubellm_train.json").write_text(json.dumps(r.to_json()))
    assert TrainResult.read(tmp_path) == r


def _llama(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **over}))


def test_lora_targets_detected_per_architecture_and_checked():
    from kubellm.train.lora import target_modules

    assert target_modules(_llama()) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert target_modules(_llama(), ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(TrainingError, match="qkv"):
        target_modules(_llama(), ["qkv"])

    class Tiny(torch.nn.Module):  # an unknown architecture: every Linear except the output head
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4)
            self.mix = torch.nn.Linear(4, 4)
            self.act = torch.nn.GELU()
            self.head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    assert target_modules(Tiny()) == ["mix"]


def test_qlora_without_gpu_is_a_clear_error():
    from kubellm.train.lora import check_qlora_available

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(TrainingError, match="needs a CUDA GPU"):
        check_qlora_available()


def test_nan_free_schedule_for_zero_warmup():
    assert not math.isnan(lr_factor(0, warmup=0, total=1, min_ratio=0.0))
