"""End-to-end prep on tiny corpora: determinism, fingerprints, packing, masking, dedup, outputs, tracking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from datahelpers import data_cfg, leftovers, make_docs, write_jsonl

from kubellm.data import format as fmt
from kubellm.data.prepare import fingerprint, prepare
from kubellm.data.tokenizer import CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE
from kubellm.models.losses import IGNORE_INDEX
from kubellm.tracking.base import NullTracker

DOCS = make_docs(60)


def _rows(path: Path, split: str = "train") -> tuple[list[list[int]], list[list[int]]]:
    ds = fmt.open_prepared(path).load_split(split)
    return ds["input_ids"], ds["labels"]


def _backend(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / fmt.TOKENIZER_DIR / "tokenizer.json"))


def test_two_preps_are_identical_and_match_the_fingerprint(tmp_path: Path) -> None:
    cfg = data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS]))
    a, b = prepare(cfg, tmp_path / "a"), prepare(cfg, tmp_path / "b")
    assert a.manifest == b.manifest and a.manifest.fingerprint == fingerprint(cfg)
    assert a.stats["split_records"] == b.stats["split_records"]
    assert 0 < a.stats["split_records"]["validation"] < 30  # ~20 % of 60, by record hash
    for split in ("train", "validation"):
        assert _rows(a.path, split) == _rows(b.path, split)
    assert (a.path / "tokenizer" / "tokenizer.json").read_bytes() == (
        b.path / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def test_the_split_follows_the_record_not_its_position(tmp_path: Path, shared_tokenizer: Path) -> None:
    recs = _instruct_records(80)
    cfg = {"kind": "instruct", "block_size": 64, "split": {"validation_fraction": 0.25}}
    first = prepare(
        data_cfg(write_jsonl(tmp_path / "a.jsonl", recs), **cfg), tmp_path / "a", tokenizer_dir=shared_tokenizer
    )
    # The same records reversed, with new ones mixed in: every record keeps its split.
    more = [{"prompt": f"new {r['prompt']}", "response": r["response"]} for r in recs[:30]]
    second = prepare(
        data_cfg(write_jsonl(tmp_path / "b.jsonl", list(reversed(recs)) + more), **cfg),
        tmp_path / "b",
        tokenizer_dir=shared_tokenizer,
    )
    held_a = {h["reference"] for h in fmt.open_prepared(first.path).heldout()}
    held_b = {h["reference"] for h in fmt.open_prepared(second.path).heldout()}
    assert 5 < len(held_a) < 40 and held_a <= held_b
    # Another seed is another split.
    cfg["split"] = {"validation_fraction": 0.25, "seed": 7}
    third = prepare(
        data_cfg(write_jsonl(tmp_path / "a.jsonl", recs), **cfg), tmp_path / "c", tokenizer_dir=shared_tokenizer
    )
    assert {h["reference"] for h in fmt.open_prepared(third.path).heldout()} != held_a


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    corpus = tmp_path / "one" / "corpus"
    write_jsonl(corpus / "a.jsonl", [{"text": d} for d in DOCS])
    cfg = data_cfg(corpus)
    base = fingerprint(cfg)
    shutil.copytree(corpus, tmp_path / "two" / "corpus")
    assert fingerprint(data_cfg(tmp_path / "two" / "corpus")) == base  # moved: same content, same data
    assert fingerprint(cfg.model_copy(update={"num_proc": 4})) == base  # speed only
    assert fingerprint(cfg.model_copy(update={"block_size": 64})) != base
    raw = (corpus / "a.jsonl").read_bytes()
    (corpus / "a.jsonl").write_bytes(raw.replace(b"alpha", b"ALPHA", 1))  # same size, new content
    assert fingerprint(cfg) != base


def test_pretraining_blocks_are_full_and_eos_separated(tmp_path: Path, shared_tokenizer: Path) -> None:
    docs = DOCS[:30]
    cfg = data_cfg(
        write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs]),
        split={"validation_fraction": 0.0},
        tokenizer={"path": str(shared_tokenizer)},
    )
    result = prepare(cfg, tmp_path / "out")
    ids, labels = _rows(result.path)
    assert all(len(r) == cfg.block_size for r in ids) and labels == ids
    tok = _backend(result.path)
    eos = result.manifest.eos_token_id
    expected = [t for d in docs for t in [*tok.encode(d, add_special_tokens=False).ids, eos]]
    flat = [t for r in ids for t in r]
    assert flat == expected[: len(flat)]  # in order, EOS after every document, nothing padded
    assert len(expected) - len(flat) == result.stats["splits"]["train"]["dropped_tail_tokens"] < cfg.block_size
    assert result.stats["padding_fraction"] == 0.0 and result.manifest.splits == {"train": len(ids)}


def _instruct_records(n: int) -> list[dict[str, str]]:
    docs = make_docs(n, seed=3, words=12)
    return [{"prompt": f"Q{i}: {d[:30]}?", "response": f"A{i}: {d[30:]}"} for i, d in enumerate(docs)]


def _check_masking(ids: list[int], labels: list[int], assistant: int, end: int) -> int:
    """Labels must equal ids exactly from after ``<|assistant|>`` through the next ``<|end|>``."""
    answers, inside = 0, False
    for tok, lab in zip(ids, labels, strict=True):
        if inside:
            assert lab == tok
            if tok == end:
                inside, answers = False, answers + 1
        else:
            assert lab == IGNORE_INDEX
            inside = tok == assistant
    return answers


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "length-grouped"])
def test_instruction_labels_mask_exactly_the_prompt(pack: bool, tmp_path: Path, shared_tokenizer: Path) -> None:
    recs = _instruct_records(40)
    cfg = data_cfg(
        write_jsonl(tmp_path / "i.jsonl", recs),
        kind="instruct",
        block_size=64,
        pack_instructions=pack,
        split={"validation_fraction": 0.0},
    )
    result = prepare(cfg, tmp_path / "out", tokenizer_dir=shared_tokenizer)
    tok = result.path / fmt.TOKENIZER_DIR
    vocab = json.loads((tok / "tokenizer.json").read_text())["added_tokens"]
    ids_of = {t["content"]: t["id"] for t in vocab}
    rows, labels = _rows(result.path)
    answers = sum(
        _check_masking(r, lab, ids_of["<|assistant|>"], ids_of["<|end|>"]) for r, lab in zip(rows, labels, strict=True)
    )
    assert answers == len(recs) == result.stats["splits"]["train"]["examples"]
    backend = _backend(result.path)
    decoded = [backend.decode([t for t in lab if t != IGNORE_INDEX], skip_special_tokens=False) for lab in labels]
    if pack:
        assert all(len(r) == 64 for r in rows) and result.stats["padding_fraction"] < 0.5
    else:
        assert sorted(decoded) == sorted(f"{r['response']}<|end|>" for r in recs)
        assert [len(r) for r in rows] == sorted((len(r) for r in rows), reverse=True)


def test_multi_turn_chat_labels_every_answer_and_heldout(tmp_path: Path, shared_tokenizer: Path) -> None:
    convs = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": f"first question {i}"},
                {"role": "assistant", "content": f"first answer {i}"},
                {"role": "user", "content": f"second question {i}"},
                {"role": "assistant", "content": f"second answer {i}"},
            ]
        }
        for i in range(30)
    ]
    cfg = data_cfg(
        write_jsonl(tmp_path / "m.jsonl", convs),
        kind="instruct",
        block_size=128,
        source={"messages_field": "messages"},
        split={"validation_fraction": 0.3},
    )
    result = prepare(cfg, tmp_path / "out", tokenizer_dir=shared_tokenizer)
    vocab = {
        t["content"]: t["id"]
        for t in json.loads((result.path / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    }
    rows, labels = _rows(result.path)
    answers = sum(
        _check_masking(r, lab, vocab["<|assistant|>"], vocab["<|end|>"]) for r, lab in zip(rows, labels, strict=True)
    )
    assert answers == 2 * result.stats["splits"]["train"]["examples"]
    held = fmt.open_prepared(result.path).heldout()
    assert len(held) == result.stats["split_records"]["validation"] == result.stats["heldout"] > 0
    for h in held:
        assert h["messages"][-1]["role"] == "user" and h["reference"].startswith("second answer")
    assert result.manifest.stop_token_ids == [result.manifest.eos_token_id, vocab["<|end|>"]]


def test_an_existing_tokenizer_without_template_gets_the_plain_one(tmp_path: Path, shared_tokenizer: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(shared_tokenizer, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((bare / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(conf))
    cfg = data_cfg(
        write_jsonl(tmp_path / "i.jsonl", _instruct_records(20)),
        kind="instruct",
        block_size=96,
        pack_instructions=False,
        split={"validation_fraction": 0.0},
        tokenizer={"path": str(bare)},
    )
    result = prepare(cfg, tmp_path / "out")
    saved = result.path / "tokenizer"
    template = (
        (saved / "chat_template.jinja").read_text()
        if (saved / "chat_template.jinja").exists()
        else json.loads((saved / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert template == PLAIN_CHAT_TEMPLATE
    assert result.manifest.vocab_size == 320  # no tokens added
    assert result.manifest.stop_token_ids == [result.manifest.eos_token_id]
    backend = _backend(result.path)
    prompts = {r["response"].split(":")[0]: r["prompt"] for r in _instruct_records(20)}
    for row, lab in zip(*_rows(result.path), strict=True):
        answer = backend.decode([t for t in lab if t != IGNORE_INDEX], skip_special_tokens=False)
        first = next(i for i, y in enumerate(lab) if y != IGNORE_INDEX)
        prompt = backend.decode(row[:first], skip_special_tokens=False)
        assert answer.endswith("<|endoftext|>")  # the answer ends with eos, which is learned
        assert prompt == f"### Instruction:\n{prompts[answer.split(':')[0]]}\n\n### Response:\n"


def test_duplicates_are_counted_by_reason(tmp_path: Path) -> None:
    recs = [{"text": d} for d in DOCS[:20]]
    recs += [
        {"text": DOCS[0]},
        {"text": "  " + DOCS[1].replace(" ", "   ") + "\n"},  # exact and re-spaced
        {"text": DOCS[2] + "\x00\x07"},  # a copy with control characters
        {"text": "tiny"},
        {"text": "   "},
    ]
    result = prepare(data_cfg(write_jsonl(tmp_path / "d.jsonl", recs), cleaning={"min_chars": 8}), tmp_path / "o")
    assert result.stats["dropped"] == {"duplicate": 3, "too_short": 1, "empty": 1}
    assert result.stats["records_in"] == 25 and result.stats["records_out"] == 20


def test_minhash_catches_near_duplicates(tmp_path: Path) -> None:
    from kubellm.config.data import NearDedupConfig
    from kubellm.data.clean import MinHashIndex

    base = make_docs(30, seed=11, words=120)
    index = MinHashIndex(NearDedupConfig(enabled=True, threshold=0.7), seed=1)
    assert not any(index.is_near_duplicate(d) for d in base)  # distinct documents pass
    words = base[4].split()
    words[60] = "changed"
    assert index.is_near_duplicate(" ".join(words))  # one word of 120 changed: Jaccard ≈ 0.92
    assert not index.is_near_duplicate(" ".join(base[5].split()[:40]) + " " + " ".join(make_docs(1, 77)[0].split()[2:]))

    near = [{"text": d} for d in base] + [{"text": base[i].replace("doc", "document", 1) + " extra"} for i in range(5)]
    path = write_jsonl(tmp_path / "n.jsonl", near)
    on = prepare(data_cfg(path, cleaning={"near_dedup": {"enabled": True, "threshold": 0.7}}), tmp_path / "on")
    off = prepare(data_cfg(path), tmp_path / "off")
    assert on.stats["near_duplicates"] == 5 and on.stats["records_out"] == 30
    assert off.stats["near_duplicates"] == 0 and off.stats["records_out"] == 35


def test_outputs_stats_report_and_tracking(tmp_path: Path) -> None:
    tracker = NullTracker()
    result = prepare(
        data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])), tmp_path / "o", tracker=tracker
    )
    names = sorted(p.name for p in result.path.iterdir())
    assert names == [
        ".kubellm-output",
        "checksums.json",
        "dataset",
        "manifest.json",
        "report.md",
        "shards.json",
        "stats.json",
        "tokenizer",
    ]
    on_disk = fmt.open_prepared(result.path)
    assert on_disk.manifest == result.manifest and on_disk.stats() == json.loads(json.dumps(result.stats))
    report = (result.path / "report.md").read_text()
    assert (
        "## Cleaning" in report and str(result.stats["records_in"]) in report and result.manifest.fingerprint in report
    )
    assert tracker.params["data.fingerprint"] == result.manifest.fingerprint
    assert tracker.last("data_tokens") == result.stats["tokens"] > 0
    assert [a.name for a, _ in tracker.artifacts] == ["stats.json", "report.md"]


def test_a_failure_late_in_prep_leaves_the_previous_output_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS]))
    out = tmp_path / "out" / "prepared"
    good = prepare(cfg, out)

    def boom(*a: object, **k: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr("kubellm.data.prepare.render_report", boom)
    with pytest.raises(RuntimeError):
        prepare(cfg.model_copy(update={"block_size": 16}), out)
    assert fmt.open_prepared(out).manifest == good.manifest
    # The finished part of the failed prep stays, hidden and without a manifest, for a resumed prep.
    kept = fingerprint(cfg.model_copy(update={"block_size": 16}))
    assert leftovers(out.parent) == [f".prepared.prep-{kept}", "prepared"]
    assert not (out.parent / f".prepared.prep-{kept}" / "manifest.json").exists()


def test_parallel_tokenization_gives_the_same_rows(tmp_path: Path, shared_tokenizer: Path) -> None:
    cfg = data_cfg(
        write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in make_docs(400)]),
        batch_size=50,
        tokenizer={"path": str(shared_tokenizer)},
    )
    one = prepare(cfg, tmp_path / "one")
    two = prepare(cfg.model_copy(update={"num_proc": 2}), tmp_path / "two")
    assert _rows(one.path) == _rows(two.path) and one.manifest == two.manifest


def test_overlapped_encoding_gives_the_inline_encodings_in_order(shared_tokenizer: Path) -> None:
    """The Ray engine's tasks encode the next batch in a thread while they pack the previous one: the
    same arrays, in the same order, as encoding inline."""
    from kubellm.data.pack import Encoder

    tk = _tokenizer_backend(shared_tokenizer)
    batches = [make_docs(7, seed=i) for i in range(9)]
    with Encoder(tk, 1) as inline, Encoder(tk, 1, overlap=True) as overlapped:
        assert overlapped._pool is not None and inline._pool is None
        for a, b in zip(inline.docs(iter(batches), 0), overlapped.docs(iter(batches), 0), strict=True):
            assert np.array_equal(a, b)
        for a, b in zip(inline.offsets(iter(batches)), overlapped.offsets(iter(batches)), strict=True):
            assert all(np.array_equal(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def _tokenizer_backend(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_builtin_corpus_and_instructions_share_one_tokenizer(tmp_path: Path) -> None:
    pre = prepare(
        data_cfg("builtin://stdlib", max_docs=12, block_size=64, tokenizer={"vocab_size": 512}), tmp_path / "pre"
    )
    assert pre.stats["sources"][0]["records"] == 12 and pre.manifest.vocab_size == 512
    inst = prepare(
        data_cfg("builtin://stdlib-instruct", kind="instruct", max_docs=60, block_size=128),
        tmp_path / "inst",
        tokenizer_dir=pre.path,
    )  # a prepared dataset works as tokenizer dir
    assert inst.manifest.vocab_size == 512
    assert (inst.path / "tokenizer" / "tokenizer.json").read_bytes() == (
        pre.path / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert inst.stats["splits"]["train"]["examples"] > 20


def test_cli_prep_success_prints_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], shared_tokenizer: Path
) -> None:
    from kubellm.cli.app import main

    monkeypatch.chdir(tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    inst = write_jsonl(tmp_path / "i.jsonl", _instruct_records(20))
    doc = {
        "data": {"sources": [{"uri": str(corpus)}], "block_size": 32, "tokenizer": {"vocab_size": 320}},
        "instruct_data": {"kind": "instruct", "sources": [{"uri": str(inst)}], "block_size": 64},
    }
    Path("run.yaml").write_text(yaml.safe_dump(doc))

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as info:
            main(["prep", "--config", "run.yaml", *argv])
        return int(info.value.code or 0)

    assert run("--out", "prep/pre", "--set", "data.block_size=16") == 0
    out = capsys.readouterr().out
    assert "kubellm prep (pretrain)" in out and "padding" in out and "fingerprint" in out
    assert fmt.open_prepared("prep/pre").manifest.block_size == 16
    assert run("--out", "prep/inst", "--section", "instruct_data", "--tokenizer", str(shared_tokenizer)) == 0
    assert "kubellm prep (instruct)" in capsys.readouterr().out
    assert fmt.open_prepared("prep/inst").manifest.kind == "instruct"


@pytest.mark.slow
def test_tokenizer_round_trips_through_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    result = prepare(data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])), tmp_path / "o")
    tok = AutoTokenizer.from_pretrained(str(result.path / "tokenizer"))
    assert len(tok) == result.manifest.vocab_size
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id == result.manifest.eos_token_id and tok.pad_token_id == result.manifest.pad_token_id
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    text = "delta río — ünïcode 🚀 and\n\tindentation"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.chat_template == CHAT_TEMPLATE
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<|user|>hi<|end|><|assistant|>hello<|end|>"
    assert (
        tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        == "<|user|>hi<|end|><|assistant|>"
    )


def test_sharded_split_loads_with_datasets(tmp_path: Path) -> None:
    from datasets import load_from_disk

    from kubellm.data.pack import ArrowSink

    sink = ArrowSink(tmp_path / "ds" / "train", max_shard_bytes=1)  # a new shard for every batch
    blocks = np.arange(48, dtype=np.int32).reshape(6, 8)
    sink.write_blocks(blocks[:3])
    sink.write([(np.array([1, 2, 3], dtype=np.int32), np.array([-100, 2, 3], dtype=np.int32))])
    sink.write_blocks(blocks[3:])
    sink.close("0123456789abcdef")
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    ds = load_from_disk(str(tmp_path / "ds"))["train"]
    assert len(list((tmp_path / "ds" / "train").glob("data-*-of-00003.arrow"))) == 3 and sink.rows == 7
    assert ds["input_ids"] == [*blocks[:3].tolist(), [1, 2, 3], *blocks[3:].tolist()]
    assert ds["labels"][3] == [-100, 2, 3]


def test_a_validation_split_too_small_for_one_block_is_left_out(tmp_path: Path, shared_tokenizer: Path) -> None:
    recs = [{"text": d} for d in DOCS[:40]]
    cfg = data_cfg(
        write_jsonl(tmp_path / "c.jsonl", recs),
        block_size=512,
        split={"validation_fraction": 0.05},
        tokenizer={"path": str(shared_tokenizer)},
    )
    result = prepare(cfg, tmp_path / "o")
    assert result.stats["split_records"]["validation"] > 0 and list(result.manifest.splits) == ["train"]
    assert sorted(p.name for p in (result.path / "dataset").iterdir()) == ["dataset_dict.json", "train"]


def test_fingerprint_with_a_tokenizer_dir_matches_the_prep(tmp_path: Path, shared_tokenizer: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(shared_tokenizer, model)
    cfg = data_cfg(write_jsonl(tmp_path / "i.jsonl", _instruct_records(20)), kind="instruct", block_size=64)
    result = prepare(cfg, tmp_path / "out", tokenizer_dir=model)
    assert fingerprint(cfg, tokenizer_dir=model) == result.manifest.fingerprint != fingerprint(cfg)
    (model / "model.safetensors").write_bytes(b"\0" * 1024)  # weights beside it do not count
    assert fingerprint(cfg, tokenizer_dir=model) == result.manifest.fingerprint
    conf = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**conf, "model_max_length": 77}))
    assert fingerprint(cfg, tokenizer_dir=model) != result.manifest.fingerprint
