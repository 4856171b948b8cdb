"""`kubellm prep --out`: it replaces only a dataset it prepared itself; a user's folder, the working
directory and a folder holding its own inputs are refused in one line, exit 2, before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datahelpers import make_docs, write_jsonl

from kubellm.cli.app import main
from kubellm.fsutil import read_marker

BIN = Path(sys.executable).parent
DOCS = [{"text": d} for d in make_docs(40)]


def user_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("mine")
    (path / "sub" / "notes.md").write_text("my notes")
    return snapshot(path)


def error_lines(stderr: str) -> str:
    """The CLI's own error lines (a log handler another test left behind may add noise around them)."""
    return "\n".join(line for line in stderr.splitlines() if line.startswith("error: "))


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def config(tmp: Path, source: Path, **data) -> Path:
    doc = {
        "data": {
            "kind": "pretrain",
            "sources": [{"uri": str(source)}],
            "block_size": 32,
            "tokenizer": {"vocab_size": 320},
            "cleaning": {"min_chars": 4},
            **data,
        },
        "tracking": {"enabled": False},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``kubellm prep`` in this process; returns (exit code, stderr). Unless ``work_allowed``, reading
    the sources (the fingerprint, prep's first pass) fails the test: refusing must come first."""
    from kubellm.data import prepare as prepare_mod

    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    allowed, real = [False], prepare_mod.fingerprint

    def guarded(*a, **k):
        assert allowed[0], "prep started working before refusing its output"
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "fingerprint", guarded)

    def run(*argv: str, work_allowed: bool = False) -> tuple[int, str]:
        allowed[0] = work_allowed
        with pytest.raises(SystemExit) as info:
            main(["prep", *argv])
        return int(info.value.code or 0), error_lines(capsys.readouterr().err)

    return run


def test_a_folder_of_user_files_is_refused_and_left_intact(tmp_path: Path, cli) -> None:
    cfg = config(tmp_path, write_jsonl(tmp_path / "in" / "docs.jsonl", DOCS))
    before = user_folder(tmp_path / "mine")
    code, err = cli("--config", str(cfg), "--out", str(tmp_path / "mine"))
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (
        f"error: {tmp_path / 'mine'}: output directory is not empty and holds no kubellm prepared "
        "dataset (precious.txt, sub/notes.md); choose an empty or new directory"
    )
    assert snapshot(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine", "run.yaml"]  # no temp folder


def test_out_dot_is_refused_in_a_real_process_and_the_working_folder_survives(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    config(tmp_path, Path("docs.jsonl"))
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [str(BIN / "kubellm"), "prep", "--config", "run.yaml", "--out", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: is the current directory")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["holds the source file", "inside the source folder"])
def test_an_output_holding_or_inside_a_source_is_refused(where: str, tmp_path: Path, cli) -> None:
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "docs.jsonl", DOCS)
    if where == "holds the source file":
        cfg, out, why = config(tmp_path, corpus / "docs.jsonl"), corpus, "contains the input"
    else:  # the next prep would read the output's heldout.jsonl as a source
        cfg, out, why = config(tmp_path, corpus), corpus / "prepared", "is inside the input"
    before = snapshot(tmp_path)
    code, err = cli("--config", str(cfg), "--out", str(out))
    assert code == 2 and why in err and len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_a_prep_reusing_a_datasets_tokenizer_cannot_replace_that_dataset(tmp_path: Path, cli) -> None:
    cfg = config(tmp_path, write_jsonl(tmp_path / "docs.jsonl", DOCS))
    out = tmp_path / "prepared"
    assert cli("--config", str(cfg), "--out", str(out), work_allowed=True)[0] == 0
    before = snapshot(out)
    code, err = cli("--config", str(cfg), "--out", str(out), "--tokenizer", str(out / "tokenizer"))
    assert code == 2 and f"contains the input {out / 'tokenizer'}" in err
    assert snapshot(out) == before


def test_a_second_prep_replaces_its_own_output_but_not_a_file_added_to_it(tmp_path: Path, cli) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "prepared"
    assert cli("--config", str(config(tmp_path, source, max_docs=30)), "--out", str(out), work_allowed=True)[0] == 0
    first = json.loads((out / "stats.json").read_text())
    assert read_marker(out)["kind"] == "prepared-dataset" and "manifest.json" in read_marker(out)["files"]

    assert cli("--config", str(config(tmp_path, source)), "--out", str(out), work_allowed=True)[0] == 0
    second = json.loads((out / "stats.json").read_text())
    assert (first["records_in"], second["records_in"]) == (30, 40)  # replaced by the new prep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "prepared", "run.yaml"]

    (out / "notes.md").write_text("my notes on this dataset")
    code, err = cli("--config", str(config(tmp_path, source)), "--out", str(out))
    assert code == 2 and "holds files kubellm did not write (notes.md)" in err
    assert (out / "notes.md").read_text() == "my notes on this dataset"
    assert json.loads((out / "stats.json").read_text()) == second


def test_a_quoted_tilde_is_the_home_directory_for_every_command(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 24: `prep --out '~'` made a folder named "~" in the working directory, while the other
    # commands read '~' as the home directory and refused it.
    home, work = tmp_path / "home", tmp_path / "work"
    user_folder(home)
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = config(tmp_path, write_jsonl(tmp_path / "in" / "docs.jsonl", DOCS))
    code, err = cli("--config", str(cfg), "--out", "~")
    assert code == 2 and err == (
        f"error: {home}: is your home directory; an output directory is replaced as a "
        "whole: choose a new or empty directory"
    )
    assert list(work.iterdir()) == []
    assert cli("--config", "~/../run.yaml", "--out", "~/prepared", work_allowed=True)[0] == 0
    assert read_marker(home / "prepared")["kind"] == "prepared-dataset" and list(work.iterdir()) == []
    # Inputs are read the same way: pretrain's --data, evaluate's --model (both missing here).
    for argv, missing in (
        (["pretrain", "--data", "~/no-data", "--out", "~/run"], "no-data"),
        (["evaluate", "--model", "~/no-model", "--data", "~/prepared", "--out", "~/eval"], "no-model"),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--set", "tracking.enabled=false"])
        assert error_lines(capsys.readouterr().err).startswith(f"error: {home / missing}: ")
