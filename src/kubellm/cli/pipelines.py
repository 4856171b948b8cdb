"""``kubellm run | compile | submit | schedule``: the pipelines, locally and on Kubeflow.

These commands reach the KFP layers (``kubellm.pipelines``) through lazy imports: the CLI is the entry
point that sits above all three layers, while the library modules themselves never import kfp.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load
from kubellm.errors import ConfigError

PipelineOpt = Annotated[str, typer.Option("--pipeline", "-p", help="llm-lifecycle, llm-finetune, "
                                          "llm-lora-sweep or llm-continuous-finetune.")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="Set a pipeline run parameter, e.g. "
                                                    "--param base_model=/models/base (repeatable).")]


def parse_params(items: list[str] | None) -> dict[str, object]:
    from kubellm.config.run import _parse_value

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        out[key.strip()] = _parse_value(raw)
    return out


@app.command()
def run(config: ConfigOpt = None, overrides: SetOpt = None, pipeline: PipelineOpt = "llm-lifecycle",
        params: ParamOpt = None,
        quiet: Annotated[bool, typer.Option(help="Hide the tasks' own logs.")] = False) -> None:
    """Run a pipeline on KFP's local runner on this machine (the embedded default: configs/local.yaml).

    Prints a per-stage summary and writes summary.json under <workdir>/runs/<run name>/. Exits 1 when a
    stage failed (the summary names it), 0 otherwise — also when the promotion gate closed.
    """
    from kubellm import summary as summ
    from kubellm.log import get_logger, print_table
    from kubellm.pipelines import STAGES
    from kubellm.pipelines._runner import run_local

    cfg = load(config, overrides)
    log = get_logger("run")
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir = Path(cfg.workdir).resolve()
    out_dir = workdir / "runs" / run_name
    run_params = {"run_name": run_name, **parse_params(params)}
    if pipeline != "llm-lifecycle" and not (run_params.get("base_model") or (cfg.finetune and cfg.finetune.base_model)):
        raise ConfigError(f"{pipeline} starts from an existing model: pass --param base_model=DIR "
                          "(or set finetune.base_model)")
    log.info("running %s as %s (pipeline root %s)", pipeline, run_name, workdir / "pipeline-root")
    wall = run_local(pipeline, cfg, params=run_params, pipeline_root=workdir / "pipeline-root", quiet=quiet)
    if not cfg.tracking.enabled:
        log.info("%s finished in %.1f s; tracking is disabled, so there is no run summary", pipeline, wall)
        return
    result = summ.collect(cfg.tracking, workdir, pipeline=pipeline, run_name=run_name,
                          stages=STAGES.get(pipeline, []), wall_seconds=wall)
    path = summ.write(result, out_dir)
    print_table(f"{pipeline} · {run_name}", summ.table_rows(result))
    print(summ.headline(result))
    print(f"summary: {path}")
    if result["status"] != "FINISHED" or result["failed_stage"]:
        raise typer.Exit(1)


@app.command(name="compile")
def compile_(config: ConfigOpt = None, overrides: SetOpt = None,
             out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: new, empty or an earlier "
                                               "compile's.")] = Path("dist"),
             pipeline: Annotated[list[str] | None, typer.Option("--pipeline", "-p", help="Only these pipelines "
                                                                "(repeatable); default all.")] = None) -> None:
    """Compile every pipeline (with the config's Kubernetes placement) and component to YAML.

    The output is deterministic: the same config gives byte-identical files.
    """
    from kubellm.fsutil import claim_output, mark_output
    from kubellm.log import print_table
    from kubellm.pipelines import PIPELINES
    from kubellm.pipelines._runner import compile_all

    cfg = load(config, overrides)
    unknown = sorted(set(pipeline or []) - set(PIPELINES))
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; expected some of {sorted(PIPELINES)}")
    # a folder compiled before outputs were marked is recognised by its pipeline files
    claim_output(out, "compiled-pipelines", inputs=[config] if config else [],
                 legacy=[f"{name}.yaml" for name in PIPELINES])
    t0 = time.perf_counter()
    written = compile_all(cfg, out, pipeline or None)
    mark_output(out, "compiled-pipelines")
    print_table(f"compiled in {time.perf_counter() - t0:.2f} s",
                [{"file": str(p), "bytes": p.stat().st_size} for p in written])




HostOpt = Annotated[str | None, typer.Option(
    "--host", envvar=["KF_PIPELINES_ENDPOINT", "KFP_HOST"],
    help="Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline (inside a pod: "
         "http://ml-pipeline-ui.kubeflow).")]
NamespaceOpt = Annotated[str | None, typer.Option(
    "--namespace", "-n", envvar="KFP_NAMESPACE",
    help="Profile namespace on a multi-user Kubeflow (default: the kube context's, else the pod's own).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar=["KFP_EXISTING_TOKEN", "KFP_TOKEN"], show_default=False,
    help="Bearer token (prefer the env var; default: the projected service-account token at "
         "$KF_PIPELINES_SA_TOKEN_PATH, re-read on every request).")]
CookieOpt = Annotated[str | None, typer.Option(
    "--cookie", envvar="KFP_COOKIE", show_default=False,
    help="Session cookie for Dex/OIDC, e.g. oauth2_proxy_kubeflow=… (prefer the env var).")]
CaBundleOpt = Annotated[Path | None, typer.Option(
    "--ca-bundle", envvar="KFP_CA_BUNDLE", help="PEM file of the CA that signed the host's certificate.")]
ExperimentOpt = Annotated[str | None, typer.Option("--experiment", help="KFP experiment (default: the "
                                                   "tracking experiment name).")]


def _compiled(cfg, pipeline: str) -> tuple[Path, str, str]:  # (package, version name, description)
    import tempfile

    from kubellm import __version__
    from kubellm.pipelines import PIPELINES
    from kubellm.pipelines._runner import compile_all
    from kubellm.pipelines.submit import version_name
    from kubellm.tracking.mlflow_tracker import git_revision

    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINES)}")
    out = Path(tempfile.mkdtemp(prefix="kubellm-compile-"))
    package = compile_all(cfg, out, [pipeline], components=False)[0]
    import yaml

    spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    description = spec["pipelineInfo"].get("description", pipeline)
    return package, version_name(__version__, git_revision(), cfg.config_hash()), description


@app.command()
def submit(config: ConfigOpt = None, overrides: SetOpt = None, pipeline: PipelineOpt = "llm-lifecycle",
           params: ParamOpt = None, host: HostOpt = None, namespace: NamespaceOpt = None, token: TokenOpt = None,
           cookie: CookieOpt = None, ca_bundle: CaBundleOpt = None, experiment: ExperimentOpt = None,
           wait: Annotated[bool, typer.Option(help="Wait for the run to finish and exit 1 unless it succeeded.")] = False,
           timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 6 * 3600,
           poll: Annotated[float, typer.Option(help="Seconds between status checks with --wait.")] = 10.0) -> None:
    """Compile a pipeline, upload it as a new version, and start a run on Kubeflow Pipelines.

    The version is named from the package version, the git revision and the config hash, so the same
    source and config reuse one version. On a multi-user Kubeflow the pipeline, experiment and run live
    in --namespace.
    """
    from kubellm.log import get_logger
    from kubellm.pipelines.submit import Endpoint, Pipelines

    cfg = load(config, overrides)
    log = get_logger("submit")
    package, version, description = _compiled(cfg, pipeline)
    server = Pipelines(Endpoint(host, namespace, token, cookie, ca_bundle))
    pipeline_id, version_id = server.upload(package, pipeline, version, description)
    exp_id = server.ensure_experiment(experiment or cfg.tracking.experiment)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = server.start_run(run_name, exp_id, pipeline_id, version_id, {"run_name": run_name, **parse_params(params)},
                           cfg.platform.service_account)
    print(f"submitted {pipeline} version {version} as run {run_id}"
          f"{f' in {server.namespace}' if server.namespace else ''}: {server.run_url(run_id)}")
    if wait:
        state, message = server.wait(run_id, timeout_s=timeout, poll_s=poll,
                                  on_state=lambda s: log.info("run %s: %s", run_id, s))
        print(f"run {run_id} finished: {state}{f' ({message})' if message else ''}")
        if state != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def schedule(cron: Annotated[str, typer.Option("--cron", help="KFP's 6-field cron, seconds first: "
                                               "'0 0 3 * * *' is 03:00 daily.")],
             config: ConfigOpt = None, overrides: SetOpt = None,
             pipeline: PipelineOpt = "llm-continuous-finetune", params: ParamOpt = None, host: HostOpt = None,
             namespace: NamespaceOpt = None, token: TokenOpt = None, cookie: CookieOpt = None,
             ca_bundle: CaBundleOpt = None, experiment: ExperimentOpt = None) -> None:
    """Create or update the recurring run of a pipeline (never a duplicate): max_concurrency 1, no catch-up."""
    from kubellm.pipelines.submit import Endpoint, Pipelines, Schedule, check_cron

    cron = check_cron(cron)  # before compiling or connecting
    cfg = load(config, overrides)
    package, version, description = _compiled(cfg, pipeline)
    server = Pipelines(Endpoint(host, namespace, token, cookie, ca_bundle))
    pipeline_id, version_id = server.upload(package, pipeline, version, description)
    name = f"{cfg.name}-{pipeline}"
    spec = Schedule(name, cron, server.ensure_experiment(experiment or cfg.tracking.experiment), pipeline_id,
                    version_id, {"run_name": name, **parse_params(params)}, cfg.platform.service_account)
    rr_id, changed = server.ensure_schedule(spec)
    print(f"recurring run {name} ({rr_id}) {'created/updated' if changed else 'unchanged'}"
          f"{f' in {server.namespace}' if server.namespace else ''}: {pipeline} {version}, cron '{cron}'")
