"""Fixtures for the training tests: tiny prepared datasets built against the format.py contract.

The corpus is deliberately easy to learn (counting sequences and a few fixed sentence templates), so a
~0.1 M-parameter model shows a clear loss drop within tens of steps on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kubellm.data import format as fmt

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
NAMES = ["alice", "bob", "carol", "dave"]
FRUITS = ["apples", "pears", "plums", "figs"]


def toy_documents(n: int, seed: int = 0) -> list[str]:
    """Learnable text: counting runs and ``<name> likes <fruit>.`` sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < 0.5:
            start = rng.randrange(0, 6)
            docs.append(" ".join(NUMBERS[start:start + 7]) + ".")
        else:
            docs.append(" ".join(f"{rng.choice(NAMES)} likes {rng.choice(FRUITS)}." for _ in range(3)))
    return docs


def toy_pairs(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """Instruction pairs: ``next after <number>`` → the following three numbers."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        i = rng.randrange(0, len(NUMBERS) - 3)
        pairs.append((f"count after {NUMBERS[i]}", " ".join(NUMBERS[i + 1:i + 4])))
    return pairs


def build_tokenizer(out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = toy_documents(400) + [f"{p} {r}" for p, r in toy_pairs(200)]
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                 eos_token="<|eos|>")
    hf.save_pretrained(str(out))
    return hf


def write_prepared(path: Path, kind: str, tok, train_rows: list[dict], val_rows: list[dict],
                   block_size: int) -> Path:
    """Write a prepared dataset directory exactly as the format.py contract describes."""
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    feats = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    splits = {"train": train_rows, "validation": val_rows}
    dd = DatasetDict({k: Dataset.from_list(v, features=feats) for k, v in splits.items() if v})
    path.mkdir(parents=True)
    dd.save_to_disk(str(path / fmt.DATASET_DIR))
    tok.save_pretrained(str(path / fmt.TOKENIZER_DIR))
    (path / fmt.STATS).write_text(json.dumps({"rows": {k: len(v) for k, v in splits.items()}}))
    manifest = fmt.Manifest(kind=kind, block_size=block_size, vocab_size=len(tok),
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, fingerprint=f"toy-{kind}",
                            splits={k: len(v) for k, v in splits.items() if v})
    (path / fmt.MANIFEST).write_text(json.dumps(manifest.to_json()))
    return path


def pretrain_rows(tok, docs: list[str], block: int) -> list[dict]:
    stream: list[int] = []
    for ids in tok(docs)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def instruct_rows(tok, pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for prompt, response in pairs:
        p = tok(f"Q: {prompt}\nA:")["input_ids"]
        r = tok(f" {response}")["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + r, "labels": [fmt.IGNORE_INDEX] * len(p) + r})
    return rows


@pytest.fixture(scope="session")
def toy_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory: pytest.TempPathFactory, toy_tokenizer) -> Path:
    """A prepared pretraining dataset: 32-token packed blocks of the toy corpus."""
    tok = toy_tokenizer
    root = tmp_path_factory.mktemp("data") / "pretrain"
    return write_prepared(root, "pretrain", tok, pretrain_rows(tok, toy_documents(600, seed=2), 32),
                          pretrain_rows(tok, toy_documents(60, seed=3), 32), 32)


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory: pytest.TempPathFactory, toy_tokenizer) -> Path:
    """A prepared instruction dataset over the same tokenizer (variable-length rows, prompts masked)."""
    tok = toy_tokenizer
    root = tmp_path_factory.mktemp("data") / "instruct"
    return write_prepared(root, "instruct", tok, instruct_rows(tok, toy_pairs(300, seed=4)),
                          instruct_rows(tok, toy_pairs(30, seed=5)), 32)
