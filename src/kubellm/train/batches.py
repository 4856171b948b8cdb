"""Data for the training loop: opening prepared datasets, a resumable, rank-sharded sample order and padding collation.

The order of training rows is one endless stream: epoch ``e`` is a permutation of all rows seeded by
``(seed, e)``, epochs follow each other. The only state is the number of rows the whole job has
consumed, so a checkpoint stores one integer and a resumed run continues the very same stream (same
seed ⇒ same order, bit for bit). Each micro-batch takes the next ``world_size × micro_batch_size`` rows
of the stream and rank ``r`` gets the ``r``-th slice (DistributedSampler-like sharding: every rank sees
different rows, together they see exactly the single-process stream).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kubellm.data.format import PreparedDataset
from kubellm.errors import DataError
from kubellm.models.losses import IGNORE_INDEX


class StreamSampler:
    """Yields index lists (micro-batches) for one rank, starting at global stream position ``start``.

    Used as a DataLoader ``batch_sampler``. ``position`` is the global number of rows consumed once the
    batches yielded so far are used — what a checkpoint records.
    """

    def __init__(
        self, num_rows: int, micro_batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if num_rows < 1:
            raise ValueError("cannot sample from an empty split")
        self.num_rows = num_rows
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = start
        self._epoch = -1
        self._perm: Sequence[int] = ()

    def _row(self, i: int) -> int:
        epoch, offset = divmod(i, self.num_rows)
        if epoch != self._epoch:
            import numpy as np

            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def indices(self, position: int) -> list[int]:
        """This rank's rows of the micro-batch that starts at global stream ``position``."""
        first = position + self.rank * self.micro_batch_size
        return [self._row(i) for i in range(first, first + self.micro_batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batch = self.indices(self.position)
            self.position += self.world_size * self.micro_batch_size
            yield batch


class PadCollator:
    """Stack rows into tensors, right-padding variable-length rows with ``pad_id`` (label -100).

    Packed pretraining blocks all have the same length and need no attention mask; instruction rows are
    padded to the longest row of the micro-batch and get one.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if min(lengths) != width:
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch


def open_training_data(data_dir: str | Path, kind: str, command: str) -> PreparedDataset:
    """Open a prepared dataset for ``command``, checking it exists, is complete and has the right kind."""
    from kubellm.data.format import open_prepared

    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found (pass the output of `kubellm prep`)")
    prepared = open_prepared(path)
    m = prepared.manifest
    if m.kind != kind:
        wanted = (
            "pretraining data (data.kind: pretrain)"
            if kind == "pretrain"
            else "instruction data (instruct_data.kind: instruct)"
        )
        raise DataError(f"{path}: manifest.json says kind {m.kind!r}, but `kubellm {command}` needs {wanted}")
    if m.splits.get("train", 0) < 1:
        raise DataError(f"{path}: the prepared 'train' split is empty")
    return prepared


class ShardedRows:
    """The rows of one split of a sharded prep, read from its memory-mapped Arrow shards.

    Nothing is loaded up front: each shard is mapped (the operating system pages in what is read and
    may drop it again), so a corpus far larger than memory trains from a volume. Row ``i`` of the split
    is row ``i - start`` of the shard that holds it; a micro-batch is one ``take`` per shard it touches,
    returned as NumPy views of the shard's buffers (``datasets``' ``load_from_disk`` reads the same
    files but converts every row to Python lists). Picklable (DataLoader worker processes map the
    shards again).
    """

    def __init__(self, files: list[Path], again: str = "prepare it again (kubellm prep)") -> None:
        self.files = list(files)
        self.again = again
        self._open()

    def _open(self) -> None:
        import numpy as np
        import pyarrow as pa

        tables = []
        for f in self.files:
            try:
                tables.append(pa.ipc.open_stream(pa.memory_map(str(f))).read_all())
            except (OSError, pa.ArrowException) as err:
                raise DataError(
                    f"{f}: unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); {self.again}"
                ) from None
        self._tables = tables
        self._starts = np.cumsum([0] + [t.num_rows for t in tables])

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "again": self.again}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.files, self.again = state["files"], state["again"]
        self._open()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        import numpy as np

        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        rows: list[dict[str, Any]] = [{}] * len(idx)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            taken = self._tables[s].take(idx[where] - self._starts[s])
            cols = {}
            for name in ("input_ids", "labels"):
                arr = taken.column(name).combine_chunks()
                # writable: the batch was copied out of the map by take; torch refuses read-only arrays
                offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False, writable=True)
                cols[name] = [values[offsets[k] : offsets[k + 1]] for k in range(len(where))]
            for k, pos in enumerate(where):
                rows[pos] = {"input_ids": cols["input_ids"][k], "labels": cols["labels"][k]}
        return rows


def open_split(prepared: PreparedDataset, split: str) -> Any:
    """A split for training: :class:`ShardedRows` for a sharded prep, else ``datasets``' memory map."""
    files = prepared.shard_files(split)
    if files is None:
        return prepared.load_split(split)
    return ShardedRows(files, f"the prepared dataset {prepared.path} is corrupt: prepare it again (kubellm prep)")


def load_splits(prepared: PreparedDataset) -> tuple[Any, Any | None]:
    """The train split and, where the dataset has one, the validation split."""
    val = open_split(prepared, "validation") if prepared.manifest.splits.get("validation") else None
    return open_split(prepared, "train"), val
