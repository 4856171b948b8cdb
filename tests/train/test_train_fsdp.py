"""Sharded training (``loop.parallelism: fsdp``) under a real ``torchrun --nproc_per_node 2`` (gloo, CPU).

FSDP and DDP train the same model on the same rows with the same seeds, so in fp32 their loss curves may
differ only by the order of floating-point sums (measured: ≤ 1e-7 relative over 30 steps); the tests
allow 1e-5. Sharded checkpoints resumed on another number of processes continue the uninterrupted
curve to the same tolerance (``global_batch_size`` keeps each step's rows). Each test starts torchrun
once for all its runs (:mod:`dist_runs`): a start costs ~10 s on these 2-core machines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubellm.config.train import FinetuneConfig, PretrainConfig
from kubellm.train.checkpoint import CHECKPOINTS, SHARDS
from kubellm.train.loop import HISTORY_FILE, RESULT_FILE, TrainingInterrupted, grad_accum_steps
from kubellm.train.pretrain import pretrain

BIN = Path(sys.executable).parent
RUNS = Path(__file__).with_name("dist_runs.py")
LOSS_RTOL = 1e-5
LOOP = {
    "max_steps": 30,
    "micro_batch_size": 2,
    "log_every": 1,
    "checkpoint_every": 30,
    "precision": "fp32",
    "eval_batches": 3,
}


def torchrun(plan: list[dict], tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(plan, default=str))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(RUNS), str(tmp_path / "plan.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]


def result(out: Path) -> dict:
    return json.loads((out / RESULT_FILE).read_text())


def assert_same_curve(run: Path, reference: Path) -> None:
    a, b = history(run), history(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 31))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_RTOL), x["step"]
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=LOSS_RTOL)
    assert a[-1]["loss"] < a[0]["loss"] - 0.3  # it learned: the comparison is not between two flat lines


@pytest.mark.slow
def test_fsdp_trains_like_ddp_with_half_the_state_per_rank_and_exports_one_model(
    pretrain_data: Path, instruct_data: Path, tmp_path: Path
):
    from kubellm.config.serve import ServeConfig
    from kubellm.data.format import open_prepared
    from kubellm.evaluate.run import heldout_nll
    from kubellm.models.causal_lm import load_causal_lm
    from kubellm.serve.predictor import LLMModel

    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "optim": {"lr": 5e-3, "warmup_steps": 2}}
    from kubellm.train.memory import Plan, estimate, model_shape

    runs = {name: tmp_path / name for name in ("ddp", "fsdp", "lora_ddp", "lora_fsdp")}
    torchrun(
        [
            {"stage": "pretrain", "config": {"loop": LOOP}, "data": pretrain_data, "out": runs["ddp"]},
            {
                "stage": "pretrain",
                "config": {"loop": {**LOOP, "parallelism": "fsdp"}},
                "data": pretrain_data,
                "out": runs["fsdp"],
            },
            {
                "stage": "finetune",
                "config": {**lora, "loop": LOOP},
                "data": instruct_data,
                "base": runs["ddp"],
                "out": runs["lora_ddp"],
            },
            {
                "stage": "finetune",
                "config": {**lora, "merge": True, "loop": {**LOOP, "parallelism": "fsdp"}},
                "data": instruct_data,
                "base": runs["ddp"],
                "out": runs["lora_fsdp"],
            },
        ],
        tmp_path,
    )

    shape = model_shape(runs["ddp"])
    for sharded, plain in (("fsdp", "ddp"), ("lora_fsdp", "lora_ddp")):
        assert_same_curve(runs[sharded], runs[plain])
        s, p = result(runs[sharded]), result(runs[plain])
        assert (s["parallelism"], p["parallelism"]) == ("fsdp", "ddp")
        assert s["trainable_parameters"] == p["trainable_parameters"]
        # parameters + gradients + AdamW state of the fullest rank, read from its tensors (local shards)
        assert 0 < s["rank_state_bytes"] <= 0.6 * p["rank_state_bytes"], (s["rank_state_bytes"], p["rank_state_bytes"])
        # and the memory planner's figure for them
        for r in (s, p):
            plan = Plan(
                sharded,
                shape,
                32,
                2,
                "fp32",
                r["parallelism"],
                2,
                False,
                device="cpu",
                lora_rank=4 if sharded.startswith("lora") else None,
            )
            assert estimate(plan).state == pytest.approx(r["rank_state_bytes"], rel=0.15)

    # one consolidated Hugging Face model, the unsharded run's weights under the same names
    a, b = load_file(str(runs["fsdp"] / "model.safetensors")), load_file(str(runs["ddp"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    adapter = load_file(str(runs["lora_fsdp"] / "adapter_model.safetensors"))
    assert adapter.keys() == load_file(str(runs["lora_ddp"] / "adapter_model.safetensors")).keys()
    assert adapter and all("lora_" in k for k in adapter)  # only the adapter trained; the base is not in it
    assert not list(runs["fsdp"].glob(f"{CHECKPOINTS}/step-*"))  # sharded checkpoints removed at the end

    # evaluate's and serve's loaders read the exports: the same held-out loss as the unsharded outputs
    prepared = open_prepared(instruct_data)
    val = prepared.load_split("validation")

    def nll(model_dir: Path) -> float:
        model = load_causal_lm(model_dir, device="cpu").model
        total, tokens = heldout_nll(
            model, val, pad_id=prepared.manifest.pad_token_id, batch_size=8, max_batches=2, device="cpu"
        )
        return total / tokens

    assert nll(runs["lora_fsdp"]) == pytest.approx(nll(runs["lora_ddp"]), rel=1e-4)
    assert nll(runs["lora_fsdp"] / "merged") == pytest.approx(nll(runs["lora_fsdp"]), rel=1e-4)
    served = LLMModel(ServeConfig(precision="fp32"), str(runs["fsdp"]))
    assert served.load() and served.engine is not None


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_another_world_size_and_skip_a_truncated_shard(
    pretrain_data: Path, tmp_path: Path, sigterm_at, caplog: pytest.LogCaptureFixture
):
    loop = {**LOOP, "checkpoint_every": 10, "global_batch_size": 4, "parallelism": "fsdp"}
    cfg = PretrainConfig.model_validate({"loop": loop})
    one_to_two, two_to_one, full = tmp_path / "one_to_two", tmp_path / "two_to_one", tmp_path / "full"
    # 1 process, stopped by SIGTERM at step 15: checkpoints at 10 and 15, written by one rank
    with pytest.raises(TrainingInterrupted):
        pretrain(cfg, pretrain_data, one_to_two, sigterm_at(15))
    torchrun(
        [
            {"stage": "pretrain", "config": {"loop": loop}, "data": pretrain_data, "out": full},
            {"stage": "pretrain", "config": {"loop": loop}, "data": pretrain_data, "out": two_to_one, "sigterm_at": 15},
            {"stage": "pretrain", "config": {"loop": loop}, "data": pretrain_data, "out": one_to_two},  # resumes on 2
        ],
        tmp_path,
    )
    assert result(one_to_two)["resumed_from_step"] == 15
    assert_same_curve(one_to_two, full)

    newest = two_to_one / CHECKPOINTS / "step-00000015"
    assert sorted(p.name for p in (newest / SHARDS).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    damaged = tmp_path / "damaged"
    shutil.copytree(two_to_one, damaged)
    shard = damaged / CHECKPOINTS / "step-00000015" / SHARDS / "__1_0.distcp"
    with shard.open("r+b") as f:  # rank 1's shard cut short, as a full volume leaves it
        f.truncate(shard.stat().st_size // 2)
    # a save killed before its marker: a later step that must not count
    shutil.copytree(damaged / CHECKPOINTS / "step-00000010", damaged / CHECKPOINTS / "step-00000020")
    (damaged / CHECKPOINTS / "step-00000020" / "COMPLETE").unlink()

    res = pretrain(cfg, pretrain_data, two_to_one)  # 2 → 1
    assert res.resumed_from_step == 15
    assert_same_curve(two_to_one, full)
    caplog.clear()
    res = pretrain(cfg, pretrain_data, damaged)
    assert res.resumed_from_step == 10
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "__1_0.distcp" in skipped[0] and "truncated" in skipped[0]
    assert_same_curve(damaged, full)


def test_fsdp_settings_are_checked_with_one_line_naming_the_field(pretrain_data: Path, tmp_path: Path):
    from pydantic import ValidationError

    from kubellm.errors import TrainingError

    with pytest.raises(ValidationError, match="global_batch_size"):
        PretrainConfig.model_validate({"loop": {"global_batch_size": 6, "micro_batch_size": 4}})
    with pytest.raises(ValidationError, match="either grad_accum_steps or global_batch_size"):
        PretrainConfig.model_validate({"loop": {"global_batch_size": 8, "grad_accum_steps": 2}})
    with pytest.raises(ValidationError, match="fsdp cannot shard 4-bit"):
        FinetuneConfig.model_validate({"quantization": "4bit", "loop": {"parallelism": "fsdp"}})
    # a global batch that fits the config but not this attempt's process count: refused when it starts
    loop = PretrainConfig.model_validate({"loop": {"global_batch_size": 8, "micro_batch_size": 2}}).loop
    assert [grad_accum_steps(loop, n, "pretrain") for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(
        TrainingError,
        match=r"pretrain\.loop\.global_batch_size \(8\) is not a multiple of "
        r"micro_batch_size × processes \(2 × 3\)",
    ):
        grad_accum_steps(loop, 3, "pretrain")
    # a run directory keeps its parallelism: the checkpoint formats differ
    out = tmp_path / "run"
    pretrain(PretrainConfig.model_validate({"loop": {**LOOP, "max_steps": 2}}), pretrain_data, out)
    with pytest.raises(TrainingError, match=r"loop\.parallelism"):
        pretrain(
            PretrainConfig.model_validate({"loop": {**LOOP, "max_steps": 2, "parallelism": "fsdp"}}), pretrain_data, out
        )


def test_ranks_share_the_checksum_reading_and_together_find_a_changed_shard(tmp_path: Path):
    from kubellm.errors import TrainingError
    from kubellm.train.checkpoint import file_records, verify_checkpoint, write_checksums

    ckpt = tmp_path / "step-00000010"
    (ckpt / SHARDS).mkdir(parents=True)
    for name in (
        "trainer.pt",
        "rng.pt",
        "state.json",
        f"{SHARDS}/.metadata",
        f"{SHARDS}/__0_0.distcp",
        f"{SHARDS}/__1_0.distcp",
    ):
        (ckpt / name).write_bytes(os.urandom(256))
    write_checksums(ckpt, file_records(sorted((ckpt / SHARDS).iterdir()), ckpt))  # as the ranks record them
    assert all(verify_checkpoint(ckpt, (i, 2)) for i in range(2))

    shard = ckpt / SHARDS / "__1_0.distcp"
    shard.write_bytes(bytes(b ^ 1 for b in shard.read_bytes()))  # same size, other bytes
    failed = []
    for i in range(2):
        try:
            verify_checkpoint(ckpt, (i, 2))
        except TrainingError as err:
            failed.append(str(err))
    assert len(failed) == 1 and "__1_0.distcp: checksum mismatch" in failed[0]  # read by exactly one rank
    with pytest.raises(TrainingError, match="checksum mismatch"):
        verify_checkpoint(ckpt)
