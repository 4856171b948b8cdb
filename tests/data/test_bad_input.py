"""Malformed input: each case fails with one line naming the file (and line or record), a non-zero exit,
and no output directory that could pass for a prepared dataset — through the API and through the CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from datahelpers import leftovers, make_docs, write_jsonl

from kubellm.config.data import DataConfig
from kubellm.data.prepare import prepare
from kubellm.errors import KubellmError

GOOD = [{"text": d} for d in make_docs(20)]


def _jsonl_bytes(tmp: Path, name: str, data: bytes) -> dict[str, Any]:
    (tmp / "in").mkdir(exist_ok=True)
    (tmp / "in" / name).write_bytes(data)
    return {"sources": [{"uri": str(tmp / "in" / name)}]}


def _lines(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _csv_extra(tmp: Path) -> dict[str, Any]:
    return _jsonl_bytes(tmp, "a.csv", b"text\n" + b"a fine row of text\n" + b'"x, y",z\n')


# name -> (builder(tmp) -> data config doc, fragments the one-line message must contain)
CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], tuple[str, ...]]] = {
    "empty file": (lambda t: _jsonl_bytes(t, "a.jsonl", b""), ("a.jsonl", "empty file")),
    "not utf-8": (
        lambda t: _jsonl_bytes(t, "a.jsonl", _lines(GOOD[0], b'{"text": "caf\xe9 au lait"}')),
        ("a.jsonl:2:", "not UTF-8", "0xe9"),
    ),
    "invalid json line": (
        lambda t: _jsonl_bytes(t, "a.jsonl", _lines(GOOD[0], GOOD[1], b'{"text": oops}')),
        ("a.jsonl:3:", "invalid JSON"),
    ),
    "text field missing": (
        lambda t: _jsonl_bytes(t, "a.jsonl", _lines(GOOD[0], {"body": "no text here"})),
        ("a.jsonl:2:", "no field 'text'", "body", "text_field"),
    ),
    "number for text": (
        lambda t: _jsonl_bytes(t, "a.jsonl", _lines({"text": 42})),
        ("a.jsonl:1:", "'text' is int", "expected text"),
    ),
    "10 MB line": (
        lambda t: _jsonl_bytes(t, "a.jsonl", _lines(GOOD[0], {"text": "x" * 10_000_000})),
        ("a.jsonl:2:", "max_record_bytes"),
    ),
    "gzip named .jsonl": (
        lambda t: _jsonl_bytes(t, "a.jsonl", gzip.compress(_lines(*GOOD))),
        ("a.jsonl", "gzip", "a.jsonl.gz"),
    ),
    "missing path": (
        lambda t: {"sources": [{"uri": str(t / "nowhere" / "a.jsonl")}]},
        ("nowhere/a.jsonl", "no such file"),
    ),
    "unknown scheme": (
        lambda t: {"sources": [{"uri": "foo://bucket/a.jsonl"}]},
        ("foo://bucket/a.jsonl", "unknown URI scheme 'foo'"),
    ),
    "all filtered": (
        lambda t: {
            **_jsonl_bytes(t, "a.jsonl", _lines(*({"text": f"x{i}"} for i in range(5)))),
            "cleaning": {"min_chars": 16},
        },
        ("a.jsonl", "every record was dropped", "too_short=5"),
    ),
    "vocab too big": (
        lambda t: {**_jsonl_bytes(t, "a.jsonl", _lines(*GOOD)), "tokenizer": {"vocab_size": 60000}},
        ("a.jsonl", "tokenizer.vocab_size 60000", "supports only"),
    ),
    "csv extra field": (_csv_extra, ("a.csv:3:", "more fields than the header")),
    "json array of non-objects": (
        lambda t: _jsonl_bytes(t, "a.json", json.dumps([GOOD[0], "bare"]).encode()),
        ("a.json[1]", "expected an object"),
    ),
    "messages without answer": (
        lambda t: {
            **_jsonl_bytes(t, "c.jsonl", _lines({"m": [{"role": "user", "content": "hello there"}]})),
            "kind": "instruct",
            "sources": [{"uri": str(t / "in" / "c.jsonl"), "messages_field": "m"}],
        },
        ("c.jsonl:1:", "must end with an assistant message"),
    ),
    "corpus smaller than a block": (
        lambda t: {**_jsonl_bytes(t, "a.jsonl", _lines(*GOOD)), "block_size": 16384},
        ("a.jsonl", "fewer than one block", "block_size=16384"),
    ),
    "answers beyond the block": (
        lambda t: {
            **_jsonl_bytes(t, "q.jsonl", _lines(*({"prompt": r["text"] * 3, "response": "because"} for r in GOOD))),
            "kind": "instruct",
            "block_size": 32,
        },
        ("q.jsonl", "no training example keeps any answer token", "block_size=32"),
    ),
    "hub offline": (lambda t: {"sources": [{"uri": "hf://someone/some-data"}]}, ("hf://someone/some-data", "offline")),
    "fsspec backend missing": (
        lambda t: {"sources": [{"uri": "s3://bucket/data/*.jsonl"}]},
        ("s3://bucket/data/*.jsonl", "s3fs"),
    ),
}


def _cfg(tmp: Path, name: str) -> DataConfig:
    doc: dict[str, Any] = {
        "kind": "pretrain",
        "block_size": 16,
        "tokenizer": {"vocab_size": 320},
        "cleaning": {"min_chars": 4},
    }
    doc.update(CASES[name][0](tmp))
    return DataConfig.model_validate(doc)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_line_and_no_output(name: str, tmp_path: Path) -> None:
    if name == "fsspec backend missing":
        import importlib.util

        if importlib.util.find_spec("s3fs"):
            pytest.skip("s3fs is installed here, so s3:// does not fail for a missing backend")
    cfg = _cfg(tmp_path, name)
    out = tmp_path / "outdir" / "prepared"
    with pytest.raises(KubellmError) as info:
        prepare(cfg, out)
    message = str(info.value)
    assert "\n" not in message
    for fragment in CASES[name][1]:
        assert fragment in message, message
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_a_10_mb_line_is_handled_when_the_limit_allows_it(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "10 MB line").model_copy(update={"max_record_bytes": 16 * 1024 * 1024})
    cfg.sources[0].uri = str(write_jsonl(tmp_path / "b.jsonl", [*GOOD, {"text": "x" * 10_000_000}]))
    result = prepare(cfg, tmp_path / "out")
    assert result.stats["dropped"] == {"too_long": 1}  # read, then dropped by cleaning.max_chars


def _run_cli(tmp: Path, data_doc: dict[str, Any], out: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from kubellm.cli.app import main

    (tmp / "run.yaml").write_text(yaml.safe_dump({"data": data_doc}), encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["prep", "--config", str(tmp / "run.yaml"), "--out", out])
    return int(info.value.code or 0), capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "name",
    [
        "empty file",
        "not utf-8",
        "number for text",
        "gzip named .jsonl",
        "unknown scheme",
        "all filtered",
        "vocab too big",
    ],
)
def test_cli_prints_one_error_line_and_exits_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    doc = _cfg(tmp_path, name).model_dump(mode="json")
    code, err = _run_cli(tmp_path, doc, "prepared", capsys)
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and CASES[name][1][0] in last
    assert not (tmp_path / "prepared").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_cli_refuses_an_output_that_escapes_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    doc = {"kind": "pretrain", "sources": [{"uri": str(write_jsonl(tmp_path / "a.jsonl", GOOD))}]}
    code, err = _run_cli(work, doc, "../escaped", capsys)
    assert code == 2 and "escapes its root" in err and "../escaped" in err
    assert not (tmp_path / "escaped").exists()


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_lines(GOOD[0], b"{not json"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": {"sources": [{"uri": str(bad)}]}}))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kubellm"), "prep", "--config", "run.yaml", "--out", "p"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: invalid JSON (Expecting property name "
        "enclosed in double quotes at column 2)"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists()
