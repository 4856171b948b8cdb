"""The prepared-dataset directory: the contract between ``kubellm prep`` and every later stage.

::

    <prepared>/
      manifest.json    written last: kind, block_size, vocab_size, special token ids, fingerprint
      dataset/         datasets.DatasetDict.save_to_disk: splits "train" and (if any) "validation";
                       columns input_ids (int32 list) and labels (int32 list, -100 = not in the loss:
                       kubellm.models.losses.IGNORE_INDEX)
      tokenizer/       a Hugging Face tokenizer (save_pretrained), with chat template for instruct data
      heldout.jsonl    instruct data only: validation examples as {"messages": [...], "reference": str}
                       (messages end with the user turn; reference is the expected assistant answer)
      stats.json       records in/out, dropped by reason, duplicates, tokens, blocks, padding fraction
      report.md        the same, for a person
      checksums.json   size and checksum of every file under dataset/ (datasets prepared before it
                       existed have none and are read unverified)
      shards.json      one entry per output shard: split, index, file, records, rows, tokens, its pack
                       statistics, size and checksum (what a resumed prep re-uses when it verifies)

Pretraining rows are packed blocks of exactly ``block_size`` tokens whose labels equal input_ids.
Instruction rows are at most ``block_size`` tokens; prompt tokens (and padding) carry label -100.

A split is verified against ``checksums.json`` before it is read, as checkpoints are: a truncated or empty
``.arrow`` shard used to end in ~100 lines of pyarrow traceback that did not name the file; now it is one
line naming the shard (exit 2). A split that fails to load anyway (no checksums to compare) is named the
same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubellm.errors import DataError
from kubellm.fsutil import verify_checksums, write_checksums

MANIFEST = "manifest.json"
DATASET_DIR = "dataset"
TOKENIZER_DIR = "tokenizer"
HELDOUT = "heldout.jsonl"
STATS = "stats.json"
REPORT = "report.md"
CHECKSUMS = "checksums.json"
SHARDS = "shards.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    kind: Literal["pretrain", "instruct"]
    block_size: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None
    fingerprint: str
    """Hash of the sources' content and the data config: equal fingerprints mean equal data."""
    splits: dict[str, int]
    """Rows per split."""
    format_version: int = FORMAT_VERSION
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a generated answer: eos, and ``<|end|>`` (end of a chat turn) where the chat
    template uses it. Generation should stop at any of them."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    manifest: Manifest

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def load_split(self, split: str) -> Any:
        """A ``datasets.Dataset`` (memory-mapped Arrow) for ``split``, its files verified first."""
        import pyarrow
        from datasets import load_from_disk

        where = self.verified_split(split)
        again = f"the prepared dataset {self.path} is corrupt: prepare it again (kubellm prep)"
        try:
            return load_from_disk(str(where))
        except (OSError, ValueError, pyarrow.ArrowException) as err:
            where, err = _unreadable_shard(where) or (where, err)
            raise DataError(
                f"{where}: unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); {again}"
            ) from None

    def verified_split(self, split: str) -> Path:
        """The directory of ``split``, its files checked against ``checksums.json`` (one line naming the
        first missing, truncated or changed shard otherwise)."""
        where = self.path / DATASET_DIR / split
        if not (where / "state.json").is_file():
            have = sorted(p.name for p in (self.path / DATASET_DIR).glob("*/state.json"))
            raise DataError(f"{self.path}: prepared dataset has no {split!r} split (has {have})")
        try:
            verify_checksums(
                self.path,
                self.path / CHECKSUMS,
                DataError,
                prefix=f"{DATASET_DIR}/{split}/",
                what="dataset",
                when="prepared",
            )
        except DataError as err:
            # (a new prep of the same data re-makes only the damaged shards)
            raise DataError(
                f"{err}; the prepared dataset {self.path} is corrupt: prepare it again (kubellm prep)"
            ) from None
        return where

    def shard_files(self, split: str) -> list[Path] | None:
        """The output shards of ``split`` in order, verified, for a sharded prep (``shards.json``);
        ``None`` for a dataset prepared before shards existed."""
        if not (self.path / SHARDS).is_file():
            return None
        where = self.verified_split(split)
        state = json.loads((where / "state.json").read_text(encoding="utf-8"))
        return [where / f["filename"] for f in state["_data_files"]]

    def heldout(self) -> list[dict[str, Any]]:
        """Held-out instruction examples (empty for pretraining data)."""
        p = self.path / HELDOUT
        if not p.exists():
            return []
        with p.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def stats(self) -> dict[str, Any]:
        return json.loads((self.path / STATS).read_text(encoding="utf-8"))


def _unreadable_shard(dataset_dir: Path) -> tuple[Path, Exception] | None:
    """The first ``.arrow`` shard under ``dataset_dir`` that does not read whole, and why."""
    import pyarrow

    for shard in sorted(dataset_dir.rglob("*.arrow")):
        try:
            with pyarrow.memory_map(str(shard)) as source:
                pyarrow.ipc.open_stream(source).read_all()
        except (OSError, ValueError, pyarrow.ArrowException) as err:
            return shard, err
    return None


def write_dataset_checksums(root: Path) -> None:
    """Record every file under ``root/dataset`` in ``root/checksums.json`` (by ``kubellm prep``)."""
    files = [p.relative_to(root).as_posix() for p in (root / DATASET_DIR).rglob("*") if p.is_file()]
    write_checksums(root, files, root / CHECKSUMS)


def open_prepared(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset directory, with a clear error if it is not one (or is incomplete)."""
    p = Path(path)
    mf = p / MANIFEST
    if not mf.is_file():
        raise DataError(f"{p}: not a prepared dataset (no {MANIFEST}; run `kubellm prep` first)")
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"))
        manifest = Manifest(**raw)
    except (ValueError, TypeError) as err:
        raise DataError(f"{mf}: unreadable manifest ({err})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(f"{mf}: format_version {manifest.format_version}, this kubellm reads {FORMAT_VERSION}")
    return PreparedDataset(p, manifest)
