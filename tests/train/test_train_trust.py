"""A checkpoint is verified before it is trusted, and a NaN model is never a success.

Before: random bytes in the newest checkpoint's weights resumed silently and the run ended with exit 0,
``final_loss: NaN`` and an all-NaN model; truncated weights gave a traceback. Each case below starts
from a real interrupted run (SIGTERM at step 6: checkpoints at steps 4 and 6) and damages it on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kubellm.cli import main
from kubellm.config.train import PretrainConfig
from kubellm.errors import TrainingError
from kubellm.train import checkpoint as ckpt
from kubellm.train.loop import RESULT_FILE, TrainingInterrupted
from kubellm.train.pretrain import pretrain

BIN = Path(sys.executable).parent
CFG = PretrainConfig.model_validate(
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
        },
    }
)


@pytest.fixture(scope="module")
def runs(pretrain_data: Path, tmp_path_factory: pytest.TempPathFactory, sigterm_at) -> dict[str, Path]:
    """An uninterrupted run, and a run stopped by SIGTERM at step 6 (kept as a template to copy)."""
    root = tmp_path_factory.mktemp("runs")
    pretrain(CFG, pretrain_data, root / "straight")
    with pytest.raises(TrainingInterrupted):
        pretrain(CFG, pretrain_data, root / "interrupted", sigterm_at(6))
    assert [s for s, _ in ckpt.complete_checkpoints(root / "interrupted")] == [4, 6]
    return {"straight": root / "straight", "interrupted": root / "interrupted"}


@pytest.fixture
def run_dir(runs: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["interrupted"], out)
    return out


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pretrain": CFG.model_dump(mode="json"), "tracking": {"enabled": False}}))
    return path


def weights_file(out: Path, step: int) -> Path:
    return ckpt.checkpoint_root(out) / f"step-{step:08d}" / ckpt.WEIGHTS


def scramble(path: Path) -> None:
    """Random bytes over every tensor of a safetensors file: same size, header (and marker) kept."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = os.urandom(len(raw) - start)
    path.write_bytes(bytes(raw))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err  # only the CLI's own lines: another test's log handler may add noise
    return int(exit_.value.code or 0), "\n".join(x for x in err.splitlines() if x.startswith("error: "))


def kubellm(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubellm"), *argv], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_random_bytes_in_the_newest_weights_resume_from_the_checkpoint_before(
    run_dir: Path,
    runs: dict[str, Path],
    pretrain_data: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scramble(weights_file(run_dir, 6))
    assert (weights_file(run_dir, 6).parent / ckpt.MARKER).is_file()
    with caplog.at_level(logging.WARNING, logger="kubellm"):
        code, _ = cli(
            ["pretrain", "--config", str(config_file), "--data", str(pretrain_data), "--out", str(run_dir)],
            capsys,
            monkeypatch,
        )
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"skipping checkpoint: {weights_file(run_dir, 6)}: checksum mismatch (the bytes changed "
        "after the checkpoint was written)"
    ]
    result = json.loads((run_dir / RESULT_FILE).read_text())
    assert result["resumed_from_step"] == 4 and result["steps"] == 12 and math.isfinite(result["final_loss"])
    straight = json.loads((runs["straight"] / RESULT_FILE).read_text())
    assert result["final_loss"] == pytest.approx(straight["final_loss"], abs=1e-6)
    a, b = final_weights(runs["straight"]), final_weights(run_dir)
    for k in a:  # resuming from step 4 ends exactly where the uninterrupted run did
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert [p.name for p in ckpt.checkpoint_root(run_dir).iterdir()] == [ckpt.RUN_SPEC]  # the bad one is gone too


@pytest.mark.slow
def test_when_no_checkpoint_verifies_the_run_stops_with_one_line_and_no_model(
    run_dir: Path, pretrain_data: Path, config_file: Path
) -> None:
    scramble(weights_file(run_dir, 6))
    scramble(weights_file(run_dir, 4))
    proc = kubellm(
        "pretrain",
        "--config",
        str(config_file),
        "--data",
        str(pretrain_data),
        "--out",
        str(run_dir),
        cwd=run_dir.parent,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 checkpoints passes verification" in errors[0]
    assert proc.stderr.count("skipping checkpoint") == 2
    assert not (run_dir / RESULT_FILE).exists() and not (run_dir / "model.safetensors").exists()
    # nothing was set aside or deleted: a rerun says the same until someone looks
    assert [s for s, _ in ckpt.complete_checkpoints(run_dir)] == [4, 6]


@pytest.mark.slow
def test_truncated_weights_are_one_warning_line_not_a_traceback(
    run_dir: Path, pretrain_data: Path, config_file: Path
) -> None:
    weights = weights_file(run_dir, 6)
    os.truncate(weights, 100)
    proc = kubellm(
        "pretrain",
        "--config",
        str(config_file),
        "--data",
        str(pretrain_data),
        "--out",
        str(run_dir),
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "WARNING" in x]
    assert f"skipping checkpoint: {weights}: 100 bytes" in line and "truncated" in line
    assert json.loads((run_dir / RESULT_FILE).read_text())["resumed_from_step"] == 4


def test_checkpoints_without_checksums_are_refused_unless_trusted_by_name(
    run_dir: Path, pretrain_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 24: a checkpoint without checksums (an older kubellm's, or copied without checksums.json) whose
    weights were altered resumed with only a warning. It cannot be told from an intact one, so it is
    refused with one line saying how to proceed; KUBELLM_RESUME_UNVERIFIED=1 resumes from it, and one
    that does not load is still skipped like one that fails its checksum."""
    for _, path in ckpt.complete_checkpoints(run_dir):
        (path / ckpt.CHECKSUMS).unlink()
    from safetensors.torch import load_file, save_file

    altered = {k: v * 2 for k, v in load_file(str(weights_file(run_dir, 6))).items()}  # finite, not the same
    save_file(altered, str(weights_file(run_dir, 6)))
    monkeypatch.delenv(ckpt.RESUME_UNVERIFIED_ENV, raising=False)
    with pytest.raises(TrainingError) as refused:
        pretrain(CFG, pretrain_data, run_dir)
    message = str(refused.value)
    assert "none of the 2 checkpoints passes verification" in message and "has no checksums" in message
    assert f"set {ckpt.RESUME_UNVERIFIED_ENV}=1 to resume from a checkpoint without checksums" in message
    assert [s for s, _ in ckpt.complete_checkpoints(run_dir)] == [4, 6]  # nothing set aside or deleted

    monkeypatch.setenv(ckpt.RESUME_UNVERIFIED_ENV, "1")
    os.truncate(weights_file(run_dir, 6), 100)
    with caplog.at_level(logging.WARNING, logger="kubellm"):
        res = pretrain(CFG, pretrain_data, run_dir)
    text = caplog.text
    assert "step-00000006: has no checksums; resuming from it unverified" in text
    assert "unreadable checkpoint (SafetensorError" in text
    assert res.resumed_from_step == 4 and math.isfinite(res.final_loss)


def test_a_run_that_keeps_producing_nan_stops_with_an_error_and_writes_no_model(
    run_dir: Path,
    pretrain_data: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finite but absurd weights (an older, unchecksummed checkpoint scaled by a bad tool, resumed from as
    its user asked): they load and pass every check, and every loss from then on is NaN."""
    from safetensors.torch import load_file, save_file

    (weights_file(run_dir, 6).parent / ckpt.CHECKSUMS).unlink()
    monkeypatch.setenv(ckpt.RESUME_UNVERIFIED_ENV, "1")
    tensors = load_file(str(weights_file(run_dir, 6)))
    save_file(
        {k: torch.full_like(v, 3e38) if "embed" in k else v for k, v in tensors.items()}, str(weights_file(run_dir, 6))
    )
    with caplog.at_level(logging.WARNING, logger="kubellm"):
        code, err = cli(
            [
                "pretrain",
                "--config",
                str(config_file),
                "--data",
                str(pretrain_data),
                "--out",
                str(run_dir),
                "--set",
                "pretrain.loop.max_nonfinite_steps=2",
            ],
            capsys,
            monkeypatch,
        )
    assert code == 2
    assert err == (
        "error: pretrain: the loss or gradient norm was not finite for 2 consecutive steps (7-8, "
        "loop.max_nonfinite_steps=2): training diverged; no model was written; lower optim.lr, check the data or "
        f"the checkpoints under {ckpt.checkpoint_root(run_dir)}, then rerun"
    )
    assert "gradient norm nan: not finite, optimizer step skipped (1 in a row, stop at 2)" in caplog.text
    assert not (run_dir / RESULT_FILE).exists() and not (run_dir / "model.safetensors").exists()


def test_a_single_nonfinite_step_is_skipped_and_the_run_finishes(
    pretrain_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad batch (here: the loss of step 5 made NaN) changes no weight and costs one step; with
    loop.max_nonfinite_steps=1 the same step stops the run."""
    from kubellm.train import loop

    calls, real = [0], loop.token_nll_sum

    def nan_at_step_5(logits, labels):
        calls[0] += 1
        nll = real(logits, labels)
        # two micro-batches per step: calls 9 and 10 are step 5 (validation runs after step 6)
        return nll * math.nan if calls[0] in (9, 10) else nll

    monkeypatch.setattr(loop, "token_nll_sum", nan_at_step_5)
    with caplog.at_level(logging.WARNING, logger="kubellm"):
        res = pretrain(CFG, pretrain_data, tmp_path / "a")
    assert (
        "step 5: loss nan" in caplog.text
        and "optimizer steps skipped for a non-finite loss or gradient norm: 1" in caplog.text
    )
    assert res.steps == 12 and math.isfinite(res.final_loss)
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "a").values())

    calls[0] = 0
    strict = CFG.model_copy(update={"loop": CFG.loop.model_copy(update={"max_nonfinite_steps": 1})})
    with pytest.raises(TrainingError, match=r"not finite for 1 consecutive steps \(5-5"):
        pretrain(strict, pretrain_data, tmp_path / "b")
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_a_finished_run_with_a_nan_loss_is_not_returned_as_a_success(
    runs: dict[str, Path], pretrain_data: Path, tmp_path: Path
) -> None:
    """An older kubellm wrote such runs (``final_loss: NaN``, exit 0); rerunning must not bless them."""
    out = tmp_path / "old"
    shutil.copytree(runs["straight"], out)
    result = json.loads((out / RESULT_FILE).read_text())
    (out / RESULT_FILE).write_text(json.dumps({**result, "final_loss": math.nan}))
    with pytest.raises(TrainingError, match="holds a finished run whose final loss is nan"):
        pretrain(CFG, pretrain_data, out)


def test_checksums_are_recorded_for_every_file_before_the_marker(runs: dict[str, Path]) -> None:
    for _, path in ckpt.complete_checkpoints(runs["interrupted"]):
        recorded = json.loads((path / ckpt.CHECKSUMS).read_text())
        assert sorted(recorded["files"]) == sorted(
            p.name for p in path.iterdir() if p.name not in (ckpt.CHECKSUMS, ckpt.MARKER)
        )
        assert ckpt.verify_checkpoint(path) is True
