"""The commands as users and pods run them: one-line input errors, kill -9, SIGTERM, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kubellm.cli import main
from kubellm.config.train import PretrainConfig
from kubellm.fsutil import OUTPUT_MARKER
from kubellm.train import checkpoint as ckpt
from kubellm.train.loop import HISTORY_FILE, RESULT_FILE
from kubellm.train.pretrain import pretrain

BIN = Path(sys.executable).parent
LOOP = {"micro_batch_size": 2, "log_every": 10, "precision": "fp32"}


def sets(section: str, loop: dict) -> list[str]:
    """``--set`` of the loop fields on a bare config (``{}``: the built-in field defaults, which the
    in-process runs these tests compare with use), not the embedded default's bigger model."""
    bare = Path(__file__).with_name("bare.yaml")
    return [
        "--config",
        str(bare),
        "--set",
        "tracking.enabled=false",
        *(a for k, v in loop.items() for a in ("--set", f"{section}.loop.{k}={v}")),
    ]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:  # log.setup is patched out: its handler would outlive capsys
        main(argv)
    return exit_.value.code, capsys.readouterr().err


# -- input errors: one line, exit 2, before any training ------------------------------------------------
def test_input_errors_are_one_line(
    pretrain_data: Path,
    instruct_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.chdir(tmp_path)  # no configs/local.yaml here: defaults plus --set
    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    bin_only = tmp_path / "bin-model"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    out = str(tmp_path / "out")
    cases = [
        (["pretrain", "--data", str(tmp_path / "nope"), "--out", out], "data directory not found"),
        (["pretrain", "--data", str(bin_only), "--out", out], "not a prepared dataset"),
        (["pretrain", "--data", str(instruct_data), "--out", out], "needs pretraining data"),
        (["finetune", "--data", str(pretrain_data), "--out", out, "--base", str(bin_only)], "needs instruction data"),
        (["finetune", "--data", str(instruct_data), "--out", out], "no base model"),
        (["finetune", "--data", str(instruct_data), "--out", out, "--base", str(bin_only)], "only pickle weights"),
        (["finetune", "--data", str(instruct_data), "--out", out, "--base", str(pretrain_data)], "no config.json"),
        (["finetune", "--data", str(instruct_data), "--out", out, "--base", "./missing/model"], "directory not found"),
        (
            ["finetune", "--data", str(instruct_data), "--out", out, "--base", "kubellm-test/no-such-model"],
            "not available from the Hugging Face Hub",
        ),
        (
            [
                "finetune",
                "--data",
                str(instruct_data),
                "--out",
                out,
                "--base",
                str(bin_only),
                "--set",
                "finetune.quantization=4bit",
            ],
            "needs a CUDA GPU",
        ),
        (
            ["pretrain", "--data", str(pretrain_data), "--out", out, "--set", "pretrain.loop.max_step=3"],
            "unknown field",
        ),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "CUDA" not in c[1]]
    for argv, message in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (argv, err)
    assert not (tmp_path / "out" / ckpt.CHECKPOINTS / ckpt.RUN_SPEC).exists()  # failures claim no output


# -- real processes ----------------------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before {what}: {Path(proc.args[-1]).name}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _start_pretrain(data: Path, out: Path, loop: dict, cwd: Path) -> subprocess.Popen:
    """`kubellm pretrain` in its own process, stderr to cwd/stderr.log."""
    argv = ["pretrain", "--data", str(data), "--out", str(out), *sets("pretrain", loop)]
    log = (cwd / "stderr.log").open("w")
    return subprocess.Popen([str(BIN / "kubellm"), *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_from_the_last_complete_checkpoint(pretrain_data: Path, tmp_path: Path):
    loop = {**LOOP, "max_steps": 200, "checkpoint_every": 10}
    out = tmp_path / "out"
    proc = _start_pretrain(pretrain_data, out, loop, tmp_path)
    _wait_for(lambda: any(s >= 20 for s, _ in ckpt.complete_checkpoints(out)), proc, "checkpoint 20")
    proc.kill()  # SIGKILL: no handler runs, nothing gets flushed
    assert proc.wait(timeout=30) == -signal.SIGKILL
    last = ckpt.complete_checkpoints(out)[-1][0]
    assert not (out / RESULT_FILE).exists()

    res = pretrain(PretrainConfig.model_validate({"loop": loop}), pretrain_data, out)
    assert res.resumed_from_step == last and res.steps == 200  # lost only the steps after `last`
    steps = [json.loads(x)["step"] for x in (out / HISTORY_FILE).read_text().splitlines()]
    assert steps == list(range(10, 201, 10))  # no duplicated or missing lines across the kill


@pytest.mark.slow
def test_sigterm_exits_143_with_a_checkpoint_and_rerun_resumes(pretrain_data: Path, tmp_path: Path):
    loop = {**LOOP, "max_steps": 200, "checkpoint_every": 1000}
    out = tmp_path / "out"
    proc = _start_pretrain(pretrain_data, out, loop, tmp_path)
    _wait_for(
        lambda: (out / HISTORY_FILE).is_file() and (out / HISTORY_FILE).stat().st_size > 0, proc, "the first log line"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = (tmp_path / "stderr.log").read_text()
    assert "error: stopped by SIGTERM at step" in err and "Traceback" not in err
    ((step, path),) = ckpt.complete_checkpoints(out)
    assert 10 <= step < 200 and (path / ckpt.MARKER).is_file()

    res = pretrain(PretrainConfig.model_validate({"loop": loop}), pretrain_data, out)
    assert res.resumed_from_step == step and res.steps == 200


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_and_only_rank_0_writes(pretrain_data: Path, tmp_path: Path):
    loop = {"max_steps": 6, "log_every": 2, "checkpoint_every": 3, "precision": "fp32"}
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(BIN / "kubellm"),
            "pretrain",
            "--data",
            str(pretrain_data),
            "--out",
            str(out),
            *sets("pretrain", {**loop, "micro_batch_size": 2, "eval_batches": 4}),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("output:") == 1  # one report, from rank 0
    history = [json.loads(x) for x in (out / HISTORY_FILE).read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]  # written once, not once per rank
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != OUTPUT_MARKER]  # no temp files
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["steps"] == 6 and result["tokens_seen"] == 6 * 2 * 2 * 32

    # two ranks × 2 rows shard the stream a single process reads 4 rows at a time: same weights, and
    # the same 8 validation rows (4 batches of 2 over two ranks, 2 batches of 4 in one)
    single = pretrain(
        PretrainConfig.model_validate({"loop": {**loop, "micro_batch_size": 4, "eval_batches": 2}}),
        pretrain_data,
        tmp_path / "single",
    )
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(single.output_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert result["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
