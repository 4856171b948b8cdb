"""Output folders: kubellm replaces only what it made, refuses a user's folder, the working and home
directories and a folder holding an input, in one line and before any work; `compile --out` too; and an
empty config file is refused rather than run on built-in defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.cli import main
from kubellm.config import load_config
from kubellm.errors import ConfigError
from kubellm.fsutil import OUTPUT_MARKER, OutputError, atomic_dir, claim_output, mark_output, read_marker

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def user_folder(path: Path) -> Path:
    """A folder holding a user's files, which no kubellm command may delete."""
    (path / "sub").mkdir(parents=True)
    (path / "precious.txt").write_text("mine")
    (path / "sub" / "notes.md").write_text("my notes")
    return path


def intact(path: Path) -> bool:
    return (
        (path / "precious.txt").read_text() == "mine"
        and (path / "sub" / "notes.md").read_text() == "my notes"
        and not (path / OUTPUT_MARKER).exists()
    )


def test_missing_empty_and_own_outputs_are_accepted(tmp_path: Path) -> None:
    assert claim_output(tmp_path / "new", "evaluation") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    claim_output(tmp_path / "empty", "evaluation")
    with atomic_dir(tmp_path / "mine", "evaluation") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "metrics.json").write_text("{}")
    assert read_marker(tmp_path / "mine") == {"kind": "evaluation", "files": ["sub/metrics.json"]}
    claim_output(tmp_path / "mine", "evaluation")
    with atomic_dir(tmp_path / "mine", "evaluation") as tmp:  # replaced by a second run of its kind
        (tmp / "report.md").write_text("new")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [OUTPUT_MARKER, "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # nothing left aside


@pytest.mark.parametrize("case", ["user files", "other kind", "file added later", "a file", "legacy name only"])
def test_anything_else_is_refused_with_one_line_naming_it(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if case == "user files":
        user_folder(out)
        expected = "not empty and holds no kubellm prepared dataset (precious.txt, sub/notes.md)"
    elif case == "other kind":
        with atomic_dir(out, "evaluation") as tmp:
            (tmp / "metrics.json").write_text("{}")
        expected = "another kind (evaluation, not prepared dataset)"
    elif case == "file added later":
        with atomic_dir(out, "prepared-dataset") as tmp:
            (tmp / "manifest.json").write_text("{}")
        (out / "my-config.yaml").write_text("data: {}")
        expected = "holds files kubellm did not write (my-config.yaml)"
    elif case == "a file":
        out.write_text("x")
        expected = "exists and is not a directory"
    else:  # an old training run is recognised by its result file, but nothing says this is a dataset
        out.mkdir()
        (out / "kubellm_train.json").write_text("{}")
        expected = "holds no kubellm prepared dataset"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="^" + re.escape(str(out))) as err:
        claim_output(out, "prepared-dataset")
    assert expected in str(err.value) and "\n" not in str(err.value)
    # the guard holds at replace time too, after a run's work
    with pytest.raises(OutputError), atomic_dir(out, "prepared-dataset") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_working_and_home_directories_and_their_parents_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for path, why in [
        (".", "is the current directory"),
        (work, "is the current directory"),
        (tmp_path, "contains it"),
        ("/", "contains it"),
        ("~", "is your home directory"),
        (home, "is your home directory"),
    ]:
        with pytest.raises(OutputError, match=why):
            claim_output(path, "evaluation")
    assert claim_output("sub", "evaluation") == work / "sub"  # below the working directory: fine


def test_a_folder_holding_or_inside_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match="contains the input .*docs.jsonl"):
        claim_output(data, "prepared-dataset", inputs=[data / "docs.jsonl"])
    with pytest.raises(OutputError, match="contains the input"):
        claim_output(tmp_path, "prepared-dataset", inputs=[data])
    with pytest.raises(OutputError, match="is inside the input"):
        claim_output(data / "prepared", "prepared-dataset", inputs=[data])
    # a sibling is fine, and so is a name that is no path here (a Hub id)
    claim_output(tmp_path / "prepared", "prepared-dataset", inputs=[data, "owner/model"])


def test_legacy_names_recognise_outputs_made_before_markers(tmp_path: Path) -> None:
    old_run = tmp_path / "run"
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "checkpoints" / "run.json").write_text("{}")
    claim_output(old_run, "training-run", legacy=["checkpoints/run.json", "kubellm_train.json"])
    mark_output(old_run, "training-run", track_files=False)
    (old_run / "notes.md").write_text("a run's folder is never replaced as a whole: no file list")
    claim_output(old_run, "training-run")


def test_compile_refuses_a_user_folder_and_its_config_folder_but_recompiles_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    config = tmp_path / "conf" / "run.yaml"
    config.parent.mkdir()
    config.write_text((REPO / "configs" / "local.yaml").read_text())
    user = user_folder(tmp_path / "user")

    def compile_to(out: Path) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_:
            main(["compile", "--config", str(config), "--out", str(out), "--pipeline", "llm-finetune"])
        err = capsys.readouterr().err  # only the CLI's own lines: another test's log handler may add noise
        return exit_.value.code, "\n".join(x for x in err.splitlines() if x.startswith("error: "))

    code, err = compile_to(user)
    assert code == 2 and len(err.splitlines()) == 1 and "holds no kubellm compiled pipelines" in err
    assert intact(user) and sorted(p.name for p in user.iterdir()) == ["precious.txt", "sub"]
    code, err = compile_to(config.parent)
    assert code == 2 and "contains the input" in err and "run.yaml" in err
    assert sorted(p.name for p in config.parent.iterdir()) == ["run.yaml"]

    out = tmp_path / "dist"
    assert compile_to(out)[0] == 0
    assert read_marker(out)["kind"] == "compiled-pipelines"
    assert compile_to(out)[0] == 0  # its own earlier output: compiled again
    assert "llm-finetune.yaml" in read_marker(out)["files"]


def test_committed_pipelines_folder_is_a_compile_output() -> None:
    """`kubellm compile --out pipelines/compiled` (the command test_compile names) must keep working."""
    claim_output(REPO / "pipelines" / "compiled", "compiled-pipelines")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused(text: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run\.yaml: the config file is empty"):
        load_config(path)


def test_an_explicit_empty_mapping_still_means_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    assert load_config(path).name == "kubellm"


def test_cli_with_an_empty_config_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    proc = subprocess.run(
        [str(BIN / "kubellm"), "pretrain", "--config", "empty.yaml", "--data", "d", "--out", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: empty.yaml: the config file is empty (or only "
        "comments); write {} in it to run with the built-in defaults"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_io_failures_are_named_by_their_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from kubellm.errors import StorageError
    from kubellm.fsutil import io_cause, io_errors

    assert io_cause(OSError(errno.ENOSPC, "x"), tmp_path) == "no space left on device"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "denied")
    assert io_cause(wrapped, tmp_path) == "permission denied"
    # safetensors and torch report the system's words as text
    assert (
        io_cause(
            RuntimeError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            ),
            tmp_path,
        )
        == "no space left on device"
    )
    assert io_cause(ValueError("a bug"), tmp_path) is None
    assert io_cause(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"), tmp_path) is None

    class Full:  # torch's zip writer on a full volume says only "unexpected pos"
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    assert io_cause(RuntimeError("unexpected pos 64"), tmp_path) == "no space left on device"
    full = f"^{tmp_path / 'x'}: cannot write x: no space left on device; later$"
    with pytest.raises(StorageError, match=full), io_errors(tmp_path / "x", "cannot write x", "; later"):
        raise RuntimeError("unexpected pos 64")
    with pytest.raises(ValueError, match="a bug"), io_errors(tmp_path, "cannot write"):
        raise ValueError("a bug")
