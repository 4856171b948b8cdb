"""Fixtures of the serving tests: run configs, a fake Kubernetes API, a tiny model and tokenizer.

The model fixtures build everything offline in about a second: a byte-level BPE tokenizer trained with
``tokenizers`` on a few sentences (with a chat template), the ``tiny`` Llama preset with random weights
saved as safetensors, and a LoRA adapter directory on top of it made with peft. Random weights are
deterministic, which is all the tests need: every check compares the server's answer with the answer
the same model gives to a single request. (Training the model to recite sentences took 20-40 s of
these shared CPUs: too much for the test budget.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubellm.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]

#: Overrides exercising every placement field on the deploy and playground stages.
CLUSTER_OVERRIDES = [
    "platform.namespace=serving",
    "platform.default.resources.cpu_request='2'",
    "platform.default.resources.memory_limit=8Gi",
    "platform.default.node_selector={pool: cpu}",
    "platform.default.tolerations=[{key: dedicated, operator: Equal, value: serve, effect: NoSchedule}]",
    "platform.default.pvcs=[{claim: hf-cache, mount_path: /models}]",
    "platform.default.secret_env=[{secret: s3-creds, key: key, env: AWS_ACCESS_KEY_ID}]",
    "platform.default.secret_volumes=[{secret: hub-token, mount_path: /var/run/secrets/hub}]",
    "platform.image_pull_secrets=[regcred]",
]


def run_config(*overrides: str) -> RunConfig:
    """configs/local.yaml with the cluster overrides and ``overrides`` on top."""
    return load_config(REPO / "configs" / "local.yaml", [*CLUSTER_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def make_cfg():
    """``make_cfg(*overrides)``: configs/local.yaml with the cluster overrides and ``overrides``."""
    return run_config


def _platform_fakes() -> Any:
    # The platform tests' kmock fixture (FakeApiServer) is reused rather than copied; conftest modules
    # are not importable by name, so it is loaded from its file.
    spec = importlib.util.spec_from_file_location("kubellm_platform_fakes", REPO / "tests/platform/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_api():
    """kmock's stateful Kubernetes emulator on 127.0.0.1 (see tests/platform/conftest.py)."""
    with _platform_fakes().FakeApiServer() as server:
        yield server


@pytest.fixture()
def fake_api_server():
    """The fake API server class: ``with fake_api_server(emulator_class) as server`` runs a stricter
    subclass of kmock's emulator."""
    return _platform_fakes().FakeApiServer


# --- a tiny model ------------------------------------------------------------------------------------

#: The tokenizer's training text. Its alphabet is only these characters (not all 256 bytes), so whatever
#: the random-weight model generates is letters, spaces and punctuation: text a browser shows as it is
#: (no Markdown syntax, no half UTF-8 characters). Characters outside it are dropped when encoding.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The cat sits on the mat and sleeps all day.",
    "The bird sings in the green tree by the river.",
    "Who jumps over the dog? What does the cat do? Where is the bird?",
    "You are a helpful assistant. Answer in one short sentence.",
    # Every letter, the newline of the chat template and plain punctuation, so any such prompt encodes.
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz\n,.?!'",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(out: Path) -> Any:
    """A byte-level BPE tokenizer trained on ``CORPUS`` with a chat template, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(tokenizer: Any, preset: str = "tiny") -> Any:
    """A random-weight Llama of ``preset`` size for ``tokenizer`` (deterministic: seed 0)."""
    import torch

    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import build_model

    model = build_model(
        ModelConfig(preset=preset),
        vocab_size=len(tokenizer),
        block_size=256,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
    )
    # Tied random embeddings make greedy decoding repeat the prompt's last token forever; an untied
    # random output layer gives varied text instead.
    model.config.tie_word_embeddings = False
    weight = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_builder():
    """:func:`build_tiny_model` (``builder(tokenizer, preset)``), for tests that need another base."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged model directory: safetensors weights and the tokenizer with its chat template."""
    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(build_tokenizer(out)).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter directory on top of ``tiny_model_dir`` (random, non-zero B: it changes answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


# --- ``kubellm serve`` as its own process --------------------------------------------------------------


@contextlib.contextmanager
def serve_process(
    model_dir: Path,
    workdir: Path,
    *sets: str,
    config: Path | None = REPO / "configs" / "local.yaml",
    ready_s: float = 120.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``kubellm serve --model model_dir`` on 127.0.0.1 and a free port, ready; stopped (SIGTERM, then
    SIGKILL) on leaving. Yields the base URL and the process (its output is on ``proc.stdout``)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Served as "kubellm" whatever the config's registered model is called: the tests address it so.
    cmd = [
        sys.executable,
        "-m",
        "kubellm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--set",
        f"workdir={workdir}",
        "--set",
        "serve.precision=fp32",
        "--set",
        "serve.model_name=kubellm",
    ]
    if config is not None:
        cmd[4:4] = ["--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    cmd += list(extra_args)
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, f"kubellm serve was not ready within {ready_s:g} s"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def start_serve():
    """``with start_serve(model_dir, workdir, "serve.x=y", ...) as (url, proc)``: see :func:`serve_process`."""
    return serve_process
