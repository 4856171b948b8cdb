"""``kubellm pretrain``: train a decoder-only Llama model from scratch on packed blocks.

Sets up the model (a size preset or explicit dimensions; vocabulary and special ids from the prepared
dataset) and its data, then hands both to the shared loop (:mod:`kubellm.train.loop`), which brings
checkpoints, resume, SIGTERM handling and torchrun support.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubellm.config.train import PretrainConfig
from kubellm.errors import ConfigError
from kubellm.tracking.base import Tracker
from kubellm.train.loop import TrainJob, TrainResult, claim_run_dir, run_spec, train


def pretrain(
    cfg: PretrainConfig, data_dir: str | Path, out_dir: str | Path, tracker: Tracker | None = None
) -> TrainResult:
    """Pretrain a model on the prepared dataset ``data_dir``; write a Hugging Face model dir to ``out_dir``.

    ``out_dir`` receives the model (safetensors, config.json, generation_config.json), the tokenizer,
    ``history.jsonl`` and ``kubellm_train.json``. Rerunning with the same ``out_dir`` resumes an
    interrupted run and returns the stored result of a finished one.
    """
    from kubellm.train.batches import load_splits, open_training_data

    out_dir = claim_run_dir(out_dir, [data_dir])  # before any work
    prepared = open_training_data(data_dir, "pretrain", "pretrain")
    m = prepared.manifest
    positions = cfg.model.max_position_embeddings
    if positions is not None and positions < m.block_size:
        raise ConfigError(
            f"pretrain.model.max_position_embeddings ({positions}) is smaller than the data's "
            f"block_size ({m.block_size})"
        )
    spec = run_spec(cfg.loop, cfg.optim, stage="pretrain", model=cfg.model.model_dump(), data=m.fingerprint)

    def build(ctx: Any) -> TrainJob:
        import contextlib

        import torch

        from kubellm.models.causal_lm import build_model, count_parameters
        from kubellm.train.sharding import builds_empty

        tokenizer = prepared.load_tokenizer()
        # sharded: rank 0 initialises the weights and hands the other ranks their shards
        with torch.device("meta") if builds_empty(cfg.loop, ctx) else contextlib.nullcontext():
            model = build_model(
                cfg.model,
                vocab_size=max(m.vocab_size, len(tokenizer)),
                block_size=m.block_size,
                bos_token_id=m.bos_token_id,
                eos_token_id=m.eos_token_id,
                pad_token_id=m.pad_token_id,
                seed=cfg.loop.seed,
            )
        train_split, val_split = load_splits(prepared)

        def write_outputs(trained: Any, dst: Path, state_dict: dict[str, Any] | None) -> None:
            trained.save_pretrained(str(dst), state_dict=state_dict)
            tokenizer.save_pretrained(str(dst))

        n = count_parameters(model)
        return TrainJob(
            stage="pretrain",
            model=model,
            train_split=train_split,
            val_split=val_split,
            pad_token_id=m.pad_token_id,
            loop=cfg.loop,
            optim=cfg.optim,
            write_outputs=write_outputs,
            parameters=n,
            trainable_parameters=n,
        )

    return train(out_dir, spec, build, tracker)
