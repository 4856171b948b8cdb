"""Training stages: bring in a base model, pretrain, LoRA fine-tune.

Pretraining and fine-tuning run in this process (or under a local ``torchrun``) or — with
``platform.distributed.<stage>.engine`` set — as a training job on the cluster whose rank 0 logs into
this stage's MLflow run (:data:`~kubellm.stages.base.STAGE_RUN_ENV`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kubellm import markdown
from kubellm.config import FinetuneConfig, PlatformConfig, PretrainConfig
from kubellm.errors import TrainingError
from kubellm.stages.base import (
    StageContext,
    StageOutput,
    job_env,
    job_run_config,
    log,
    numeric,
    preemptible,
    section,
    trial_stage,
)
from kubellm.tracking.base import Tracker


def fetch_model(ref: str, out_dir: str | Path, ctx: StageContext) -> str:
    """Copy a base model into ``out_dir``: a local directory, a ``models:/`` URI or a Hub id.

    Only safetensors weights, configs and tokenizer files are taken (a pickle ``.bin`` can run code
    on load). Hub downloads need the network; offline they fail with one line.
    """
    from kubellm.fsutil import atomic_dir
    from kubellm.stages.registry import resolve_model

    src = Path(resolve_model(ref, ctx)) if ref.startswith("models:/") else Path(ref)
    with atomic_dir(out_dir) as tmp:
        if ref.startswith("models:/") and (src / "adapter_config.json").is_file():
            # an adapter version (a champion, say): its base lies in this process's workdir only, so the
            # base the next steps train on is the adapter merged into it, a self-contained model
            from kubellm.models.causal_lm import load_causal_lm

            lm = load_causal_lm(src, device="cpu", merge_adapter=True)
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
        elif src.is_dir():
            shutil.copytree(
                src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "checkpoints")
            )
        elif src.exists():
            raise TrainingError(f"base model {ref}: expected a model directory, found a file")
        else:
            try:
                from huggingface_hub import snapshot_download

                snapshot_download(
                    ref, local_dir=str(tmp), allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
                )
            except Exception as err:  # offline, unknown id, gated repo: one line either way, saying which
                raise TrainingError(
                    f"base model {ref!r}: not a local directory and not downloadable from "
                    f"the Hugging Face Hub here: {hub_error(err)}"
                ) from None
        if not any(p.suffix == ".safetensors" for p in tmp.iterdir()):
            raise TrainingError(f"base model {ref}: no *.safetensors weights")
    log.info("fetched base model %s → %s", ref, out_dir)
    return f"{ref} → {out_dir}"


def hub_error(err: BaseException) -> str:
    """What a Hub download failure means for the user, in one line (not just ``HfHubHTTPError``)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    kind = type(err).__name__
    if status == 401:
        return f"401 unauthorized ({kind}): a gated or private model needs HF_TOKEN with access to it"
    if status == 403:
        return f"403 forbidden ({kind}): HF_TOKEN has no access to this model (accept its terms on the Hub)"
    if status == 404 or kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return f"not found on the Hub ({kind}): check the model id and revision"
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(err, OSError):
        return f"no network or HF_HUB_OFFLINE=1 ({kind}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{kind}: {first}" if first else kind


def _output(res: Any, link: str, title: str) -> StageOutput:
    d = {k: v for k, v in res.to_json().items() if v is not None}
    table = markdown.fields({k: v for k, v in d.items() if k != "output_dir"})
    return StageOutput(numeric(d), markdown.section(title, link, table), {"result": res})


def _as_job(
    stage: str,
    stage_cfg: Any,
    platform: PlatformConfig,
    ctx: StageContext,
    tracker: Tracker,
    run_name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    base_model: str | Path | None = None,
) -> Any:
    """Train as a training-operator job: inputs to the shared volume, the job, the output back."""
    from kubellm.data.format import open_prepared
    from kubellm.k8s.jobspec import SHARED_MOUNT
    from kubellm.k8s.shared_volume import collect_output, stage_inputs
    from kubellm.k8s.training_job import run_training_job
    from kubellm.train.loop import TrainResult

    run_cfg = job_run_config(ctx, platform, stage, run_name, **{stage: stage_cfg})
    fp = open_prepared(data_dir).manifest.fingerprint
    shared = stage_inputs(SHARED_MOUNT, run_name, stage, fp, data_dir, base_model)
    outcome = run_training_job(
        stage,
        run_cfg,
        str(shared.data),
        str(shared.out),
        str(shared.base) if shared.base is not None else None,
        data_fingerprint=fp,
        env=job_env(tracker),
    )
    tracker.set_tags(
        {f"{stage}.job": f"{outcome.kind}/{outcome.name}", f"{stage}.job_restarted": str(outcome.restarted)}
    )
    collect_output(shared.out, out_dir)
    return TrainResult.read(out_dir)


def _engine(platform: PlatformConfig | None, stage: str) -> str:
    return platform.distributed_for(stage).engine if platform is not None else "none"


@preemptible
def pretrain(
    config: PretrainConfig | dict[str, Any],
    data_dir: str | Path,
    out_dir: str | Path,
    ctx: StageContext,
    *,
    platform: PlatformConfig | dict[str, Any] | None = None,
    run_name: str = "kubellm",
) -> StageOutput:
    """Pretraining, in this process or (``platform.distributed.pretrain.engine`` set) as a training job."""
    from kubellm.train.loop import claim_run_dir
    from kubellm.train.pretrain import pretrain as run

    cfg = section(PretrainConfig, config, "pretrain config")
    place = section(PlatformConfig, platform, "platform config") if platform else None
    claim_run_dir(out_dir, [data_dir])  # a refused output fails before the MLflow run opens
    with ctx.stage("pretrain", cfg) as tracker:
        if _engine(place, "pretrain") != "none":
            res = _as_job("pretrain", cfg, place, ctx, tracker, run_name, data_dir, out_dir)
        else:
            res = run(cfg, data_dir, out_dir, tracker)
        link = ctx.run_link(tracker.run_id)
    return _output(res, link, "Pretraining")


@preemptible
def finetune(
    config: FinetuneConfig | dict[str, Any],
    base_model: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    ctx: StageContext,
    *,
    trial: dict[str, Any] | None = None,
    platform: PlatformConfig | dict[str, Any] | None = None,
    run_name: str = "kubellm",
) -> StageOutput:
    """LoRA fine-tuning; a sweep ``trial`` (``{"name", "overrides"}``) adjusts the config first; with
    ``platform.distributed.finetune.engine`` set it runs as a training job."""
    from kubellm.config.run import trial_finetune
    from kubellm.train.finetune import finetune as run
    from kubellm.train.loop import claim_run_dir

    cfg = section(FinetuneConfig, config, "finetune config")
    if trial:
        cfg = trial_finetune(cfg, trial.get("overrides", {}), f"sweep trial {trial['name']}")
    place = section(PlatformConfig, platform, "platform config") if platform else None
    claim_run_dir(out_dir, [data_dir, base_model])  # a refused output fails before the MLflow run opens
    with ctx.stage(trial_stage("finetune", trial), cfg) as tracker:
        if _engine(place, "finetune") != "none":
            res = _as_job("finetune", cfg, place, ctx, tracker, run_name, data_dir, out_dir, base_model)
        else:
            res = run(cfg, base_model, data_dir, out_dir, tracker)
        link = ctx.run_link(tracker.run_id)
    return _output(res, link, "LoRA fine-tuning")
