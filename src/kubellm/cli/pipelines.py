"""``kubellm run | compile | submit | schedule``: the pipelines, locally and on Kubeflow.

These commands reach the KFP layers (``kubellm.pipelines``) through lazy imports: the CLI is the entry
point that sits above all three layers, while the library modules themselves never import kfp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, no_secrets
from kubellm.errors import ConfigError
from kubellm.fsutil import user_path
from kubellm.pipeline_params import is_pipeline_file

PipelineOpt = Annotated[
    str,
    typer.Option(
        "--pipeline",
        "-p",
        help="A built-in pipeline (kubellm run --help "
        "lists them) or your own pipeline file FILE.py[:FUNC] (a "
        "build(builder) function; see examples/own_data/pipeline.py).",
    ),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help="Set a pipeline run parameter, e.g. --param base_model=/models/base (repeatable).",
        callback=no_secrets,
    ),
]


def parse_params(items: list[str] | None) -> dict[str, object]:
    from kubellm.config.run import _parse_value

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        out[key.strip()] = _parse_value(raw)
    return out


def _run_help() -> str:
    from kubellm.pipeline_params import help_text

    return (
        "Run a pipeline on KFP's local runner on this machine (the embedded default: configs/local.yaml).\n\n"
        "Shows one row per task (a live table on a terminal, a line per task event otherwise) and writes "
        "each task's full log under <workdir>/runs/<run>/logs/; prints a per-stage summary and writes "
        "summary.json beside them. Exits 1 when a stage failed (the summary names it), 0 otherwise — also "
        "when the promotion gate closed. --resume RUN re-runs a failed run: the cacheable steps (prep, "
        "fetch, pretrain, finetune, evaluate) whose inputs are unchanged reuse RUN's outputs.\n\n" + help_text()
    )


def new_run_dir(runs_dir: Path, name: str) -> tuple[str, Path]:
    """A run name unique in ``runs_dir`` (time to the second and a random suffix) and its folder, created
    atomically: two runs started in the same second never share a name, a folder or a summary."""
    import secrets

    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            (runs_dir / run_name).mkdir()
            return run_name, runs_dir / run_name
        except FileExistsError:
            continue


def _output_mode(quiet: bool, verbose: bool):  # -> Mode
    import sys

    if quiet and verbose:
        raise ConfigError("--quiet and --verbose exclude each other")
    return "quiet" if quiet else "verbose" if verbose else "live" if sys.stdout.isatty() else "lines"


@app.command(help=_run_help())
def run(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    pipeline: PipelineOpt = "llm-lifecycle",
    params: ParamOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="RUN",
            help="Reuse the unchanged "
            "cacheable steps' outputs of the earlier run RUN (its name "
            "under <workdir>/runs/).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the summary.")] = False,
    verbose: Annotated[bool, typer.Option(help="Stream every task's full output (KFP's own view).")] = False,
) -> None:
    from kubellm import summary as summ
    from kubellm.fsutil import write_json_atomic
    from kubellm.log import get_logger, print_table
    from kubellm.pipeline_params import builtin, unknown_params

    cfg = load(config, overrides)
    from_file = is_pipeline_file(pipeline)
    if not from_file:
        builtin(pipeline)  # an unknown name: one line naming the built-in pipelines
    extra = parse_params(params)
    bad = None if from_file else unknown_params(pipeline, list(extra))
    if bad:
        raise ConfigError(bad)
    mode = _output_mode(quiet, verbose)
    log = get_logger("run")
    workdir = user_path(cfg.workdir).resolve()
    runs_dir = workdir / "runs"
    if resume is not None and not (runs_dir / resume).is_dir():
        raise ConfigError(f"--resume {resume}: no run of that name under {runs_dir}")
    from kubellm.pipelines import _kfp_local

    _kfp_local.check()  # a kfp whose local runner kubellm does not know: one line, before anything runs
    from kubellm.pipelines._cache import original_stage_runs
    from kubellm.pipelines._runner import run_pipeline, task_stage
    from kubellm.pipelines.api import Builder, pipeline_loader, pipeline_parameters

    make = pipeline_loader(pipeline)  # a user's file is executed once

    def built(run_id: str | None) -> tuple[object, str, list[str], dict[str, object]]:
        """(pipeline, its name, the stages its steps log, its parameters' defaults) for this config."""
        builder = Builder(cfg, "local", run_id=run_id)
        func = make(builder)
        return func, str(builder.name), builder.stages, pipeline_parameters(func)

    # a config or a pipeline file that cannot build fails here, before the run's folder exists
    _, name, _, defaults = built(None)
    bad = unknown_params(f"{name} ({pipeline})" if from_file else name, list(extra), list(defaults))
    if bad:
        raise ConfigError(bad)
    if "base_model" in defaults and defaults["base_model"] is None and not extra.get("base_model"):
        raise ConfigError(
            f"{name} starts from an existing model: pass --param base_model=DIR (or set finetune.base_model)"
        )
    run_name, out_dir = new_run_dir(runs_dir, cfg.name)
    func, name, stages, defaults = built(run_name)
    if "run_name" in defaults:
        extra = {"run_name": run_name, **extra}
    write_json_atomic(
        out_dir / "run.json",
        {
            "pipeline": name,
            "run_name": run_name,
            "resumed_from": resume,
            **({"file": str(Path(pipeline).resolve())} if from_file else {}),
        },
    )
    log.info(
        "running %s as %s%s (task logs: %s)", name, run_name, f", resuming {resume}" if resume else "", out_dir / "logs"
    )
    # kfp 2.17's local runner indents output by swapping builtins.print; inside a ParallelFor it can leave
    # the swapped one behind, which indented this command's own summary by 4 spaces.
    with _kfp_local.print_restored():
        done = run_pipeline(
            func,
            params=extra,
            run_id=run_name,
            runs_dir=runs_dir,
            pipeline_root=workdir / "pipeline-root",
            resume=resume,
            output=mode,
        )
    if not cfg.tracking.enabled:
        log.info("%s finished in %.1f s; tracking is disabled, so there is no run summary", name, done.wall_seconds)
        return
    origins = original_stage_runs(runs_dir, resume) if resume else {}
    cached = {s: {"from_run": r, "run_id": origins.get(s)} for s, r in done.cached.items()}
    result = summ.collect(
        cfg.tracking,
        workdir,
        pipeline=name,
        run_name=run_name,
        stages=stages,
        wall_seconds=done.wall_seconds,
        cached=cached,
    )
    summ.show_reused(cfg.tracking, workdir, result)
    result["resumed_from"] = resume
    result["logs"] = str(done.logs)
    summ.add_failed_tasks(result, done.failed)
    summ.add_task_states(result, done.tasks, task_stage)
    path = summ.write(result, out_dir)
    print_table(f"{name} · {run_name}", summ.table_rows(result))
    print(summ.headline(result))
    print(f"summary: {path}")
    for line in summ.next_steps(result, str(config) if config else None):
        print(line)
    if result["status"] != "FINISHED" or result["failed_stage"]:
        raise typer.Exit(1)


@app.command(name="compile")
def compile_(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: new, empty or an earlier compile's.", parser=user_path)
    ] = Path("dist"),
    pipeline: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline",
            "-p",
            help="Only these pipelines (repeatable), built-in or a pipeline file FILE.py[:FUNC]; default all built-in.",
        ),
    ] = None,
) -> None:
    """Compile every pipeline (with the config's Kubernetes placement) and component to YAML.

    The output is deterministic: the same config gives byte-identical files.
    """
    cfg = load(config, overrides)  # a bad config fails before kfp's imports
    from kubellm.fsutil import claim_output, mark_output
    from kubellm.log import print_table
    from kubellm.pipeline_params import builtin_pipelines
    from kubellm.pipelines._runner import build_for_cluster, compile_all

    builtins = builtin_pipelines()
    unknown = sorted(p for p in set(pipeline or []) - set(builtins) if not is_pipeline_file(p))
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; expected some of {sorted(builtins)}")
    t0 = time.perf_counter()
    built = build_for_cluster(cfg, pipeline or None)  # a pipeline that cannot build fails before any output
    files = [p.split(":", 1)[0] for p in pipeline or [] if is_pipeline_file(p)]
    # a folder compiled before outputs were marked is recognised by its pipeline files
    claim_output(
        out,
        "compiled-pipelines",
        inputs=([config] if config else []) + files,
        legacy=[f"{name}.yaml" for name in builtins],
    )
    written = compile_all(cfg, out, built=built)
    mark_output(out, "compiled-pipelines")
    print_table(
        f"compiled in {time.perf_counter() - t0:.2f} s", [{"file": str(p), "bytes": p.stat().st_size} for p in written]
    )


HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar=["KF_PIPELINES_ENDPOINT", "KFP_HOST"],
        help="Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline (inside a pod: "
        "http://ml-pipeline-ui.kubeflow).",
        callback=no_secrets,
    ),
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        envvar="KFP_NAMESPACE",
        help="Profile namespace on a multi-user Kubeflow (default: the kube context's, else the pod's own).",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=["KFP_EXISTING_TOKEN", "KFP_TOKEN"],
        show_default=False,
        help="Bearer token (prefer the env var; default: the projected service-account token at "
        "$KF_PIPELINES_SA_TOKEN_PATH, re-read on every request).",
    ),
]
CookieOpt = Annotated[
    str | None,
    typer.Option(
        "--cookie",
        envvar="KFP_COOKIE",
        show_default=False,
        help="Session cookie for Dex/OIDC, e.g. oauth2_proxy_kubeflow=… (prefer the env var).",
    ),
]
CaBundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-bundle",
        envvar="KFP_CA_BUNDLE",
        help="PEM file of the CA that signed the host's certificate.",
        parser=user_path,
    ),
]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", help="KFP experiment (default: the tracking experiment name).")
]


#: The version name's suffix of a pipeline compiled with no step cacheable (a run that recomputes all).
NO_CACHE_SUFFIX = "-nocache"


@dataclass(frozen=True)
class Compiled:
    """A pipeline compiled for the cluster, as ``submit`` and ``schedule`` upload it."""

    package: Path
    name: str
    """The pipeline's name (a file pipeline's from its ``@builder.pipeline``)."""
    version: str
    description: str
    parameters: list[str]


def _compiled(cfg, pipeline: str, caching: bool) -> Compiled:
    """Compiled for the cluster, as its own version: KFP (v2beta1) takes caching from the pipeline version's
    spec — a run from an uploaded version cannot switch it — so a run that must not reuse anything runs
    the version compiled with no step cacheable (its name ends in ``-nocache``). A pipeline file's content
    is part of the version name: an edited file is a new version even before it is committed."""
    import hashlib
    import tempfile

    from kubellm import __version__, yamlio
    from kubellm.pipeline_params import builtin
    from kubellm.pipelines._runner import compile_all
    from kubellm.pipelines.submit import version_name
    from kubellm.tracking.runs import git_revision

    if not is_pipeline_file(pipeline):
        builtin(pipeline)  # an unknown name: one line naming the built-in pipelines
    out = Path(tempfile.mkdtemp(prefix="kubellm-compile-"))
    package = compile_all(cfg, out, [pipeline], components=False, caching=caching)[0]
    spec = yamlio.load_all(package.read_text(encoding="utf-8"))[0]
    name = spec["pipelineInfo"]["name"]
    description = spec["pipelineInfo"].get("description", name)
    config_hash = cfg.config_hash()
    if is_pipeline_file(pipeline):
        source = Path(pipeline.split(":", 1)[0]).read_bytes()
        config_hash = hashlib.sha256(config_hash.encode() + source).hexdigest()[:12]
    version = version_name(__version__, git_revision(), config_hash) + ("" if caching else NO_CACHE_SUFFIX)
    params = list(spec["root"].get("inputDefinitions", {}).get("parameters", {}))
    return Compiled(package, name, version, description, params)


def _run_params(compiled: Compiled, run_name: str, params: list[str] | None) -> dict[str, object]:
    """The run's parameters: ``run_name`` where the pipeline has it, then ``--param``s it has (one line
    naming the others otherwise)."""
    from kubellm.pipeline_params import unknown_params

    extra = parse_params(params)
    bad = unknown_params(compiled.name, list(extra), compiled.parameters)
    if bad:
        raise ConfigError(bad)
    return ({"run_name": run_name} if "run_name" in compiled.parameters else {}) | extra


@app.command()
def submit(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    pipeline: PipelineOpt = "llm-lifecycle",
    params: ParamOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    token: TokenOpt = None,
    cookie: CookieOpt = None,
    ca_bundle: CaBundleOpt = None,
    experiment: ExperimentOpt = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish and exit 1 unless it succeeded.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 6 * 3600,
    poll: Annotated[float, typer.Option(help="Seconds between status checks with --wait.")] = 10.0,
    cache: Annotated[
        bool,
        typer.Option(
            help="Reuse the outputs of earlier runs' pure steps (prep, fetch, "
            "pretrain, finetune, evaluate) whose inputs are unchanged, e.g. "
            "to re-run a pipeline that failed at deploy."
        ),
    ] = False,
) -> None:
    """Compile a pipeline, upload it as a new version, and start a run on Kubeflow Pipelines.

    The version is named from the package version, the git revision and the config hash, so the same
    source and config reuse one version (a version compiled with no step cacheable, ``…-nocache``, unless
    --cache). On a multi-user Kubeflow the pipeline, experiment and run live in --namespace.
    """
    cfg = load(config, overrides)  # a bad config fails before kfp's imports
    from kubellm.log import get_logger
    from kubellm.pipelines.submit import Endpoint, Pipelines

    log = get_logger("submit")
    built = _compiled(cfg, pipeline, caching=cache)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    arguments = _run_params(built, run_name, params)
    server = Pipelines(Endpoint(host, namespace, token, cookie, ca_bundle))
    pipeline_id, version_id = server.upload(built.package, built.name, built.version, built.description)
    exp_id = server.ensure_experiment(experiment or cfg.tracking.experiment)
    run_id = server.start_run(run_name, exp_id, pipeline_id, version_id, arguments, cfg.platform.service_account)
    print(
        f"submitted {built.name} version {built.version} as run {run_id}"
        f"{f' in {server.namespace}' if server.namespace else ''}: {server.run_url(run_id)}"
    )
    if wait:
        state, message = server.wait(
            run_id, timeout_s=timeout, poll_s=poll, on_state=lambda s: log.info("run %s: %s", run_id, s)
        )
        print(f"run {run_id} finished: {state}{f' ({message})' if message else ''}")
        if state != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def schedule(
    cron: Annotated[
        str, typer.Option("--cron", help="KFP's 6-field cron, seconds first: '0 0 3 * * *' is 03:00 daily.")
    ],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    pipeline: PipelineOpt = "llm-continuous-finetune",
    params: ParamOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    token: TokenOpt = None,
    cookie: CookieOpt = None,
    ca_bundle: CaBundleOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """Create or update the recurring run of a pipeline (never a duplicate): max_concurrency 1, no catch-up."""
    cfg = load(config, overrides)  # a bad config fails before kfp's imports
    from kubellm.pipelines.submit import Endpoint, Pipelines, Schedule, check_cron

    cron = check_cron(cron)  # before compiling or connecting
    # A recurring run exists to pick up new data behind the same URIs: it never reuses a cached step.
    built = _compiled(cfg, pipeline, caching=False)
    name = f"{cfg.name}-{built.name}"
    arguments = _run_params(built, name, params)
    server = Pipelines(Endpoint(host, namespace, token, cookie, ca_bundle))
    pipeline_id, version_id = server.upload(built.package, built.name, built.version, built.description)
    spec = Schedule(
        name,
        cron,
        server.ensure_experiment(experiment or cfg.tracking.experiment),
        pipeline_id,
        version_id,
        arguments,
        cfg.platform.service_account,
    )
    rr_id, changed = server.ensure_schedule(spec)
    print(
        f"recurring run {name} ({rr_id}) {'created/updated' if changed else 'unchanged'}"
        f"{f' in {server.namespace}' if server.namespace else ''}: {built.name} {built.version}, cron '{cron}'"
    )
