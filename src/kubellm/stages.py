"""The lifecycle's steps as pipelines and the CLI see them.

Each function takes what a KFP component has — config dicts (see :mod:`kubellm.config.params`), local
paths of input/output artifacts, the MLflow parent run id — re-validates the configs with the same
pydantic models, runs the stage inside its MLflow nested run, and returns a :class:`StageOutput` whose
metrics and Markdown report the component hands to the Kubeflow UI. A component body is therefore one
call into this module; the stage logic itself lives in ``kubellm.data``, ``kubellm.train``,
``kubellm.tracking`` and ``kubellm.k8s``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubellm.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    PretrainConfig,
    RunConfig,
    TrackingConfig,
)
from kubellm.config.params import from_param
from kubellm.log import get_logger
from kubellm.tracking.base import NullTracker, Tracker

log = get_logger("stages")


@dataclass
class StageOutput:
    """What a stage hands back to its component: UI metrics, a Markdown report, named values."""

    metrics: dict[str, float] = field(default_factory=dict)
    report_md: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracking:
    """Where a stage logs: the tracking config, the local working directory, the parent run."""

    config: TrackingConfig
    workdir: str
    parent_run_id: str | None = None

    @classmethod
    def from_param(cls, tracking: dict[str, Any], workdir: str, parent_run_id: str | None = None, *,
                   kfp_run_id: str | None = None) -> Tracking:
        """``kfp_run_id`` finds the parent run when its id cannot be passed in: inside a
        ``dsl.ParallelFor``, KFP's local runner replaces every task-output parameter with the loop item
        (kfp 2.17 ``create_parameter_loop_iteration_task_spec``), so loop bodies look the parent up."""
        cfg = from_param(TrackingConfig, tracking, "tracking config")
        if not parent_run_id and kfp_run_id and cfg.enabled:
            from kubellm.tracking.mlflow_tracker import find_parent_run

            parent_run_id = find_parent_run(cfg, workdir, kfp_run_id)
        return cls(cfg, workdir, parent_run_id or None)

    @contextlib.contextmanager
    def stage(self, name: str, config: Any = None) -> Iterator[Tracker]:
        if not self.config.enabled:
            yield NullTracker()
            return
        from kubellm.tracking.mlflow_tracker import stage_run

        cfg_doc = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        with stage_run(self.config, self.workdir, parent_run_id=self.parent_run_id, stage=name,
                       config=cfg_doc) as tracker:
            yield tracker

    def run_link(self, run_id: str | None) -> str:
        """A Markdown line pointing at the MLflow run (a link when the store is an HTTP server)."""
        if not run_id or not self.config.enabled:
            return ""
        from kubellm.tracking.mlflow_tracker import resolve_tracking_uri

        uri = resolve_tracking_uri(self.config, self.workdir)
        if uri.startswith(("http://", "https://")):
            return f"MLflow run: [{run_id}]({uri.rstrip('/')}/#/runs/{run_id})\n"
        return f"MLflow run: `{run_id}` in `{uri}`\n"


def _numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) dict, for the UI's metrics view."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, int | float):  # bool is an int: True → 1.0
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(_numeric(v, f"{key}."))
    return out


# --------------------------------------------------------------------------------------------------
# Parent run (one per lifecycle run)


def start_run(run_config: dict[str, Any], tracking: dict[str, Any], workdir: str, *, pipeline: str,
              run_name: str, kfp_run_id: str) -> str:
    """Create (or, for a retried task, re-attach to) the MLflow parent run; returns its id."""
    trk = Tracking.from_param(tracking, workdir)
    if not trk.config.enabled:
        return ""
    from kubellm.tracking.mlflow_tracker import start_parent_run

    cfg = from_param(RunConfig, run_config, "run config")
    return start_parent_run(trk.config, workdir, pipeline=pipeline, run_name=run_name,
                            config=cfg.model_dump(mode="json"),
                            tags={"kfp_run_id": kfp_run_id, "config_hash": cfg.config_hash()})


def finish_run(tracking: dict[str, Any], workdir: str, *, pipeline: str, run_name: str, kfp_run_id: str,
               state: str, error: str | None = None) -> str:
    """Record the pipeline's final state on its parent run (the exit handler's one job)."""
    trk = Tracking.from_param(tracking, workdir)
    if not trk.config.enabled:
        return state
    from kubellm.tracking.mlflow_tracker import end_parent_run, start_parent_run

    run_id = start_parent_run(trk.config, workdir, pipeline=pipeline, run_name=run_name, config={},
                              tags={"kfp_run_id": kfp_run_id})
    status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}.get(state, "FAILED")
    end_parent_run(trk.config, workdir, run_id, status, summary={"kfp_state": state, "error": error or ""})
    return status


# --------------------------------------------------------------------------------------------------
# Stages


def prep(config: dict[str, Any], out_dir: str, trk: Tracking, *, stage: str = "prep",
         tokenizer_dir: str | None = None, source_uri: str | None = None) -> StageOutput:
    """Data preparation. ``source_uri`` replaces the first source's URI (the UI's dataset parameter).

    ``values["fingerprint"]`` is the *data* fingerprint (sources' content and data config, tokenizer
    left out): what a recurring pipeline compares before it trains again (:func:`data_changed`). The
    prepared dataset's own manifest fingerprint also covers the tokenizer.
    """
    from kubellm.data.prepare import fingerprint, prepare

    cfg = from_param(DataConfig, config, f"{stage} config")
    if source_uri:
        cfg.sources[0].uri = source_uri
    with trk.stage(stage, cfg) as tracker:
        res = prepare(cfg, out_dir, tokenizer_dir=tokenizer_dir, tracker=tracker)
        data_fp = res.manifest.fingerprint if tokenizer_dir is None and cfg.tokenizer.path is None else fingerprint(cfg)
        tracker.set_tags({"data_fingerprint": data_fp})
        report = (Path(res.path) / "report.md").read_text(encoding="utf-8")
        link = trk.run_link(getattr(tracker, "run_id", None))
    return StageOutput(_numeric(res.stats), link + report, {"fingerprint": data_fp})


def _train_output(res: Any, link: str, title: str) -> StageOutput:
    d = {k: v for k, v in res.to_json().items() if v is not None}
    rows = "\n".join(f"| {k} | {v} |" for k, v in d.items() if k != "output_dir")
    report = f"# {title}\n\n{link}\n| | |\n|---|---|\n{rows}\n"
    return StageOutput(_numeric(d), report, {})


def _train_as_job(stage: str, stage_cfg: Any, run_config: dict[str, Any] | None, data_dir: str, out_dir: str,
                  trk: Tracking, tracker: Tracker, base_model: str | None = None) -> Any:
    """Train on a Kubeflow training operator instead of in this pod (``distributed.engine`` set).

    The job's pods cannot see this step's artifacts, so the inputs are copied to the shared PVC (which
    the pipeline mounts on this step at the same path as in the job's pods), the job trains there —
    resuming from its own checkpoints when a worker restarts — and the output is copied back into the
    step's output artifact. The directory on the PVC is keyed by run name and data fingerprint, so a
    retried step finds the data already there and re-attaches to the running job.
    """
    import shutil

    from kubellm.data.format import open_prepared
    from kubellm.fsutil import atomic_dir
    from kubellm.k8s.training_job import SHARED_MOUNT, run_training_job
    from kubellm.train.loop import TrainResult

    if not run_config:
        from kubellm.errors import ConfigError

        raise ConfigError(f"{stage}.distributed.engine {stage_cfg.distributed.engine!r} needs the run config "
                          "(platform, tracking) to build the training job")
    cfg = from_param(RunConfig, run_config, "run config")
    setattr(cfg, stage, stage_cfg)  # the effective section (a sweep trial's overrides included)
    fp = open_prepared(data_dir).manifest.fingerprint
    work = Path(SHARED_MOUNT) / "runs" / cfg.name / f"{stage}-{fp[:16]}"
    shared = {"data": work / "data", "out": work / "output", "base": work / "base"}
    if not (shared["data"] / "manifest.json").is_file():
        with atomic_dir(shared["data"]) as tmp:
            shutil.copytree(data_dir, tmp, dirs_exist_ok=True)
    if base_model is not None and not (shared["base"] / "config.json").is_file():
        with atomic_dir(shared["base"]) as tmp:
            shutil.copytree(base_model, tmp, dirs_exist_ok=True)
    outcome = run_training_job(stage, cfg, str(shared["data"]), str(shared["out"]),
                               str(shared["base"]) if base_model is not None else None, data_fingerprint=fp,
                               env={"KUBELLM_PARENT_RUN_ID": trk.parent_run_id or ""})
    tracker.set_tags({f"{stage}.job": f"{outcome.kind}/{outcome.name}", f"{stage}.job_restarted": str(outcome.restarted)})
    shutil.copytree(shared["out"], out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints"))  # checkpoints stay on the PVC
    return TrainResult.read(out_dir)


def _preemptible(func: Any) -> Any:
    """A training stage interrupted by SIGTERM (its checkpoint written) ends the process with the
    interruption's exit code (143, as a signal-killed process would) instead of a traceback's 1."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kubellm.train.loop import TrainingInterrupted

        try:
            return func(*args, **kwargs)
        except TrainingInterrupted as err:
            log.warning("%s: %s", func.__name__, err)
            raise SystemExit(err.exit_code) from err

    return wrapper


@_preemptible
def pretrain(config: dict[str, Any], data_dir: str, out_dir: str, trk: Tracking, *,
             run_config: dict[str, Any] | None = None) -> StageOutput:
    """Pretraining, in this process or (``distributed.engine`` set) as a training-operator job."""
    from kubellm.train.pretrain import pretrain as run

    cfg = from_param(PretrainConfig, config, "pretrain config")
    with trk.stage("pretrain", cfg) as tracker:
        if cfg.distributed.engine != "none":
            res = _train_as_job("pretrain", cfg, run_config, data_dir, out_dir, trk, tracker)
        else:
            res = run(cfg, data_dir, out_dir, tracker)
        link = trk.run_link(getattr(tracker, "run_id", None))
    return _train_output(res, link, "Pretraining")


def trial_stage(stage: str, trial: dict[str, Any] | None) -> str:
    """``finetune`` → ``finetune.trial-2`` inside a sweep (stage names are unique within a run)."""
    return f"{stage}.{trial['name']}" if trial else stage


@_preemptible
def finetune(config: dict[str, Any], base_model: str, data_dir: str, out_dir: str, trk: Tracking, *,
             trial: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None) -> StageOutput:
    """LoRA fine-tuning; a sweep ``trial`` (``{"name", "overrides"}``) adjusts the config first; with
    ``distributed.engine`` set it runs as a training-operator job."""
    from kubellm.config.run import trial_finetune
    from kubellm.train.finetune import finetune as run

    cfg = from_param(FinetuneConfig, config, "finetune config")
    if trial:
        cfg = trial_finetune(cfg, trial.get("overrides", {}), f"sweep trial {trial['name']}")
    with trk.stage(trial_stage("finetune", trial), cfg) as tracker:
        if cfg.distributed.engine != "none":
            res = _train_as_job("finetune", cfg, run_config, data_dir, out_dir, trk, tracker, base_model=base_model)
        else:
            res = run(cfg, base_model, data_dir, out_dir, tracker)
        link = trk.run_link(getattr(tracker, "run_id", None))
    return _train_output(res, link, "LoRA fine-tuning")


def evaluate(config: dict[str, Any], model_dir: str, data_dir: str, out_dir: str, trk: Tracking, *,
             base_model: str | None = None, stage: str = "evaluate") -> StageOutput:
    """Evaluation and the gate; ``values["passed"]`` is what the pipeline's ``dsl.If`` tests."""
    from kubellm.train.evaluate import evaluate as run

    cfg = from_param(EvalConfig, config, "evaluate config")
    with trk.stage(stage, cfg) as tracker:
        res = run(cfg, model_dir, data_dir, out_dir, base_model=base_model, tracker=tracker)
        link = trk.run_link(getattr(tracker, "run_id", None))
    report = link + Path(res.report_path).read_text(encoding="utf-8")
    metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)}
    metrics["gate_passed"] = float(res.passed)
    return StageOutput(metrics, report, {"passed": bool(res.passed), "reasons": list(res.reasons)})


def register(model_dir: str, trk: Tracking, *, base_model: str | None, metrics: dict[str, float],
             data_fingerprint: str | None = None) -> StageOutput:
    """Log and register the model; the new version gets the ``candidate`` alias."""
    from kubellm.tracking.registry import register_model

    with trk.stage("register") as tracker:
        tags = {"data_fingerprint": data_fingerprint} if data_fingerprint else None
        info = register_model(trk.config, trk.workdir, model_dir, run_id=tracker.run_id or "",
                              base_model=base_model, metrics=metrics, tags=tags)
        tracker.log_metrics({"registered_version": float(info.version)})
    report = (f"# Registered model\n\n{trk.run_link(tracker.run_id)}\n| name | version | aliases | uri |\n"
              f"|---|---|---|---|\n| {info.name} | {info.version} | {', '.join(info.aliases)} | {info.uri} |\n")
    return StageOutput({"version": float(info.version)}, report,
                       {"name": info.name, "version": info.version, "uri": info.uri})


def data_changed(config: dict[str, Any], trk: Tracking, *, source_uri: str | None = None) -> StageOutput:
    """Continuous fine-tuning's first question: is there data the champion has not seen?"""
    from kubellm.data.prepare import fingerprint
    from kubellm.tracking.registry import champion_info

    cfg = from_param(DataConfig, config, "instruct_data config")
    if source_uri:
        cfg.sources[0].uri = source_uri
    t0 = time.perf_counter()
    with trk.stage("check_data", cfg) as tracker:
        fp = fingerprint(cfg)
        champ = champion_info(trk.config, trk.workdir) if trk.config.enabled else None
        seen = (champ.tags or {}).get("data_fingerprint") if champ is not None else None
        changed = fp != seen
        tracker.log_metrics({"data_changed": float(changed)})
        tracker.set_tags({"data_fingerprint": fp})
    if champ is None:
        why = "no champion yet: training the first one"
    elif changed:
        why = f"data changed since champion v{champ.version} was trained (fingerprint {seen} → {fp})"
    else:
        why = f"data unchanged since champion v{champ.version} was trained (fingerprint {fp}): nothing to do"
    log.info(why)
    report = f"# Data check\n\n{why}\n"
    return StageOutput({"changed": float(changed), "seconds": time.perf_counter() - t0}, report,
                       {"changed": changed, "fingerprint": fp,
                        "champion_uri": f"models:/{trk.config.registered_model}@champion" if champ else ""})


def resolve_model(trk: Tracking, uri: str, out_dir: str | None = None) -> str:
    """A local directory for ``models:/…`` URIs (downloaded from the registry); other refs unchanged."""
    if not uri.startswith("models:/"):
        return uri
    from kubellm.tracking.registry import resolve_model_uri

    return str(resolve_model_uri(trk.config, trk.workdir, uri))



def publish(out: StageOutput, *, report: str | None = None, metrics: Any = None, artifact: Any = None) -> None:
    """Hand a stage's output to KFP: the Markdown report file, the Metrics artifact (anything with
    ``log_metric``), and the numeric metrics as metadata of the stage's main output artifact."""
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(out.report_md, encoding="utf-8")
    for name, value in sorted(out.metrics.items()):
        if metrics is not None:
            metrics.log_metric(name, value)
        if artifact is not None:
            artifact.metadata[name] = value



def fetch_model(ref: str, out_dir: str, trk: Tracking) -> str:
    """Copy a base model into ``out_dir``: a local directory, a ``models:/`` URI or a Hub id.

    Only safetensors weights, configs and tokenizer files are taken (a pickle ``.bin`` can run code
    on load). Hub downloads need the network; offline they fail with one line.
    """
    import shutil

    from kubellm.errors import TrainingError
    from kubellm.fsutil import atomic_dir

    src = Path(resolve_model(trk, ref)) if ref.startswith("models:/") else Path(ref)
    with atomic_dir(out_dir) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "checkpoints"))
        elif src.exists():
            raise TrainingError(f"base model {ref}: expected a model directory, found a file")
        else:
            try:
                from huggingface_hub import snapshot_download

                snapshot_download(ref, local_dir=str(tmp),
                                  allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"])
            except Exception as err:  # offline, unknown id, gated repo: one line either way
                raise TrainingError(f"base model {ref!r}: not a local directory and not downloadable from "
                                    f"the Hugging Face Hub here ({type(err).__name__})") from None
        if not any(p.suffix == ".safetensors" for p in tmp.iterdir()):
            raise TrainingError(f"base model {ref}: no *.safetensors weights")
    log.info("fetched base model %s → %s", ref, out_dir)
    return f"{ref} → {out_dir}"


def read_metrics(results_dir: str) -> dict[str, float]:
    """The numeric metrics of an evaluation results directory (``metrics.json``)."""
    doc = json.loads((Path(results_dir) / "metrics.json").read_text(encoding="utf-8"))
    return _numeric(doc.get("metrics", doc))


def _smoke_generate(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    """Load the model the way the predictor does and generate once: the local deployment's health
    check (no Kubernetes here, so "healthy" means: it loads and answers)."""
    import torch

    from kubellm.train.model import load_causal_lm

    lm = load_causal_lm(model_dir, device="cpu")
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def deploy(run_config: dict[str, Any], model_uri: str, out_dir: str, trk: Tracking, *, target: str) -> StageOutput:
    """Deploy a registered version; on success it becomes ``champion``.

    On a cluster: the InferenceService is created or patched, waited for, smoke-tested, and its canary
    promoted or rolled back (:func:`kubellm.k8s.rollout.rollout`). Locally (no Kubernetes): the same
    manifests are written and checked, and the model is loaded and asked one question as the predictor
    would — the health check that gates the ``champion`` alias.
    """
    import yaml

    from kubellm.k8s.inferenceservice import build_inferenceservice
    from kubellm.tracking.registry import promote

    cfg = from_param(RunConfig, run_config, "run config")
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    with trk.stage("deploy") as tracker:
        storage_uri = cfg.deploy.storage_uri or _download_uri(trk, name, version)
        isvc = build_inferenceservice(cfg, storage_uri, model_version=version)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        manifest = Path(out_dir) / "inferenceservice.yaml"
        manifest.write_text(yaml.safe_dump(isvc, sort_keys=False), encoding="utf-8")
        tracker.log_artifact(manifest, "deploy")
        t0 = time.perf_counter()
        aliases: list[str] = []
        if target == "cluster":
            from kubellm.k8s.rollout import deploy as roll_out

            # One code path with `kubellm deploy`: build, roll out, smoke-test, promote the canary or roll
            # back, then set the alias. The playground is this pipeline's next step, not part of this one.
            step_cfg = cfg.model_copy(deep=True)
            step_cfg.deploy.playground = False
            step_cfg.tracking, step_cfg.workdir = trk.config, trk.workdir
            res = roll_out(step_cfg, storage_uri, model_version=version or None)
            status, endpoint, detail = res.status, res.address or res.url or "", res.reason
            if status == "promoted" and version and trk.config.enabled:
                aliases = _aliases(trk, int(version))
        else:
            answer = _smoke_generate(resolve_model(trk, model_uri), cfg.deploy.smoke_prompt,
                                     cfg.deploy.smoke_max_tokens)
            status, endpoint = "promoted", f"http://{cfg.serve.host}:{cfg.serve.port}/openai/v1"
            detail = f"local smoke test answered {answer!r}"
            if trk.config.enabled and version:
                aliases = promote(trk.config, trk.workdir, int(version), cfg.deploy.promote_alias).aliases
        seconds = time.perf_counter() - t0
        healthy = status == "promoted"
        tracker.log_metrics({"deploy_healthy": float(healthy), "deploy_seconds": seconds})
        tracker.set_tags({"deploy.status": status, "deploy.manifests": str(manifest), "deploy.endpoint": endpoint})
        if not healthy:  # inside the stage run: it ends FAILED with this error
            from kubellm.errors import ServingError

            raise ServingError(f"deployment of {model_uri} {status}: {detail}")
    report = (f"# Deployment\n\n{trk.run_link(tracker.run_id)}\n| | |\n|---|---|\n| model | {model_uri} |\n"
              f"| status | {status} |\n| endpoint | {endpoint} |\n| aliases | {', '.join(aliases)} |\n"
              f"| detail | {detail} |\n| manifests | {manifest} |\n")
    return StageOutput({"healthy": 1.0, "seconds": seconds}, report,
                       {"endpoint": endpoint, "manifests": str(manifest), "aliases": aliases})


def _aliases(trk: Tracking, version: int) -> list[str]:
    from kubellm.tracking.mlflow_tracker import mlflow_client

    client, _ = mlflow_client(trk.config, trk.workdir)
    return sorted(client.get_model_version(trk.config.registered_model, str(version)).aliases or [])


def _download_uri(trk: Tracking, name: str, version: str) -> str:
    """Where the registry keeps a version's files (s3://…, gs://… or a local path): the storageUri."""
    from kubellm.tracking.mlflow_tracker import mlflow_client

    client, _ = mlflow_client(trk.config, trk.workdir)
    return client.get_model_version_download_uri(name, version)


def deploy_playground(run_config: dict[str, Any], endpoint: str, out_dir: str, trk: Tracking, *,
                      target: str) -> StageOutput:
    """The playground's Deployment + Service (applied on a cluster, written locally)."""
    import yaml

    from kubellm.k8s.playground import build_playground

    cfg = from_param(RunConfig, run_config, "run config")
    objs = build_playground(cfg, endpoint)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "playground.yaml"
    path.write_text(yaml.safe_dump_all(objs, sort_keys=False), encoding="utf-8")
    with trk.stage("playground") as tracker:
        tracker.log_artifact(path, "playground")
        tracker.set_tags({"playground.manifests": str(path)})
        if target == "cluster":
            from kubellm.k8s.playground import apply_playground

            apply_playground(objs, namespace=cfg.platform.namespace)
            where = f"applied to namespace {cfg.platform.namespace}"
        else:
            where = "written (run `make playground` to open it locally)"
    report = f"# Prompt playground\n\nEndpoint: {endpoint}\n\nManifests {where}: `{path}`\n"
    return StageOutput({}, report, {"manifests": str(path)})


def sweep_trials(cfg: RunConfig) -> list[dict[str, Any]]:
    """The sweep's trials as ParallelFor items: ``{"name": "trial-1", "overrides": {...}}``."""
    return [{"name": f"trial-{i + 1}", "overrides": dict(t)} for i, t in enumerate(cfg.sweep.trials)]


def select_best(results_dirs: list[str], adapter_dirs: list[str], metric: str, mode: str,
                best_adapter_out: str, best_results_out: str) -> StageOutput:
    """Copy the best trial (among those whose gate passed) to the outputs; ``values["passed"]`` is
    False when no trial passed."""
    import shutil

    best, report = _rank_trials(results_dirs, metric, mode)
    if best is not None:
        shutil.copytree(adapter_dirs[best], best_adapter_out)
        shutil.copytree(results_dirs[best], best_results_out)
    return StageOutput({"best_trial": float(best + 1) if best is not None else 0.0}, report,
                       {"passed": best is not None})


def _rank_trials(results_dirs: list[str], metric: str, mode: str) -> tuple[int | None, str]:
    """Index of the best trial among those whose gate passed (``None`` if none passed), and why."""
    rows = []
    for i, d in enumerate(results_dirs):
        doc = json.loads((Path(d) / "metrics.json").read_text(encoding="utf-8"))
        value = doc.get("metrics", {}).get(metric)
        rows.append((i, bool(doc.get("passed")), value))
    eligible = [(i, v) for i, ok, v in rows if ok and isinstance(v, int | float)]
    table = "\n".join(f"| {i + 1} | {'yes' if ok else 'no'} | {v} |" for i, ok, v in rows)
    report = f"# Sweep\n\n| trial | gate passed | {metric} |\n|---|---|---|\n{table}\n\n"
    if not eligible:
        return None, report + "No trial passed the gate: nothing is registered.\n"
    best = (min if mode == "min" else max)(eligible, key=lambda iv: iv[1])
    return best[0], report + f"Best: trial {best[0] + 1} ({metric} = {best[1]}).\n"


def compare_to_champion(config: dict[str, Any], candidate_results: str, data_dir: str, base_model: str,
                        out_dir: str, trk: Tracking) -> StageOutput:
    """Evaluate the current champion on the same held-out data; ``passed`` when the candidate is
    better (lower perplexity; with generation metrics, ROUGE-L not worse) or there is no champion."""
    from kubellm.tracking.registry import champion_info
    from kubellm.train.evaluate import evaluate as run

    cand = json.loads((Path(candidate_results) / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    champ = champion_info(trk.config, trk.workdir) if trk.config.enabled else None
    if champ is None:
        return StageOutput({"better": 1.0}, "# Champion comparison\n\nNo champion yet: the candidate wins.\n",
                           {"passed": True})
    cfg = from_param(EvalConfig, config, "evaluate config")
    cfg.gate = cfg.gate.model_validate({"max_perplexity_ratio": None})  # plain measurement, no gate
    champ_dir = resolve_model(trk, f"models:/{trk.config.registered_model}@champion")
    with trk.stage("evaluate_champion", cfg) as tracker:
        res = run(cfg, champ_dir, data_dir, out_dir, base_model=base_model, tracker=tracker)
        better_ppl = cand["perplexity"] < res.metrics["perplexity"]
        rouge_ok = "rouge_l" not in cand or cand["rouge_l"] >= res.metrics.get("rouge_l", 0.0)
        passed = better_ppl and rouge_ok
        tracker.log_metrics({"candidate_better": float(passed)})
    report = (f"# Candidate vs champion v{champ.version}\n\n{trk.run_link(tracker.run_id)}\n"
              f"| metric | candidate | champion |\n|---|---|---|\n"
              + "".join(f"| {k} | {cand.get(k)} | {res.metrics.get(k)} |\n" for k in ("perplexity", "rouge_l", "token_f1")
                        if k in cand or k in res.metrics)
              + f"\n{'Candidate is better: promote.' if passed else 'Champion stays: candidate is not better.'}\n")
    return StageOutput({"candidate_better": float(passed), "champion_perplexity": res.metrics["perplexity"]},
                       report, {"passed": passed})
