"""``data.engine: ray`` on a real local Ray cluster (2 CPUs, :func:`rayhelpers.local_ray`): the prepared
output is byte-identical to the local engine's and to itself with 1 and 2 workers, on a folder of 22
Parquet and JSONL files and on the built-in corpus; a worker killed mid-read costs a retried task, not a
record; a killed driver's resubmitted prep re-uses the verified shards; bad input in a Ray task is one line.

Each Ray prep takes 20-40 s on a busy 2-core machine (Ray Data's per-step scheduling, not the data), so
the module keeps to seven of them.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from datahelpers import (
    data_cfg,
    kill_prep_after_a_shard,
    killable,
    leftovers,
    make_docs,
    timed_prep,
    write_jsonl,
)
from rayhelpers import local_ray

from kubellm.data import format as fmt
from kubellm.data import sources as src_mod
from kubellm.data.prepare import fingerprint, prepare
from kubellm.errors import DataError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a cluster start and seven Ray preps


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2) as ray:
        yield ray


def _folder(root: Path) -> Path:
    """22 files, every other one Parquet: documents repeated within and across files, and too short ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs, rng = make_docs(300), random.Random(1)
    folder = root / "corpus"
    folder.mkdir(parents=True)
    for i in range(22):
        part = docs[i * 12 : i * 12 + 14] + [docs[rng.randrange(300)], "ok"]
        if i % 2:
            pq.write_table(pa.table({"text": part}), folder / f"f{i:02d}.parquet")
        else:
            write_jsonl(folder / f"f{i:02d}.jsonl", [{"text": t} for t in part])
    return folder


def _same(a: Path, b: Path) -> None:
    """Equal prepared outputs: every dataset file (by checksum), the shard list, manifest and tokenizer."""
    for name in (fmt.CHECKSUMS, fmt.SHARDS, fmt.MANIFEST, "tokenizer/tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((p / fmt.STATS).read_text()) for p in (a, b))
    for doc in (sa, sb):
        for k in ("seconds", "tokens_per_second", "engine"):
            doc.pop(k)
    assert sa == sb


def test_ray_prep_equals_the_local_one_with_one_and_two_workers(ray_cluster, tmp_path: Path) -> None:
    cfg = data_cfg(_folder(tmp_path), shard_bytes=3000)
    local = prepare(cfg, tmp_path / "local")
    assert local.stats["duplicates"] > 20 and local.stats["dropped"]["too_short"] == 22
    assert local.stats["shards"]["train"] > 4 and local.stats["split_records"]["validation"] > 0
    for workers in (1, 2):
        ray = prepare(cfg.model_copy(update={"engine": "ray", "workers": workers}), tmp_path / f"ray{workers}")
        assert ray.stats["engine"] == "ray"
        _same(local.path, ray.path)


def test_ray_prep_of_the_builtin_corpus_equals_the_local_one(ray_cluster, tmp_path: Path) -> None:
    cfg = data_cfg("builtin://stdlib", max_docs=40, block_size=64, shard_bytes=100_000, tokenizer={"vocab_size": 400})
    local = prepare(cfg, tmp_path / "local")
    ray = prepare(cfg.model_copy(update={"engine": "ray", "workers": 2}), tmp_path / "ray")
    assert local.stats["records_in"] == 40 and local.stats["shards"]["train"] > 1
    _same(local.path, ray.path)


def _dies_once(path: Path, marker: Path, driver: int):  # noqa: ANN202
    """An opener that kills the worker process reading it, the first time, outside the driver."""

    def open_():  # noqa: ANN202
        if os.getpid() != driver and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return open(path, "rb")  # noqa: SIM115 - the reader closes it

    return open_


def test_a_worker_killed_mid_read_costs_a_retry_not_a_record(
    ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the opener runs in workers
    cfg = data_cfg(_folder(tmp_path), shard_bytes=3000)
    local = prepare(cfg, tmp_path / "local")
    marker = tmp_path / "killed"
    real = src_mod.resolve_all

    def with_a_killer(c):  # noqa: ANN001, ANN202
        sources = real(c)
        f = sources[0].files[5]
        sources[0].files[5] = src_mod.InputFile(f.name, f.rel, _dies_once(Path(f.name), marker, os.getpid()))
        return sources

    monkeypatch.setattr(src_mod, "resolve_all", with_a_killer)
    ray = prepare(cfg.model_copy(update={"engine": "ray", "workers": 2}), tmp_path / "ray")
    assert marker.exists(), "no worker was killed"
    assert int(marker.read_text()) != os.getpid()
    _same(local.path, ray.path)  # same records: none missing, none read twice


def test_bad_input_in_a_ray_task_is_one_line(ray_cluster, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "f04.jsonl").write_text((folder / "f04.jsonl").read_text() + "{not json\n")
    with pytest.raises(DataError) as info:
        prepare(data_cfg(folder, engine="ray", workers=2), tmp_path / "out")
    assert (
        str(info.value) == f"{folder / 'f04.jsonl'}:17: invalid JSON (Expecting property name enclosed in "
        "double quotes at column 2)"
    )
    assert leftovers(tmp_path) == ["corpus"]


def test_a_killed_driver_resubmitted_reuses_the_verified_shards(ray_cluster, tmp_path: Path) -> None:
    cfg, sets = killable(tmp_path)
    sets = [*sets, "data.engine=ray", "data.workers=2"]
    staging = tmp_path / f".out.prep-{fingerprint(cfg)}"
    # Every driver joins this cluster (as a RayJob's driver joins its own); the first is killed
    # mid-tokenization, the resubmitted one and a full prep from scratch each start as a new driver
    # (a new Ray job, so neither finds warm workers of its own).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done_before = kill_prep_after_a_shard(tmp_path, tmp_path / "out", staging, sets, env, shards=100)
    seconds, said = timed_prep(tmp_path, tmp_path / "out", sets, env)
    assert "re-using the cleaned text of an earlier attempt (3000 records)" in said
    resumed = tmp_path / "out"
    total = sum(json.loads((resumed / fmt.STATS).read_text())["shards"].values())
    assert f"{done_before} of {total} shards verified from an earlier attempt" in said
    full_seconds, said = timed_prep(tmp_path, tmp_path / "full", sets, env)
    assert "earlier attempt" not in said
    _same(tmp_path / "full", resumed)
    _same(prepare(cfg, tmp_path / "fresh").path, resumed)  # and the local engine's output
    # The measure the issue asks for (not asserted: wall time on a shared machine).
    print(
        f"resubmitted prep after a driver kill: {done_before} of {total} shards re-used, {seconds:.1f} s; "
        f"the same prep from scratch: {full_seconds:.1f} s ({seconds / full_seconds:.2f}x)"
    )
