"""Sharded prep (local engine): per-shard checksums, a damaged shard named by training and re-made alone by
a resumed prep, a driver killed mid-prep resumed from its verified shards, and the training reader over
the memory-mapped shards (same rows as ``load_from_disk``, a resumed stream identical to an uninterrupted
one, ranks that together read the single-process stream)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from datahelpers import data_cfg, kill_prep_after_a_shard, killable, leftovers, make_docs, write_jsonl

from kubellm.data import format as fmt
from kubellm.data import prepare as prep_mod
from kubellm.data.prepare import fingerprint, prepare
from kubellm.errors import DataError
from kubellm.train.batches import ShardedRows, StreamSampler, load_splits, open_training_data


def _corpus(tmp_path: Path, n: int = 400) -> Path:
    docs = make_docs(n)
    return write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs + docs[:40]])  # 40 duplicates


def _counting(names: list[str]):  # noqa: ANN202
    real = prep_mod.make_shard

    def counting(cfg, tok, encoder, job, root, work):  # noqa: ANN001, ANN202
        names.append(job.name)
        return real(cfg, tok, encoder, job, root, work)

    return counting


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the output shards this process makes (the local engine calls make_shard in-process)."""
    names: list[str] = []
    monkeypatch.setattr(prep_mod, "make_shard", _counting(names))
    return names


def test_a_truncated_shard_is_named_by_training_and_re_made_alone(tmp_path: Path, made: list[str]) -> None:
    cfg = data_cfg(_corpus(tmp_path), shard_bytes=4000)
    first = prepare(cfg, tmp_path / "out")
    listed = json.loads((first.path / fmt.SHARDS).read_text())["shards"]
    n_shards = sum(first.stats["shards"].values())
    assert len(made) == n_shards >= 8 and first.stats["duplicates"] == 40
    # Every kept record is in exactly one shard: the shards' record counts add up to the records kept.
    assert sum(s["records"] for s in listed) == first.stats["records_out"] == 400
    assert sum(s["rows"] for s in listed if s["split"] == "train") == first.manifest.splits["train"]
    before = (first.path / fmt.CHECKSUMS).read_bytes()

    victim = first.path / listed[3]["file"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    prepared = open_training_data(first.path, "pretrain", "pretrain")
    with pytest.raises(DataError) as info:
        load_splits(prepared)
    message = str(info.value)
    assert "\n" not in message and str(victim) in message and "truncated" in message

    made.clear()
    again = prepare(cfg, tmp_path / "out")
    assert made == [f"{listed[3]['split']}/{victim.name}"]  # only the damaged shard was made again
    assert (again.path / fmt.CHECKSUMS).read_bytes() == before and again.manifest == first.manifest
    assert again.stats["records_out"] == first.stats["records_out"]
    assert leftovers(tmp_path) == ["c.jsonl", "out"]


def test_a_killed_prep_resumes_from_its_verified_shards(tmp_path: Path) -> None:
    cfg, sets = killable(tmp_path)
    staging = tmp_path / f".out.prep-{fingerprint(cfg)}"
    done_before = kill_prep_after_a_shard(tmp_path, tmp_path / "out", staging, sets)

    t = time.perf_counter()
    resumed = prepare(cfg, tmp_path / "out")
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    fresh = prepare(cfg, tmp_path / "fresh")
    full_seconds = time.perf_counter() - t
    assert (resumed.path / fmt.CHECKSUMS).read_bytes() == (fresh.path / fmt.CHECKSUMS).read_bytes()
    assert resumed.stats["records_out"] == fresh.stats["records_out"] == 3000
    assert not staging.exists()
    print(
        f"resumed with {done_before} of {sum(fresh.stats['shards'].values())} shards verified in {seconds:.1f} s; "
        f"the same prep from scratch: {full_seconds:.1f} s"
    )


def test_training_reads_the_shards_in_a_resumable_rank_sharded_order(tmp_path: Path) -> None:
    result = prepare(data_cfg(_corpus(tmp_path), shard_bytes=4000), tmp_path / "out")
    prepared = fmt.open_prepared(result.path)
    rows, _ = load_splits(prepared)
    assert isinstance(rows, ShardedRows) and len(rows.files) == result.stats["shards"]["train"] > 1
    ds = prepared.load_split("train")
    assert len(rows) == len(ds) == result.manifest.splits["train"]
    every = rows.__getitems__(list(range(len(rows))))
    assert [r["input_ids"].tolist() for r in every] == ds["input_ids"]
    assert [r["labels"].tolist() for r in every] == ds["labels"]

    def stream(start: int, steps: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        sampler = StreamSampler(len(rows), 4, seed=3, rank=rank, world_size=world, start=start)
        it = iter(sampler)
        return [r["input_ids"].tolist() for _ in range(steps) for r in rows.__getitems__(next(it))]

    # Two epochs' worth: a resumed reader at position 40 reads exactly what the uninterrupted one read next.
    whole = stream(0, 2 * len(rows) // 4)
    assert stream(40, len(whole) // 4 - 10) == whole[40:]
    # Two ranks read disjoint halves of each global micro-batch: together the single-process stream.
    r0, r1 = stream(0, 20, 0, 2), stream(0, 20, 1, 2)
    merged = [row for k in range(20) for row in r0[4 * k : 4 * k + 4] + r1[4 * k : 4 * k + 4]]
    assert merged == whole[:160]
    # Picklable for DataLoader workers: a copy reads the same rows.
    import pickle

    copy = pickle.loads(pickle.dumps(rows))
    assert [r["input_ids"].tolist() for r in copy.__getitems__([0, len(rows) - 1])] == [
        ds["input_ids"][0],
        ds["input_ids"][-1],
    ]


def test_a_failed_prep_is_resumed_and_a_damaged_leftover_is_redone(
    tmp_path: Path, made: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = data_cfg(_corpus(tmp_path), shard_bytes=4000)

    def full_disk(*a: object, **k: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep_mod, "render_report", full_disk)
    with pytest.raises(OSError):
        prepare(cfg, tmp_path / "out")
    staging = tmp_path / f".out.prep-{fingerprint(cfg)}"
    assert not (tmp_path / "out").exists() and not (staging / fmt.MANIFEST).exists()
    n = len(made)
    # Damage one cleaned-text shard and one output shard of the failed attempt.
    text = sorted((staging / ".work" / "text").glob("train-*.arrow"))[1]
    text.write_bytes(text.read_bytes()[:100])
    shard = sorted((staging / "dataset" / "train").glob("data-*.arrow"))[2]
    shard.write_bytes(b"")
    monkeypatch.undo()
    made.clear()
    monkeypatch.setattr(prep_mod, "make_shard", _counting(made))
    resumed = prepare(cfg, tmp_path / "out")
    # The text is cleaned again (one shard was damaged); only the damaged output shard is made again.
    assert made == [f"train/{shard.name}"] and n > 5
    fresh = prepare(cfg, tmp_path / "fresh")
    assert (resumed.path / fmt.CHECKSUMS).read_bytes() == (fresh.path / fmt.CHECKSUMS).read_bytes()
