"""The deploy stage, composed once: roll out → promote → playground.

``kubellm deploy`` and the pipeline's deploy component both call :func:`deploy`. On a cluster the
InferenceService is created or patched, waited for, smoke-tested and its canary promoted or rolled back
(:func:`kubellm.k8s.rollout.rollout`). Locally (no Kubernetes) the same manifests are written, and the
real predictor (``kubellm serve``'s app) is started on 127.0.0.1 for the same smoke request the cluster
rollout sends, then stopped: the status says ``verified``, not ``promoted``, and no endpoint is claimed
(the report says how to serve the version). Only a healthy deployment moves the registry alias
(``champion``), and only then is the playground created in front of it.

``deploy.runtime: llm-inference-service`` releases a registered *adapter version* instead
(:class:`_AdapterRelease`): the LLMInferenceService serves the adapter's base version once, the champion
adapter under the alias clients call, and the candidate under its own name (``<alias>-v<N>``) while the
smoke request and the served benchmark gate score it *by name* (:func:`kubellm.k8s.llmisvc.adapter_rollout`);
the alias entry and the registry's ``champion`` move only when that passes. Locally the real predictor
serves the base with the candidate adapter on it, checked by the same name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from kubellm import markdown
from kubellm.config import EvalConfig, PlatformConfig, RunConfig
from kubellm.config.run import ReleaseConfig
from kubellm.errors import ConfigError, ServingError
from kubellm.stages.base import StageContext, StageOutput, section

Target = Literal["local", "cluster"]


def deploy(
    config: RunConfig | ReleaseConfig | dict[str, Any],
    out_dir: str | Path,
    ctx: StageContext,
    *,
    target: Target,
    model_uri: str | None = None,
    storage_uri: str | None = None,
    platform: PlatformConfig | dict[str, Any] | None = None,
    run_name: str | None = None,
    eval_config: EvalConfig | dict[str, Any] | None = None,
    evaluation_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    api_client: Any = None,
    smoke: Callable[..., None] | None = None,
) -> StageOutput:
    """Deploy a model: ``model_uri`` (``models:/name/version``) names the registered version, whose files
    the InferenceService loads unless ``storage_uri`` / ``deploy.storage_uri`` points elsewhere (with
    ``deploy.runtime: llm-inference-service``: the version is an adapter, and those name its base's
    location instead). ``smoke`` replaces the smoke request: ``smoke(url)``, or ``smoke(url, adapter)``
    for an adapter release.

    ``config`` is the whole run config (the CLI) or the step's run-time :class:`ReleaseConfig`, to which
    the compile-time ``platform`` and the run's name are added. With ``eval_config`` listing benchmarks,
    the evaluation's results (``evaluation_dir``) and its prepared data (``data_dir``), the served model
    is also scored on those benchmarks before promotion (``deploy.benchmark_gate``). Raises :class:`ServingError` when
    the
    rollout ends anything but ``promoted`` (the stage run ends FAILED).
    """
    from kubellm.k8s.inferenceservice import build_inferenceservice
    from kubellm.tracking import registry

    cfg = _run_config(config, platform, run_name)
    version = registry.parse_model_uri(model_uri).version if model_uri else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ctx.stage("deploy") as tracker:
        # first: a serve.max_prompt_tokens the gate cannot fit is refused before anything is loaded or applied
        gate = _BenchmarkGate.create(cfg, eval_config, evaluation_dir, data_dir)
        storage = storage_uri or cfg.deploy.storage_uri
        release = None
        if cfg.deploy.runtime == "llm-inference-service":
            release = _AdapterRelease.resolve(cfg, ctx, model_uri, storage)
            obj, manifest = release.service, out / "llminferenceservice.yaml"
        else:
            if storage is None and version is not None and ctx.tracking.enabled:
                if target == "cluster":
                    _loadable_in_pod(cfg, registry.version_info(ctx.tracking, ctx.workdir, version))
                storage = registry.download_uri(ctx.tracking, ctx.workdir, version)
            obj, manifest = build_inferenceservice(cfg, storage, model_version=version), out / "inferenceservice.yaml"
        manifest.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
        tracker.log_artifact(manifest, "deploy")
        t0 = time.perf_counter()
        if release is not None:
            status, endpoint, detail = release.run(cfg, ctx, target, api_client, smoke, gate)
        elif target == "cluster":
            status, endpoint, detail = _roll_out(cfg, obj, api_client, _check(cfg, smoke, gate))
        else:
            status, endpoint, detail = _smoke_locally(cfg, ctx, model_uri, _check(cfg, smoke, gate))
        if gate is not None and gate.served:
            tracker.log_metrics({f"served.{k}": v for k, v in gate.served.items()})
        seconds = time.perf_counter() - t0
        healthy = status in ("promoted", "verified")
        tracker.log_metrics({"deploy_healthy": float(healthy), "deploy_seconds": seconds})
        tracker.set_tags(
            {
                "deploy.status": status,
                "deploy.manifests": str(manifest),
                "deploy.endpoint": endpoint,
                "deploy.detail": detail[:500],
            }
        )
        if not healthy:  # inside the stage run: it ends FAILED with this error
            raise ServingError(f"deployment of {model_uri or storage} {status}: {detail}")
        aliases: list[str] = []
        if version is not None and ctx.tracking.enabled:
            aliases = registry.promote(ctx.tracking, ctx.workdir, version, cfg.deploy.promote_alias).aliases
        # where `kubellm serve` listens; vLLM (an LLMInferenceService) keeps the OpenAI routes under /v1
        served_at = (
            (f"{endpoint.rstrip('/')}{_VLLM_API}" if release is not None else endpoint)
            if endpoint
            else f"http://{cfg.serve.host}:{cfg.serve.port}/openai/v1"
        )
        playground = _playground(cfg, served_at, out, target, api_client) if cfg.deploy.playground else None
        if playground is not None:
            tracker.log_artifact(playground, "playground")
            tracker.set_tags({"playground.manifests": str(playground)})
    rows = {
        "model": model_uri or storage,
        "status": status,
        "endpoint": endpoint,
        "aliases": aliases,
        "detail": detail,
        "manifests": manifest,
        "playground": playground,
    }
    served = "\n".join(f"- {line}" for line in gate.lines) if gate is not None and gate.lines else ""
    report = markdown.section(
        "Deployment",
        ctx.run_link(tracker.run_id),
        markdown.fields(rows),
        f"Benchmarks on the served model:\n\n{served}" if served else "",
    )
    return StageOutput(
        {"healthy": 1.0, "seconds": seconds},
        report,
        {"endpoint": endpoint, "manifests": str(manifest), "aliases": aliases, "status": status, "detail": detail},
    )


def _loadable_in_pod(cfg: RunConfig, info: Any) -> None:
    """Refuse, before anything is applied, an adapter version the predictor pod could not start with: KServe
    downloads one storage URI (the adapter's files), and the pod has no registry access to fetch the base
    the adapter records; ``runtime: kubellm`` with ``serve.base_model`` (the base's location in the pod)
    can. Adapters on a shared base on a cluster: ``runtime: llm-inference-service``."""
    if info.tags.get("kind") != "adapter":
        return
    base = f"models:/{info.tags.get('base_name')}/{info.tags.get('base_version')}"
    if cfg.deploy.runtime == "kubellm" and cfg.serve.base_model:
        return
    raise ServingError(
        f"{info.uri} is an adapter version (base {base}): the {cfg.deploy.runtime} predictor pod cannot "
        "fetch its base from the registry; register merged versions (tracking.register_merged: true)"
        + (" or set serve.base_model to the base's location in the pod" if cfg.deploy.runtime == "kubellm" else "")
    )


def _run_config(
    config: RunConfig | ReleaseConfig | dict[str, Any],
    platform: PlatformConfig | dict[str, Any] | None,
    run_name: str | None,
) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    release = section(ReleaseConfig, config, "deploy config")
    extra: dict[str, Any] = {"name": run_name} if run_name else {}
    if platform:
        extra["platform"] = section(PlatformConfig, platform, "platform config")
    return RunConfig(deploy=release.deploy, serve=release.serve, playground=release.playground, **extra)


class _BenchmarkGate:
    """The evaluation's benchmarks, run against a served URL and compared with the evaluated scores."""

    def __init__(self, cfg: RunConfig, eval_cfg: EvalConfig, evaluation_dir: Path, data_dir: Path) -> None:
        self.cfg, self.eval_cfg, self.evaluation_dir, self.data_dir = cfg, eval_cfg, evaluation_dir, data_dir
        self.served: dict[str, float] = {}
        self.lines: list[str] = []

    @classmethod
    def create(cls, cfg: RunConfig, eval_config: Any, evaluation_dir: Any, data_dir: Any) -> _BenchmarkGate | None:
        if not cfg.deploy.benchmark_gate or eval_config is None or evaluation_dir is None or data_dir is None:
            return None
        eval_cfg = section(EvalConfig, eval_config, "evaluate config")
        if not eval_cfg.benchmarks:
            return None
        gate = cls(cfg, eval_cfg, Path(evaluation_dir), Path(data_dir))
        gate.check_fits()
        return gate

    def check_fits(self) -> None:
        """Refuse, before the predictor loads, a ``serve.max_prompt_tokens`` the gate's own requests cannot
        fit. lm-eval's completions client sends at most ``max_prompt_tokens - 1`` tokens of context and
        answer together and keeps at least one context token (``api_models.batch_loglikelihood_requests``,
        then the ``Context length must be greater than 0`` check), so every ``kubellm_choice`` answer —
        cut to ``evaluate.max_new_tokens`` tokens — must be shorter than ``max_prompt_tokens - 1`` tokens.
        Without data: a limit above ``max_new_tokens + 1`` always fits. Otherwise the prepared data
        decides: the gate's questions are tokenized as lm-eval does (context and answer encoded together,
        then split), no model loaded."""
        import tempfile

        from kubellm.data.format import open_prepared
        from kubellm.evaluate.run import plan_for_dataset

        limit, bench = (
            self.cfg.serve.max_prompt_tokens,
            next((b for b in self.eval_cfg.benchmarks if b.task == "kubellm_choice"), None),
        )
        if bench is None or limit - 1 > self.eval_cfg.max_new_tokens:
            return
        prepared = open_prepared(self.data_dir)
        tokenizer = prepared.load_tokenizer()
        with tempfile.TemporaryDirectory(prefix="kubellm-served-bench-") as work:
            plan_for_dataset(self.eval_cfg, prepared, tokenizer, Path(work))
            text = (Path(work) / "kubellm_choice.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines()][: bench.limit]
        longest = max(
            (_answer_tokens(tokenizer, row["prompt"], choice) for row in rows for choice in row["choices"]), default=0
        )
        if longest >= limit - 1:
            raise ConfigError(
                f"serve.max_prompt_tokens={limit} is too small for the served benchmark gate: kubellm_choice's answers "
                f"run to {longest} tokens (cut at evaluate.max_new_tokens={self.eval_cfg.max_new_tokens}) and lm-eval "
                f"sends context + answer within max_prompt_tokens - 1 with at least one context token; set "
                f"serve.max_prompt_tokens >= {longest + 2}, evaluate.max_new_tokens < {limit - 1}, or "
                "deploy.benchmark_gate=false"
            )

    def __call__(self, url: str, model_name: str | None = None, api_path: str = "/openai/v1") -> None:
        """Score the model served at ``url`` (``model_name``: an adapter's name; ``None``: ``serve.model_name``)."""
        import tempfile

        from kubellm.data.format import open_prepared
        from kubellm.evaluate.benchmarks import run_benchmarks_served, served_drops
        from kubellm.evaluate.run import EvalResult, plan_for_dataset

        evaluated = EvalResult.read(self.evaluation_dir).metrics
        prepared = open_prepared(self.data_dir)
        limit = self.cfg.serve.max_prompt_tokens
        with tempfile.TemporaryDirectory(prefix="kubellm-served-bench-") as work:
            plan = plan_for_dataset(self.eval_cfg, prepared, prepared.load_tokenizer(), Path(work))
            try:
                served = run_benchmarks_served(
                    plan,
                    base_url=url,
                    model_name=model_name or self.cfg.serve.model_name,
                    tokenizer_dir=prepared.tokenizer_dir,
                    batch_size=self.eval_cfg.batch_size,
                    max_length=limit,
                    api_path=api_path,
                )
            except AssertionError as err:  # lm-eval's checks, raised deep in its request loop
                raise ConfigError(
                    f"the served benchmark gate could not score {', '.join(b.task for b in plan.benchmarks)}: "
                    "lm-evaluation-harness "
                    f"says {str(err) or 'an internal check failed'!r} with serve.max_prompt_tokens={limit} "
                    "(the longest context + answer it may send); raise serve.max_prompt_tokens or set "
                    "deploy.benchmark_gate=false"
                ) from None
        self.served = served["scores"]
        self.lines, passed = served_drops(evaluated, served, self.cfg.deploy.max_served_benchmark_drop)
        if not passed:
            raise ServingError(
                "the served model scores below its evaluation: "
                + "; ".join(line for line in self.lines if line.endswith("FAIL"))
            )


def _answer_tokens(tokenizer: Any, context: str, answer: str) -> int:
    """The tokens lm-eval scores as ``answer`` after ``context`` (``lm_eval.api.model._encode_pair``:
    trailing spaces move to the answer; the pair is encoded whole and split at the context's length)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, answer = context[:-spaces], context[-spaces:] + answer
    whole = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
    return len(whole) - len(tokenizer(context, add_special_tokens=False)["input_ids"])


def _smoke_request(cfg: RunConfig, model_name: str, **where: Any) -> Callable[[str], None]:
    """The smoke request (``deploy.smoke_prompt``, ``deploy.smoke_max_tokens``) asking for ``model_name``."""
    from kubellm.k8s.rollout import http_smoke

    return http_smoke(model_name, prompt=cfg.deploy.smoke_prompt, max_tokens=cfg.deploy.smoke_max_tokens, **where)


def _check(cfg: RunConfig, smoke: Callable[[str], None] | None, gate: _BenchmarkGate | None) -> Callable[[str], None]:
    """What a new revision must pass before promotion: the smoke request, then the benchmark gate."""
    first = smoke or _smoke_request(cfg, cfg.serve.model_name)

    def check(url: str) -> None:
        first(url)
        if gate is not None:
            gate(url)

    return check


def _roll_out(cfg: RunConfig, isvc: dict, api_client: Any, check: Callable[[str], None]) -> tuple[str, str, str]:
    from kubellm.k8s.rollout import rollout

    res = rollout(
        isvc,
        namespace=cfg.platform.namespace,
        api_client=api_client,
        timeout_s=cfg.deploy.ready_timeout_s,
        poll_s=cfg.deploy.poll_s,
        smoke=check,
    )
    return res.status, res.address or res.url or "", res.reason


def _smoke_locally(
    cfg: RunConfig,
    ctx: StageContext,
    model_uri: str | None,
    check: Callable[[str], None],
    *,
    base: str | None = None,
    adapter: str | None = None,
) -> tuple[str, str, str]:
    """The cluster's checks (smoke request, benchmark gate) against the real predictor, started on
    127.0.0.1 for them and stopped: the version alone, or (``base``, ``adapter``) the base version with
    the version served on it as adapter ``adapter``."""
    from kubellm.serve.app import BackgroundServer, build_app, load_model

    if not model_uri:
        raise ConfigError("a local deployment needs the registered model (models:/name/version) to smoke-test")
    local = cfg.model_copy(update={"tracking": ctx.tracking, "workdir": ctx.workdir})
    model = load_model(local, base, adapters={adapter: model_uri}) if adapter else load_model(local, model_uri)
    with BackgroundServer(build_app(model), host="127.0.0.1") as server:
        try:
            check(server.url)
        except ServingError as err:
            return "failed", "", f"{err} (predictor at {server.url}, stopped)"
    how = (
        f"`kubellm serve --model {base} --adapter {adapter}={model_uri}`"
        if adapter
        else f"`kubellm serve --model {model_uri}`"
    )
    return (
        "verified",
        "",
        f"checks passed on a predictor started for them at {server.url} (stopped); serve this version with {how}",
    )


def adapter_service(cfg: RunConfig, ctx: StageContext, model_uri: str, storage_uri: str | None = None) -> dict:
    """The LLMInferenceService a release of adapter version ``model_uri`` starts from (``kubellm deploy
    --dry-run``): its base, and the champion under the alias."""
    return _AdapterRelease.resolve(cfg, ctx, model_uri, storage_uri or cfg.deploy.storage_uri).service


#: Where vLLM (an LLMInferenceService's workload) keeps the OpenAI routes; ``kubellm serve``: ``/openai/v1``.
_VLLM_API = "/v1"


class _AdapterRelease:
    """``deploy.runtime: llm-inference-service``: an adapter version released on its shared base.

    :meth:`resolve` reads the registry: the version must be an adapter (tags ``kind``, ``base_name``,
    ``base_version``); the LLMInferenceService serves the base version's files (``storage_uri`` /
    ``deploy.storage_uri`` when set), the champion's adapter under the alias (``serve.model_name``) when the
    champion is an adapter of the same base, and :meth:`run` adds the candidate by its own name."""

    def __init__(self, service: dict, version: int, model_uri: str, candidate_uri: str, base_ref: str) -> None:
        self.service, self.version, self.model_uri = service, version, model_uri
        self.candidate_uri, self.base_ref = candidate_uri, base_ref

    @classmethod
    def resolve(
        cls, cfg: RunConfig, ctx: StageContext, model_uri: str | None, base_storage: str | None
    ) -> _AdapterRelease:
        from kubellm.k8s.llmisvc import build_llm_inference_service
        from kubellm.tracking import registry

        version = registry.parse_model_uri(model_uri).version if model_uri else None
        if version is None or not ctx.tracking.enabled:
            raise ConfigError(
                "deploy.runtime llm-inference-service releases a registered adapter version: it needs "
                "tracking.enabled and the version (models:/name/<version>, kubellm deploy --model-version)"
            )
        info = registry.version_info(ctx.tracking, ctx.workdir, version)
        if info.tags.get("kind") != "adapter":
            raise ServingError(
                f"{info.uri} is a merged version: deploy.runtime llm-inference-service serves adapter "
                "versions on their shared base; register adapter versions (tracking.register_merged: "
                "false) or deploy it with deploy.runtime kubellm"
            )
        base_name, base_version = info.tags.get("base_name", ""), info.tags.get("base_version", "")
        if not base_name or not base_version.isdigit():
            raise ServingError(
                f"{info.uri} is an adapter version without its base (tags base_name, base_version); "
                "register it again with kubellm register"
            )
        cls._loadable(cfg, ctx, version)
        base_tracking = ctx.tracking.model_copy(update={"registered_model": base_name})
        base_uri = base_storage or registry.download_uri(base_tracking, ctx.workdir, int(base_version))
        alias = cfg.serve.model_name
        adapters, champion_version = {}, None
        champion = registry.champion_info(ctx.tracking, ctx.workdir, cfg.deploy.promote_alias)
        if champion is not None and (
            champion.tags.get("kind"),
            champion.tags.get("base_name"),
            champion.tags.get("base_version"),
        ) == ("adapter", base_name, base_version):
            adapters[alias] = registry.download_uri(ctx.tracking, ctx.workdir, champion.version)
            champion_version = champion.version
        service = build_llm_inference_service(
            cfg, base_uri, adapters, champion_version=champion_version, model_version=version
        )
        return cls(
            service,
            version,
            info.uri,
            registry.download_uri(ctx.tracking, ctx.workdir, version),
            registry.model_uri(base_name, version=base_version),
        )

    @staticmethod
    def _loadable(cfg: RunConfig, ctx: StageContext, version: int) -> None:
        """Refuse, before the cluster is touched, an adapter vLLM would not load with the service's
        ``maxRank`` (``serve.max_lora_rank``): the release would wait ``deploy.ready_timeout_s`` for a
        workload that never gets ready. The same checks as ``kubellm serve`` makes, on the adapter's files."""
        import tempfile

        from kubellm.k8s.llmisvc import candidate_name
        from kubellm.serve.adapters import inspect_adapter
        from kubellm.tracking import registry

        with tempfile.TemporaryDirectory(prefix="kubellm-adapter-") as tmp:
            files = registry.fetch_version_files(ctx.tracking, ctx.workdir, version, tmp)
            inspect_adapter(candidate_name(cfg.serve.model_name, version), files, cfg.serve.max_lora_rank)

    def run(
        self,
        cfg: RunConfig,
        ctx: StageContext,
        target: Target,
        api_client: Any,
        smoke: Callable[[str, str], None] | None,
        gate: _BenchmarkGate | None,
    ) -> tuple[str, str, str]:
        """``(status, endpoint, detail)``: the live release on a cluster, else the local predictor's checks."""
        from kubellm.k8s.llmisvc import adapter_rollout, candidate_name

        cluster = target == "cluster"
        # vLLM's routes behind the gateway on a cluster (whose URL's path names the service), KServe's locally
        api = _VLLM_API if cluster else "/openai/v1"
        first = smoke or (lambda url, name: _smoke_request(cfg, name, api_path=api, cluster_local=False)(url))
        scored = None if gate is None else (lambda url, name: gate(url, name, api))
        if cluster:
            res = adapter_rollout(
                self.service,
                candidate_uri=self.candidate_uri,
                version=self.version,
                namespace=cfg.platform.namespace,
                api_client=api_client,
                timeout_s=cfg.deploy.ready_timeout_s,
                poll_s=cfg.deploy.poll_s,
                smoke=first,
                gate=scored,
            )
            return res.status, res.url or "", res.reason
        name = candidate_name(cfg.serve.model_name, self.version)

        def check(url: str) -> None:
            for step in (first, scored):
                if step is not None:
                    step(url, name)

        # the base under the name the service gives it, so that only the adapter answers to `name`
        local = cfg.model_copy(
            update={"serve": cfg.serve.model_copy(update={"model_name": self.service["spec"]["model"]["name"]})}
        )
        return _smoke_locally(local, ctx, self.model_uri, check, base=self.base_ref, adapter=name)


def _playground(cfg: RunConfig, endpoint: str, out: Path, target: Target, api_client: Any) -> Path:
    """The playground's Deployment + Service in front of ``endpoint``: applied on a cluster, written always."""
    from kubellm.k8s.playground import apply_playground, build_playground

    if not endpoint:
        raise ServingError("the InferenceService is Ready but reports no URL for the playground to call")
    objs = build_playground(cfg, endpoint)
    path = out / "playground.yaml"
    path.write_text(yaml.safe_dump_all(objs, sort_keys=False), encoding="utf-8")
    if target == "cluster":
        apply_playground(objs, namespace=cfg.platform.namespace, api_client=api_client)
    return path
