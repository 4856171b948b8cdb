"""LoRA fine-tuning end to end on a tiny pretrained base: adapters only, response-only loss, merge, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubellm.config.train import FinetuneConfig, PretrainConfig
from kubellm.data.format import open_prepared
from kubellm.models.causal_lm import load_causal_lm
from kubellm.models.losses import IGNORE_INDEX
from kubellm.train.finetune import MERGED_DIR, finetune
from kubellm.train.loop import HISTORY_FILE, TrainingInterrupted


@pytest.fixture(scope="session")
def base_model(pretrain_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubellm.train.pretrain import pretrain

    cfg = PretrainConfig.model_validate(
        {
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "loop": {"max_steps": 15, "micro_batch_size": 8, "log_every": 5, "precision": "fp32"},
        }
    )
    return pretrain(cfg, pretrain_data, tmp_path_factory.mktemp("base") / "model").output_dir


def ft_cfg(**top) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "optim": {"lr": 5e-3, "warmup_steps": 2},
            "loop": {
                "max_steps": 10,
                "micro_batch_size": 4,
                "grad_accum_steps": 2,
                "log_every": 2,
                "checkpoint_every": 4,
                "eval_batches": 3,
                "precision": "fp32",
            },
            **top,
        }
    )


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_only_adapters_and_the_merged_model_matches(base_model: Path, instruct_data: Path, tmp_path: Path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    res = finetune(ft_cfg(merge=True), base_model, instruct_data, out)

    assert 0 < res.trainable_parameters < res.parameters / 5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model.resolve())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert (out / "tokenizer_config.json").is_file() and (out / HISTORY_FILE).is_file()
    assert res.final_loss < json.loads((out / HISTORY_FILE).read_text().splitlines()[0])["loss"]

    # only adapted projections changed: every other base weight is bit-identical in the merged model
    base_w = load_file(str(base_model / "model.safetensors"))
    merged_w = load_file(str(out / MERGED_DIR / "model.safetensors"))
    assert base_w.keys() == merged_w.keys()
    changed = {k for k in base_w if not torch.equal(base_w[k], merged_w[k])}
    assert changed and all(k.split(".")[-2].endswith("proj") for k in changed)
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed

    # merged weights give the outputs of base + adapter, and not those of the base alone
    ids = torch.tensor([open_prepared(instruct_data).load_split("validation")[0]["input_ids"]])
    stacked = load_causal_lm(out, device="cpu").model
    merged = load_causal_lm(out / MERGED_DIR, device="cpu").model
    base = load_causal_lm(base_model, device="cpu").model
    torch.testing.assert_close(_logits(merged, ids), _logits(stacked, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(base, ids), _logits(stacked, ids), atol=1e-3)


def test_validation_loss_counts_response_tokens_only(base_model: Path, instruct_data: Path, tmp_path: Path):
    """The loop's val_loss equals a by-hand mean NLL over unmasked response tokens, row by row, with no
    padding: prompt and pad tokens contribute nothing."""
    out = tmp_path / "adapter"
    res = finetune(
        ft_cfg(loop={"max_steps": 4, "micro_batch_size": 4, "eval_batches": 2, "log_every": 2, "precision": "fp32"}),
        base_model,
        instruct_data,
        out,
    )
    model = load_causal_lm(out, device="cpu").model
    rows = open_prepared(instruct_data).load_split("validation").select(range(8))
    nll, count = 0.0, 0
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        logp = torch.log_softmax(_logits(model, ids)[0, :-1].double(), -1)
        for t, target in enumerate(labels[1:].tolist()):
            if target != IGNORE_INDEX:
                nll -= logp[t, target].item()
                count += 1
    assert sum(len(r["input_ids"]) for r in rows) > count + 8  # prompts are really masked
    assert res.val_loss == pytest.approx(nll / count, rel=1e-4)


def test_finetune_resume_with_dropout_matches_an_uninterrupted_run(
    base_model: Path, instruct_data: Path, tmp_path: Path, sigterm_at
):
    from safetensors.torch import load_file

    finetune(ft_cfg(), base_model, instruct_data, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        finetune(ft_cfg(), base_model, instruct_data, tmp_path / "resumed", sigterm_at(6))
    # the resumed attempt recomputes activations (gradient checkpointing restores dropout's RNG state)
    resumed_cfg = ft_cfg()
    resumed_cfg.loop.gradient_checkpointing = True
    res = finetune(resumed_cfg, base_model, instruct_data, tmp_path / "resumed")
    assert res.resumed_from_step == 6
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
