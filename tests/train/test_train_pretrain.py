"""Pretraining end to end on the toy corpus: learning, outputs, resume, SIGTERM, finished-run reruns."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from kubellm.config.train import PretrainConfig
from kubellm.errors import TrainingError
from kubellm.fsutil import OUTPUT_MARKER, OutputError
from kubellm.tracking.base import NullTracker
from kubellm.train import checkpoint as ckpt
from kubellm.train.loop import HISTORY_FILE, RESULT_FILE, TrainingInterrupted, TrainResult
from kubellm.train.pretrain import pretrain


def tiny_cfg(**loop) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "model": {"preset": "tiny"},
            "optim": {"lr": 3e-3, "warmup_steps": 3},
            "loop": {
                "max_steps": 12,
                "micro_batch_size": 4,
                "grad_accum_steps": 2,
                "log_every": 3,
                "checkpoint_every": 4,
                "eval_every": 6,
                "eval_batches": 2,
                "precision": "fp32",
                **loop,
            },
        }
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_pretrain_learns_and_writes_a_complete_model_dir(pretrain_data: Path, tmp_path: Path):
    from kubellm.models.causal_lm import load_causal_lm

    tracker = NullTracker()
    out = tmp_path / "out"
    res = pretrain(tiny_cfg(max_steps=30, log_every=5, eval_every=None), pretrain_data, out, tracker)

    history = [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= h.keys() for h in history)
    assert "val_loss" in history[-1] and "val_loss" not in history[0]
    # a learnable corpus: the loss falls well below its start and below uniform guessing (ln 330 ≈ 5.8)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert res.val_loss is not None and res.val_loss < 0.6 * history[0]["loss"]
    assert res.steps == 30 and res.resumed_from_step is None and res.precision == "fp32"
    assert res.final_loss == history[-1]["loss"]
    assert res.tokens_seen == 30 * 4 * 2 * 32 and res.parameters == res.trainable_parameters > 50_000
    assert TrainResult.read(out) == res

    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        HISTORY_FILE,
        RESULT_FILE,
    } <= names
    assert [p.name for p in out.glob(".*")] == [OUTPUT_MARKER], "no staging leftovers"
    assert ckpt.complete_checkpoints(out) == []  # a finished run keeps no step checkpoints
    assert tracker.last("loss") == history[-1]["loss"] and tracker.last("grad_norm") is not None
    assert [s for s, m in tracker.metrics if "lr" in m] == [5, 10, 15, 20, 25, 30]

    lm = load_causal_lm(out, device="cpu")
    assert lm.model.config.vocab_size >= len(lm.tokenizer)
    assert lm.model.config.max_position_embeddings == 32

    # rerunning a finished directory is a no-op that returns the same result
    again = pretrain(tiny_cfg(max_steps=30, log_every=5, eval_every=None), pretrain_data, out)
    assert again == res
    with pytest.raises(TrainingError, match="different settings"):
        pretrain(tiny_cfg(max_steps=31, log_every=5, eval_every=None), pretrain_data, out)


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(pretrain_data: Path, tmp_path: Path, sigterm_at):
    straight = pretrain(tiny_cfg(), pretrain_data, tmp_path / "straight")

    out = tmp_path / "interrupted"
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or the test runner's own (pytest-xdist's worker)
    with pytest.raises(TrainingInterrupted) as err:
        pretrain(tiny_cfg(), pretrain_data, out, sigterm_at(6))
    assert err.value.exit_code == 143 and "step 6/12" in str(err.value)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4, 6]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back
    assert not (out / RESULT_FILE).exists()

    # Resume from step 4, in the middle of a logging window (steps 4-6), to check that the window
    # carries over; a newer checkpoint without its completion marker must be ignored.
    shutil.rmtree(ckpt.checkpoint_root(out) / "step-00000006")
    fake = ckpt.checkpoint_root(out) / "step-00000008"
    fake.mkdir()
    (fake / ckpt.STATE).write_text("{}")
    resumed = pretrain(tiny_cfg(), pretrain_data, out)
    assert resumed.resumed_from_step == 4 and resumed.steps == 12

    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # the same LR curve and data order: the history after the resume is the uninterrupted one
    h_straight = (tmp_path / "straight" / HISTORY_FILE).read_text().splitlines()
    h_resumed = (out / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(x)["lr"] for x in h_resumed] == [json.loads(x)["lr"] for x in h_straight]
    for x, y in zip(h_resumed, h_straight, strict=True):
        assert json.loads(x)["loss"] == pytest.approx(json.loads(y)["loss"], abs=1e-6)
    assert resumed.val_loss == pytest.approx(straight.val_loss, abs=1e-6)
    assert resumed.tokens_seen == straight.tokens_seen


def test_sigterm_runs_an_earlier_handler_but_exits_only_after_the_checkpoint(
    pretrain_data: Path, tmp_path: Path, sigterm_at
):
    """The MLflow stage run installs a handler that marks its run KILLED and then exits; inside the loop
    it still runs, and the exit waits for the checkpoint."""
    seen = []

    def outer(signum, frame):
        seen.append(signum)
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, outer)
    try:
        with pytest.raises(TrainingInterrupted):
            pretrain(tiny_cfg(max_steps=6), pretrain_data, tmp_path, sigterm_at(3))
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is outer
        assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_auto_precision_and_loader_workers_keep_the_same_run(pretrain_data: Path, tmp_path: Path):
    """precision auto picks bf16 autocast where the CPU has it; loading batches in a worker process
    changes nothing about the data order (same weights)."""
    from kubellm.models.precision import resolve_precision

    a = pretrain(tiny_cfg(max_steps=4, precision="auto"), pretrain_data, tmp_path / "a")
    b = pretrain(tiny_cfg(max_steps=4, precision="auto", num_workers=1), pretrain_data, tmp_path / "b")
    assert a.precision == b.precision == resolve_precision("auto", "cpu")
    assert math.isfinite(a.final_loss)
    wa, wb = weights(a.output_dir), weights(b.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_output_dir_that_holds_something_else_is_refused(pretrain_data: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        pretrain(tiny_cfg(), pretrain_data, tmp_path)
