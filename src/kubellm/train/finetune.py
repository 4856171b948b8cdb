"""``kubellm finetune``: LoRA (or QLoRA) fine-tuning of a causal LM on prepared instruction data.

The base model is the pretraining output or any Hugging Face causal LM (local directory, or a Hub id
where the network allows), loaded through :func:`kubellm.models.causal_lm.load_causal_lm` (safetensors only,
remote code only at a pinned revision). Only the adapters train; the loss covers response tokens only
(prep sets prompt labels to -100, padding adds more -100). The shared loop brings checkpoints, resume,
SIGTERM handling and torchrun support.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubellm.config.train import FinetuneConfig
from kubellm.errors import TrainingError
from kubellm.fsutil import user_path
from kubellm.tracking.base import Tracker
from kubellm.train.loop import TrainJob, TrainResult, claim_run_dir, run_spec, train

MERGED_DIR = "merged"


def resolve_base(base_model: str | Path) -> str:
    """A checked local model directory (absolute path) or a Hub id, as recorded in the adapter."""
    from kubellm.models.causal_lm import check_local_weights, is_adapter_dir

    path = user_path(base_model)
    if not path.exists():
        text = str(base_model)
        if text.startswith(("/", ".", "~")) or text.count("/") > 1:
            raise TrainingError(f"base model {text}: directory not found")
        return text  # a Hub id ("owner/name"); whether it can be fetched shows when it loads
    if not path.is_dir():
        raise TrainingError(f"base model {path}: expected a model directory, found a file")
    if is_adapter_dir(path):
        raise TrainingError(
            f"base model {path}: is a LoRA adapter, not a full model; pass its base model "
            f"(or the adapter's {MERGED_DIR}/ directory)"
        )
    if not (path / "config.json").is_file():
        raise TrainingError(f"base model {path}: not a Hugging Face model directory (no config.json)")
    check_local_weights(path)
    return str(path.resolve())


def _check_tokenizers(base_tok: Any, data_tok: Any, embeddings: int, base: str, data_dir: Path) -> None:
    """Token ids in the data must mean the same tokens to the model."""
    if len(data_tok) > embeddings:
        raise TrainingError(
            f"{data_dir}: tokenizer has {len(data_tok)} tokens but base model {base} has only "
            f"{embeddings} embeddings; prepare the data with the base model's tokenizer"
        )
    base_vocab = base_tok.get_vocab()
    clash = [t for t, i in data_tok.get_vocab().items() if base_vocab.get(t, i) != i]
    if clash:
        raise TrainingError(
            f"{data_dir}: tokenized with a different tokenizer than base model {base} "
            f"({len(clash)} tokens have other ids, e.g. {clash[0]!r}); prepare the data with "
            "instruct_data.tokenizer.path set to the base model"
        )


def finetune(
    cfg: FinetuneConfig,
    base_model: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    tracker: Tracker | None = None,
) -> TrainResult:
    """LoRA fine-tune ``base_model`` on the prepared instruction dataset ``data_dir`` into ``out_dir``.

    ``out_dir`` receives the adapter (``adapter_config.json`` with ``base_model_name_or_path``,
    ``adapter_model.safetensors``), the tokenizer, ``history.jsonl``, ``kubellm_train.json`` and, with
    ``cfg.merge``, ``merged/`` (a full model). Rerunning with the same ``out_dir`` resumes an interrupted
    run and returns the stored result of a finished one.
    """
    from kubellm.train.batches import load_splits, open_training_data
    from kubellm.train.lora import check_qlora_available

    out_dir = claim_run_dir(out_dir, [data_dir, base_model])  # before any work
    prepared = open_training_data(data_dir, "instruct", "finetune")
    if cfg.quantization == "4bit":
        check_qlora_available()
    base = resolve_base(base_model)
    m = prepared.manifest
    spec = run_spec(
        cfg.loop,
        cfg.optim,
        stage="finetune",
        base_model=base,
        revision=cfg.revision,
        lora=cfg.lora.model_dump(),
        quantization=cfg.quantization,
        merge=cfg.merge,
        data=m.fingerprint,
    )

    def build(ctx: Any) -> TrainJob:
        import torch

        from kubellm.models.causal_lm import count_parameters, empty_causal_lm, load_causal_lm
        from kubellm.train.lora import apply_lora, quantization_config
        from kubellm.train.sharding import builds_empty

        qlora = cfg.quantization == "4bit"
        if builds_empty(cfg.loop, ctx):  # sharded: rank 0 loads the base and hands the others their shards
            loaded = empty_causal_lm(base, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        else:
            loaded = load_causal_lm(
                base,
                device=ctx.device,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                for_training=True,
                dtype=None if qlora else torch.float32,
                quantization_config=quantization_config() if qlora else None,
            )
        tokenizer = prepared.load_tokenizer()
        _check_tokenizers(
            loaded.tokenizer, tokenizer, loaded.model.get_input_embeddings().num_embeddings, base, prepared.path
        )
        model = loaded.model
        if qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.loop.gradient_checkpointing)
        model = apply_lora(model, cfg.lora, seed=cfg.loop.seed)
        model.peft_config["default"].base_model_name_or_path = base
        train_split, val_split = load_splits(prepared)

        def write_outputs(trained: Any, dst: Path, state_dict: dict[str, Any] | None) -> None:
            trained.save_pretrained(str(dst), state_dict=state_dict)
            tokenizer.save_pretrained(str(dst))
            if cfg.merge:  # last: merging folds the adapter into the base weights in place
                # A sharded model cannot merge in place: the adapter just written goes onto a plain
                # copy of the base, on rank 0 only.
                merged = (
                    trained.merge_and_unload()
                    if state_dict is None
                    else load_causal_lm(
                        dst,
                        base_model=base,
                        device="cpu",
                        dtype=torch.float32,
                        revision=cfg.revision,
                        trust_remote_code=cfg.trust_remote_code,
                        merge_adapter=True,
                    ).model
                )
                merged.save_pretrained(str(dst / MERGED_DIR))
                tokenizer.save_pretrained(str(dst / MERGED_DIR))

        return TrainJob(
            stage="finetune",
            model=model,
            train_split=train_split,
            val_split=val_split,
            pad_token_id=m.pad_token_id,
            loop=cfg.loop,
            optim=cfg.optim,
            write_outputs=write_outputs,
            parameters=count_parameters(model),
            trainable_parameters=count_parameters(model, trainable_only=True),
        )

    return train(out_dir, spec, build, tracker)
