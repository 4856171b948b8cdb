"""Data preparation config: where records come from, how they are cleaned, split, tokenized and packed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubellm.config.base import StrictModel
from kubellm.config.secrets import Uri


class SourceConfig(StrictModel):
    """One input source. Several sources are concatenated in the order given."""

    uri: Uri
    """Where the records are. ``builtin://stdlib`` (the Python standard library's source, a pretraining
    corpus that needs no download), ``builtin://stdlib-instruct`` (instructions derived from it: a
    function's docstring as the prompt, its code as the response), a local file, directory or glob
    (``data/*.jsonl.gz``), ``hf://owner/name`` (a Hugging Face Hub dataset; needs the network), or an
    fsspec URI (``s3://``, ``gs://``, ``https://``; needs the matching fsspec backend installed)."""

    format: Literal["auto", "jsonl", "json", "csv", "parquet", "txt"] = "auto"
    """File format; ``auto`` reads it from the file name (``.jsonl``, ``.json``, ``.csv``, ``.parquet``,
    ``.txt``, each optionally ``.gz``)."""

    text_field: str = "text"
    """Column holding the document text (pretraining data)."""

    prompt_field: str = "prompt"
    """Column holding the instruction (instruction data, when ``messages_field`` is not set)."""

    response_field: str = "response"
    """Column holding the answer (instruction data, when ``messages_field`` is not set)."""

    messages_field: str | None = None
    """Column holding chat ``messages`` (a list of ``{"role", "content"}``); overrides prompt/response. A
    record without ``prompt_field`` but with a ``messages`` list is read as chat messages without it."""

    hub_split: str = "train"
    """Split to read from a Hub dataset."""

    hub_revision: str | None = None
    """Pinned revision (commit or tag) of a Hub dataset; ``None`` takes the default branch."""

    max_records: int | None = Field(default=None, ge=1)
    """Read at most this many records from this source (``None``: all)."""

    txt_unit: Literal["document", "paragraph", "line"] = "paragraph"
    """What one record of a ``.txt`` file is: the whole file, a block of lines separated by blank lines,
    or a single line. Paragraphs keep prose and code together without one record per huge file."""


class NearDedupConfig(StrictModel):
    """MinHash near-duplicate removal (off by default: exact de-duplication catches most copies)."""

    enabled: bool = False
    """Remove near duplicates (MinHash over word shingles)."""
    threshold: float = Field(default=0.85, gt=0.0, le=1.0)
    """Estimated Jaccard similarity of word shingles at or above which a record is a near duplicate."""
    num_perm: int = Field(default=64, ge=16, le=512)
    """Number of MinHash permutations (more is more precise and slower)."""
    ngram: int = Field(default=5, ge=1, le=32)
    """Shingle length in words."""


class CleaningConfig(StrictModel):
    """Record cleaning. Every dropped record is counted by reason in ``stats.json``."""

    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form applied to every text."""
    strip_control: bool = True
    """Remove control characters other than newline and tab."""
    collapse_whitespace: bool = False
    """Collapse runs of spaces (off by default: code and indentation matter)."""
    min_chars: int = Field(default=16, ge=0)
    """Drop records shorter than this many characters after cleaning."""
    max_chars: int = Field(default=200_000, ge=1)
    """Drop records longer than this many characters after cleaning."""
    dedup: bool = True
    """Drop exact duplicates of the normalised text (first occurrence kept)."""
    near_dedup: NearDedupConfig = NearDedupConfig()

    @model_validator(mode="after")
    def _lengths(self) -> CleaningConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is greater than max_chars ({self.max_chars})")
        return self


class SplitConfig(StrictModel):
    """Deterministic train/validation split (by a seeded hash of each record, stable across runs)."""

    validation_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Fraction of records held out for validation (0 disables the split)."""
    seed: int = 1234
    """Seed of the split hash: the same seed gives the same split on every run."""


class TokenizerConfig(StrictModel):
    """Train a byte-level BPE tokenizer on the training split, or reuse an existing one."""

    path: str | None = None
    """An existing Hugging Face tokenizer directory (or a prepared dataset's ``tokenizer/``); ``None``
    trains a new byte-level BPE tokenizer."""
    vocab_size: int = Field(default=4096, ge=300, le=262_144)
    """Vocabulary size of a newly trained tokenizer (256 byte symbols + special tokens + merges)."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur at least this often to become a merge."""
    max_train_bytes: int | None = Field(default=100_000_000, ge=1_000_000)
    """Train on an evenly spaced sample of at most this many bytes of the training split (``None``: all
    of it). BPE merges settle long before 100 MB, while training time grows with the bytes seen."""


class PrepClusterConfig(StrictModel):
    """``engine: ray`` on Kubernetes: the KubeRay RayJob in which ``kubellm prep`` (and the pipeline's
    prep step) prepares the data. Pods take the ``prep`` (``prep_instruct``) stage's placement, the
    restricted security context, ``platform.image`` and Kueue's queue labels, as training RayJobs do."""

    nodes: int = Field(default=0, ge=0, le=1024)
    """Ray worker pods. ``0``: prepare in this process (a local Ray, or the Ray cluster ``RAY_ADDRESS``
    names); ``N``: create a RayJob with ``N`` worker pods and wait for it."""
    shared_pvc: str | None = None
    """ReadWriteMany PVC, mounted at ``/mnt/kubellm`` in every pod, where the sources may live and the
    output goes (the workers write the shards, the driver the rest)."""
    timeout_seconds: int = Field(default=24 * 3600, ge=60)
    """The RayJob's ``activeDeadlineSeconds`` and how long ``kubellm prep`` waits for it."""
    ttl_seconds_after_finished: int = Field(default=300, ge=0)
    """Seconds KubeRay keeps the finished Ray cluster (pods, logs) before deleting it."""

    @model_validator(mode="after")
    def _pvc(self) -> PrepClusterConfig:
        if self.nodes and not self.shared_pvc:
            raise ValueError("nodes > 0 creates a RayJob, which needs shared_pvc for its sources and output")
        return self


class DataConfig(StrictModel):
    """Everything ``kubellm prep`` needs to turn sources into a prepared dataset directory."""

    kind: Literal["pretrain", "instruct"] = "pretrain"
    """``pretrain``: documents packed into fixed-length blocks with EOS separators. ``instruct``:
    prompt/response pairs formatted with the chat template, prompt tokens masked out of the loss."""
    sources: list[SourceConfig] = Field(min_length=1)
    cleaning: CleaningConfig = CleaningConfig()
    split: SplitConfig = SplitConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    block_size: int = Field(default=256, ge=8, le=131_072)
    """Tokens per training sequence (pretraining blocks; instruction examples are cut to it)."""
    pack_instructions: bool = True
    """Pack several instruction examples into one block (less padding); otherwise group by length."""
    max_docs: int | None = Field(default=None, ge=1)
    """Stop after this many records in total, across sources (``None``: all)."""
    num_proc: int = Field(default=1, ge=1, le=64)
    """Processes used for tokenization (helps only with many short records: spawned workers cost ~1 s each)."""
    batch_size: int = Field(default=1000, ge=1)
    """Records per tokenization batch."""
    max_record_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Refuse a single input line/record larger than this (a clear error instead of a blow-up)."""
    engine: Literal["local", "ray"] = "local"
    """Where preparation runs: ``local`` (this process, ``num_proc`` encoder processes) or ``ray`` (Ray
    Data across the workers of a Ray cluster: the RayJob that ``kubellm prep`` creates on a cluster, or
    a local Ray started on this machine). Both give byte-identical output."""
    workers: int | None = Field(default=None, ge=1, le=4096)
    """Ray engine: at most this many tasks of each Ray Data step at once (``None``: as many as the
    cluster's CPUs allow). Changes speed, never the output."""
    shard_bytes: int = Field(default=128 * 1024 * 1024, ge=1)
    """Characters of kept text per output shard (a split's records, in source order, are cut into
    shards of about this size). Each shard is tokenized and packed on its own, checksummed, and skipped
    by a resumed prep when it verifies; ~128 MB of text gives ~250 MB Arrow shards."""

    cluster: PrepClusterConfig = PrepClusterConfig()
    """Where the Ray engine runs (``cluster.nodes > 0``: a RayJob on Kubernetes)."""

    @model_validator(mode="after")
    def _engine(self) -> DataConfig:
        if self.cluster.nodes and self.engine != "ray":
            raise ValueError("cluster.nodes > 0 runs the prep as a RayJob: set engine: ray")
        if self.engine == "ray" and self.cleaning.near_dedup.enabled:
            raise ValueError(
                "cleaning.near_dedup is not available with engine: ray (MinHash removal keeps the "
                "first of each near pair in one sequential pass; use engine: local for it)"
            )
        return self
