"""Fixtures for the evaluation tests: a real prepared instruction dataset and tiny models on CPU.

The dataset is made by the real ``kubellm.data.prepare.prepare`` from a local JSONL file; the models
are built from the ``tiny`` preset (no download) and saved like a training stage saves them, with a
``history.jsonl``. The adapter's LoRA weights are set to non-zero values so it really changes the model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def copy_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``repeat: a b c`` → ``a b c``: short prompts and answers of varying length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 6)))
        rows.append({"prompt": f"repeat: {words}", "response": words})
    return rows


def write_history(model_dir: Path, steps: int, start_loss: float) -> None:
    rows = [
        {
            "step": s,
            "loss": start_loss / (1 + 0.1 * s),
            "lr": 1e-3,
            "tokens_per_s": 1000.0,
            **({"val_loss": start_loss / (1 + 0.09 * s)} if s % 5 == 0 else {}),
        }
        for s in range(1, steps + 1)
    ]
    (model_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubellm.config.data import DataConfig
    from kubellm.data.prepare import prepare

    root = tmp_path_factory.mktemp("eval-data")
    src = root / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in copy_pairs(300, seed=3)), encoding="utf-8")
    cfg = DataConfig.model_validate(
        {
            "kind": "instruct",
            "sources": [{"uri": str(src)}],
            "block_size": 48,
            "tokenizer": {"vocab_size": 300},
            "split": {"validation_fraction": 0.1},
            "pack_instructions": False,
            "cleaning": {"min_chars": 1},
        }
    )
    return prepare(cfg, root / "prepared").path


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory, instruct_data: Path) -> Path:
    """A freshly initialised tiny Llama saved with the data's tokenizer and a training history."""
    from kubellm.config.train import ModelConfig
    from kubellm.data.format import open_prepared
    from kubellm.models.causal_lm import build_model

    prepared = open_prepared(instruct_data)
    m = prepared.manifest
    tok = prepared.load_tokenizer()
    model = build_model(
        ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64),
        vocab_size=m.vocab_size,
        block_size=64,
        bos_token_id=m.bos_token_id,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.pad_token_id,
        seed=0,
    )
    out = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_history(out, 20, 6.0)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    """A LoRA adapter on ``base_dir`` whose weights are non-zero (so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    write_history(out, 10, 3.0)
    return out


@pytest.fixture(scope="session")
def speaker_dir(tmp_path_factory: pytest.TempPathFactory, instruct_data: Path) -> Path:
    """A random tiny Llama with untied output embeddings: its greedy answers are non-empty gibberish
    (a tied random model repeats its last input token, here the special ``<|assistant|>``, which
    decodes to nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubellm.data.format import open_prepared

    prepared = open_prepared(instruct_data)
    m = prepared.manifest
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=m.bos_token_id,
            eos_token_id=m.eos_token_id,
            pad_token_id=m.pad_token_id,
        )
    )
    out = tmp_path_factory.mktemp("speaker") / "model"
    model.save_pretrained(str(out))
    prepared.load_tokenizer().save_pretrained(str(out))
    return out


def force_empty_answers(model, start_id: int, end_id: int, strength: float = 0.5) -> None:
    """Edit an untied Llama so that it ends its turn at once: hidden dimension 0 carries 1.0 only at
    ``start_id`` (the chat template's ``<|assistant|>``), no layer writes to it, and only ``end_id``'s
    output row reads it. Perplexity stays within 1 % of the unedited model's; every answer is empty."""
    import torch

    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        inp[:, 0] = 0.0
        inp[start_id, 0] = 1.0
        out[:, 0] = 0.0
        out[end_id, 0] = strength
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0


@pytest.fixture(scope="session")
def silent_dir(tmp_path_factory: pytest.TempPathFactory, speaker_dir: Path) -> Path:
    """``speaker_dir`` edited (and saved like any model) so that every answer is empty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(speaker_dir))
    tok = AutoTokenizer.from_pretrained(str(speaker_dir))
    force_empty_answers(model, tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids("<|end|>"))
    out = tmp_path_factory.mktemp("silent") / "model"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
