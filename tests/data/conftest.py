"""Fixtures of the data-preparation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from datahelpers import make_docs


@pytest.fixture(scope="session")
def shared_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer trained once (like ``kubellm prep`` does) for tests that reuse one."""
    from kubellm.config.data import TokenizerConfig
    from kubellm.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(make_docs(200, seed=99), TokenizerConfig(vocab_size=320)).save_pretrained(str(out))
    return out
