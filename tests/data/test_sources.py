"""Reading sources: every file format (plain and gzip), directories, globs, fsspec, the built-in corpus."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from datahelpers import data_cfg, make_docs

from kubellm.data import builtin
from kubellm.data.records import iter_examples
from kubellm.data.sources import resolve_all
from kubellm.errors import DataError

DOCS = make_docs(6)


def _payload(fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS)).encode()
    if fmt == "json":
        return json.dumps([{"text": d} for d in DOCS]).encode()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "text"])
        w.writerows([i, d] for i, d in enumerate(DOCS))
        return buf.getvalue().encode()
    if fmt == "txt":
        return "\n\n".join(DOCS).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"text": DOCS}), sink)
    return sink.getvalue()


def _texts(cfg) -> list[str]:
    return [ex for _, ex, _ in iter_examples(cfg, resolve_all(cfg))]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_every_format_plain_and_gzip(fmt: str, gz: bool, tmp_path: Path) -> None:
    data = _payload(fmt)
    path = tmp_path / f"corpus.{fmt}{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    assert _texts(data_cfg(path)) == DOCS


def test_explicit_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "corpus.data"
    path.write_bytes(_payload("jsonl"))
    assert _texts(data_cfg(path, source={"format": "jsonl"})) == DOCS


def test_txt_units(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\nthree\n")
    assert _texts(data_cfg(path, source={"txt_unit": "line"})) == ["one", "two", "three"]
    assert _texts(data_cfg(path, source={"txt_unit": "paragraph"})) == ["one\ntwo", "three"]
    assert _texts(data_cfg(path, source={"txt_unit": "document"})) == ["one\ntwo\n\nthree\n"]


def test_directory_and_glob_read_sorted_files(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "second file"}) + "\n")
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "first file"}).encode()))
    (tmp_path / "d" / "sub" / "c.txt").write_text("third file")
    (tmp_path / "d" / "notes.bin").write_bytes(b"\0\1")  # not a data file: skipped in a directory
    assert _texts(data_cfg(tmp_path / "d")) == ["first file", "second file", "third file"]
    assert _texts(data_cfg(f"{tmp_path}/d/*.jsonl*")) == ["first file", "second file"]


def test_field_mapping_and_limits(tmp_path: Path) -> None:
    recs = [{"body": f"text {i}", "q": f"question {i}", "a": f"answer {i}"} for i in range(10)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert _texts(data_cfg(path, source={"text_field": "body", "max_records": 3})) == ["text 0", "text 1", "text 2"]
    cfg = data_cfg(path, kind="instruct", max_docs=2, source={"prompt_field": "q", "response_field": "a"})
    assert _texts(cfg)[1] == [{"role": "user", "content": "question 1"}, {"role": "assistant", "content": "answer 1"}]
    assert len(_texts(cfg)) == 2


def test_chat_messages_field(tmp_path: Path) -> None:
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": conv, "extra": 1}) + "\n")
    assert _texts(data_cfg(path, kind="instruct", source={"messages_field": "messages"})) == [conv]


def test_a_messages_column_is_detected_without_a_setting(tmp_path: Path) -> None:
    """TRL's convention: a record with a ``messages`` list and no prompt column is a conversation."""
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": conv})
        + "\n"
        + json.dumps({"prompt": "p", "response": "r", "messages": "not a conversation"})
        + "\n"
    )
    assert _texts(data_cfg(path, kind="instruct")) == [
        conv,
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: messages must end with an assistant message"):
        _texts(data_cfg(bad, kind="instruct"))


def test_fsspec_uri_with_an_installed_backend(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/kubellm-test/a.jsonl", _payload("jsonl"))
    fs.pipe("/kubellm-test/b.jsonl.gz", gzip.compress(json.dumps({"text": "from memory"}).encode()))
    try:
        assert _texts(data_cfg("memory://kubellm-test/*.jsonl*")) == [*DOCS, "from memory"]
    finally:
        fs.rm("/kubellm-test", recursive=True)


def test_builtin_stdlib_is_deterministic_and_skips_tests() -> None:
    root = builtin.stdlib_root()
    files = builtin.stdlib_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert not [r for r in rel if r.startswith(("test/", "site-packages/")) or "/tests/" in r]
    assert "pydoc_data/topics.py" not in rel and "os.py" in rel
    cfg = data_cfg("builtin://stdlib", max_docs=3)
    assert _texts(cfg) == _texts(cfg) and _texts(cfg)[0] == (root / rel[0]).read_text()


def test_builtin_instruct_pairs_strip_the_docstring() -> None:
    cfg = data_cfg("builtin://stdlib-instruct", kind="instruct", max_docs=50)
    pairs = _texts(cfg)
    assert len(pairs) == 50
    for conv in pairs:
        prompt, code = conv[0]["content"], conv[1]["content"]
        assert prompt.startswith("Write the Python function `")
        fn = ast.parse(code).body[0]
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(fn) is None  # the answer is the code without its docstring
        assert fn.name in prompt.splitlines()[0]


def test_function_pair_on_tricky_functions() -> None:
    src = (
        'def f(a,\n      b):\n    """Add two numbers.\n\n    Returns the sum.\n    """\n    return a + b\n\n'
        'def g(): "one line"; return 1\n\n'
        'def h():\n    """Only a docstring."""\n'
    )
    tree = ast.parse(src)
    lines = src.splitlines()
    pair = builtin.function_pair("f", tree.body[0], lines)
    assert pair == {
        "prompt": "Write the Python function `f`.\n\nAdd two numbers.\n\nReturns the sum.",
        "response": "def f(a,\n      b):\n    return a + b",
    }
    assert builtin.function_pair("g", tree.body[1], lines) is None
    assert builtin.function_pair("h", tree.body[2], lines) is None
