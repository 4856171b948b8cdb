"""Fixtures for the tracking tests: fresh sqlite MLflow stores, a read-back in another process, tiny
models for the registry, one real ``mlflow server`` shared by the integration tests, and one on
PostgreSQL (the cluster's backend store) for the load test."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflowhelpers import healthy as _healthy
from mlflowhelpers import server as _server

from kubellm.config.tracking import TrackingConfig

PY = sys.executable


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite store with MLflow's schema in place: creating one runs ~40 migrations (~2 s),
    so each test copies this file instead."""
    from mlflow import MlflowClient

    from kubellm.tracking import resolve_tracking_uri

    wd = tmp_path_factory.mktemp("template")
    MlflowClient(resolve_tracking_uri(TrackingConfig(), wd)).search_experiments()
    return wd / "mlflow.db"


@pytest.fixture
def workdir(tmp_path: Path, _migrated_store: Path) -> Path:
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copy(_migrated_store, wd / "mlflow.db")
    return wd


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a BPE tokenizer (chat template included), and a LoRA adapter on it whose
    weights are non-zero, both saved the way the training stages save them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import build_model

    root = tmp_path_factory.mktemp("models")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["def add(a, b): return a + b", "the cat sat on the mat"] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model = build_model(
        ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64),
        vocab_size=len(tok),
        block_size=64,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
        seed=0,
    )
    full = root / "full"
    model.save_pretrained(str(full))
    tok.save_pretrained(str(full))

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(full)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    return {"full": full, "adapter": adapter}


@pytest.fixture(scope="session")
def _server_process(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Iterator[tuple[Any, str, Path]]:
    """``mlflow server`` on a copy of the migrated sqlite store, not yet waited for."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(_migrated_store, root / "mlflow.db")
    with _server(f"sqlite:///{root / 'mlflow.db'}", root) as started:
        yield started


@pytest.fixture(scope="session", autouse=True)
def _early_server(request: pytest.FixtureRequest) -> None:
    """When integration tests are selected, start the server with the first tracking test, so its
    ~6 s of start-up overlaps the other tests instead of adding to them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker does not know which tests it will be handed: start the server when first asked
    if any(
        item.get_closest_marker("integration") and "mlflow_server" in getattr(item, "fixturenames", ())
        for item in request.session.items
    ):
        request.getfixturevalue("_server_process")


@pytest.fixture(scope="session")
def mlflow_server(_server_process: tuple[Any, str, Path]) -> str:
    """The URI of a healthy ``mlflow server`` on 127.0.0.1, shared by the integration tests."""
    return _healthy(*_server_process)


@pytest.fixture(scope="session")
def workspaces_mlflow_server(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Iterator[str]:
    """A healthy ``mlflow server --enable-workspaces`` (MLflow 3's multi-tenancy) on a fresh sqlite store."""
    root = tmp_path_factory.mktemp("mlflow-workspaces")
    shutil.copy(_migrated_store, root / "mlflow.db")
    with _server(f"sqlite:///{root / 'mlflow.db'}", root, extra=("--enable-workspaces",)) as started:
        yield _healthy(*started)


@pytest.fixture(scope="session")
def pg_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A healthy ``mlflow server`` on 127.0.0.1 whose backend store is a fresh PostgreSQL database
    (dropped afterwards), with two workers like the cluster's (configs/cluster-mlflow.yaml)."""
    from pghelpers import fresh_database

    root = tmp_path_factory.mktemp("mlflow-pg")
    with fresh_database("kubellm_tracking") as db, _server(db, root, workers=2) as started:
        yield _healthy(*started)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared pretraining corpus (the real `prepare`, 32-token blocks)."""
    from kubellm.config.data import DataConfig
    from kubellm.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [" ".join(words[(i + j) % len(words)] for j in range(12)) + f" {i}." for i in range(600)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg = DataConfig.model_validate(
        {
            "kind": "pretrain",
            "sources": [{"uri": str(root / "docs.jsonl")}],
            "block_size": 32,
            "tokenizer": {"vocab_size": 300},
            "cleaning": {"min_chars": 1},
        }
    )
    return prepare(cfg, root / "prepared").path
