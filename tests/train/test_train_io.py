"""I/O failures a user meets (issue 24): a checkpoint save onto a full disk or past a file-size limit, and a
truncated or empty ``.arrow`` shard given as ``--data``. Each is one line naming the path and the cause,
exit 2, and the state stays safe (the verified checkpoint before is kept and resumed from).

Before: a full disk ended in a 59-71-line traceback, exit 1, and at 25 MB the words "No space" never
appeared (torch's zip writer says ``unexpected pos``); a corrupt shard ended in ~100 lines of pyarrow
traceback that did not name the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubellm.cli import main
from kubellm.config.train import PretrainConfig
from kubellm.train import checkpoint as ckpt
from kubellm.train.loop import RESULT_FILE

BIN = Path(sys.executable).parent
CFG = PretrainConfig.model_validate(
    {
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "loop": {
            "max_steps": 8,
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "log_every": 4,
            "checkpoint_every": 4,
            "eval_every": 8,
            "eval_batches": 1,
            "precision": "fp32",
            "keep_checkpoints": 2,
        },
    }
)
# A checkpoint of this model is ~1.4 MB (weights 0.46 MB, optimizer state 0.93 MB): the first fits in
# 2 MiB, the second does not.
TMPFS_BYTES = 2 << 20


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pretrain": CFG.model_dump(mode="json"), "tracking": {"enabled": False}}))
    return path


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (root only: the test is skipped elsewhere)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    return int(exit_.value.code or 0), "\n".join(x for x in err.splitlines() if x.startswith("error: "))


def test_a_checkpoint_save_onto_a_full_disk_is_one_line_and_keeps_the_one_before(
    tmp_path: Path,
    pretrain_data: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with small_tmpfs(tmp_path / "small", TMPFS_BYTES) as disk:
        out = disk / "run"
        code, err = cli(
            ["pretrain", "--config", str(config_file), "--data", str(pretrain_data), "--out", str(out)],
            capsys,
            monkeypatch,
        )
        assert code == 2 and len(err.splitlines()) == 1, err
        step8 = ckpt.checkpoint_root(out) / "step-00000008"
        assert err == (
            f"error: {step8}: cannot write the checkpoint: no space left on device; the checkpoint "
            "step-00000004 is kept: make room and rerun with the same output directory to resume from it"
        )
        assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4]
        assert not [p for p in ckpt.checkpoint_root(out).iterdir() if p.name.startswith(".")]  # no half-written one
        assert ckpt.verify_checkpoint(ckpt.checkpoint_root(out) / "step-00000004")
        # Room made elsewhere: the same command resumes from step 4 and finishes.
        shutil.move(out, tmp_path / "run")
    code, err = cli(
        ["pretrain", "--config", str(config_file), "--data", str(pretrain_data), "--out", str(tmp_path / "run")],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / RESULT_FILE).read_text())["resumed_from_step"] == 4


@pytest.mark.slow
def test_a_file_size_limit_during_a_checkpoint_is_one_line_in_a_real_process(
    tmp_path: Path, pretrain_data: Path, config_file: Path
) -> None:
    import resource
    import signal

    def limited() -> None:  # in the child: EFBIG errors instead of the SIGXFSZ that would kill it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # under the 0.46 MB of weights

    out = tmp_path / "run"
    proc = subprocess.run(
        [
            str(BIN / "kubellm"),
            "pretrain",
            "--config",
            str(config_file),
            "--data",
            str(pretrain_data),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=limited,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line == (
        f"error: {ckpt.checkpoint_root(out) / 'step-00000004'}: cannot write the checkpoint: file too "
        "large (over this process's file-size limit, ulimit -f); no checkpoint was written yet"
    )
    assert ckpt.complete_checkpoints(out) == []


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "prepared-before-checksums"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_shard_given_as_data_is_one_line_naming_it(
    damage: str,
    checksums: bool,
    tmp_path: Path,
    pretrain_data: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "prepared"
    shutil.copytree(pretrain_data, data)
    assert json.loads((data / "checksums.json").read_text())["files"]  # prep records every shard
    shard = data / "dataset" / "train" / "data-00000-of-00001.arrow"
    size = shard.stat().st_size
    os.truncate(shard, size // 2 if damage == "truncated" else 0)
    if not checksums:
        (data / "checksums.json").unlink()
    code, err = cli(
        ["pretrain", "--config", str(config_file), "--data", str(data), "--out", str(tmp_path / "run")],
        capsys,
        monkeypatch,
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {shard}: ") and err.endswith(
        f"the prepared dataset {data} is corrupt: prepare it again (kubellm prep)"
    )
    if checksums:
        assert f"{shard.stat().st_size} bytes, {size} when prepared (truncated or overwritten)" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
