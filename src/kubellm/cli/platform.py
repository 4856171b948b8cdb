"""``kubellm check`` (Pod Security of every manifest) and ``kubellm train-job`` (multi-node training)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, no_secrets, require
from kubellm.fsutil import user_path

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class Stage(StrEnum):
    pretrain = "pretrain"
    finetune = "finetune"


class Kind(StrEnum):
    pytorchjob = "pytorchjob"
    trainjob = "trainjob"
    rayjob = "rayjob"


@app.command()
def check(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Manifest files or folders (*.yaml, *.yml, "
            "*.json). None: configs/cluster-*.yaml and every "
            "manifest generated from the config.",
            parser=user_path,
        ),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Check manifests against Pod Security 'restricted' plus a read-only root filesystem, including the
    pod specs inside PyTorchJobs, TrainJobs, RayJobs and InferenceServices, and those custom resources
    against their CRD schemas (shipped with kubellm, offline); compiled pipelines (`kubellm compile`'s
    output) executor by executor: image, installs at start, security context. Without paths, also the
    per-GPU memory of each training stage against its placement's GPUs. Exits 1 when anything is found."""
    from kubellm.k8s.manifests import generated_manifests, shipped_manifests
    from kubellm.k8s.pipelinespec import check_pipeline_file, is_pipeline_spec
    from kubellm.k8s.podsecurity import check_all, load_manifests
    from kubellm.k8s.schema import validate_custom_resources

    findings, executors, skipped = [], 0, []
    if paths:
        files = [
            f
            for p in paths
            for f in (sorted(q for q in p.rglob("*") if q.suffix in MANIFEST_SUFFIXES) if p.is_dir() else [p])
        ]
        named = []
        for f in files:
            docs = load_manifests(f)
            found, count = check_pipeline_file(docs, str(f))
            findings += found
            executors += count
            named += [(f"{f}#{i}", d) for i, d in enumerate(docs) if "kind" in d]
            skipped += [
                f"{f}#{i}"
                for i, d in enumerate(docs)
                if "kind" not in d and not is_pipeline_spec(d) and "platforms" not in d
            ]
    else:
        cfg = load(config, overrides)
        named = shipped_manifests() + generated_manifests(cfg)
    found, pod_count = check_all(named)
    findings += found + validate_custom_resources(named)
    if not paths:
        findings += _memory_findings(cfg)
    for finding in findings:
        print(finding)
    if skipped:  # say plainly what was not inspected rather than count it as clean
        print(f"not inspected (neither a Kubernetes object nor a compiled pipeline): {', '.join(skipped)}")
    print(
        f"checked {len(named)} manifests, {pod_count} pod specs, {executors} pipeline executors: "
        f"{len(findings)} findings"
    )
    if findings:
        raise typer.Exit(1)


@app.command("train-job")
def train_job(
    stage: Annotated[Stage, typer.Option(help="Training stage the job runs.")],
    data: Annotated[
        str,
        typer.Option(
            help="Prepared dataset on the shared PVC (relative paths are under /mnt/kubellm).", callback=no_secrets
        ),
    ],
    out: Annotated[str, typer.Option(help="Output directory on the shared PVC.", callback=no_secrets)],
    base: Annotated[
        str | None, typer.Option(help="Base model (finetune): a path on the PVC or a Hub id.", callback=no_secrets)
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    kind: Annotated[Kind | None, typer.Option(help="Job kind; default: platform.distributed.<stage>.engine.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifest as YAML, create nothing.")] = False,
) -> None:
    """Run a training stage as a PyTorchJob, TrainJob or RayJob and wait for it (re-attaches on a retry)."""
    import yaml

    from kubellm.errors import ConfigError
    from kubellm.k8s.jobspec import shared_path
    from kubellm.k8s.training_job import build_job, launch
    from kubellm.log import print_table

    cfg = load(config, overrides)
    section = getattr(cfg, stage.value)
    require(section, stage.value, config)
    dist = cfg.platform.distributed_for(stage.value)
    engine = kind.value if kind else dist.engine
    if engine == "none":
        raise ConfigError(f"platform.distributed.{stage.value}.engine is 'none': set it (or pass --kind) to run a job")
    job = build_job(engine, stage.value, cfg, data, out, base, data_fingerprint=_fingerprint(shared_path(data, "data")))
    if dry_run:
        print(yaml.safe_dump(job, sort_keys=False), end="")
        return
    outcome = launch(job, cfg.platform.namespace, timeout_s=dist.timeout_seconds)
    print_table(
        f"kubellm train-job ({outcome.kind})",
        [
            {"measure": "job", "value": f"{outcome.namespace}/{outcome.name}"},
            {"measure": "created", "value": "yes" if outcome.created else "no (re-attached)"},
            {"measure": "replaced a failed job", "value": "yes" if outcome.restarted else "no"},
            {"measure": "seconds waited", "value": round(outcome.elapsed_s, 1)},
        ],
    )


def _memory_findings(cfg: Any) -> list[str]:
    """One line per training stage of run config ``cfg`` from the memory planner; refusals are findings."""
    from kubellm.errors import ConfigError
    from kubellm.train.memory import check_stage

    found = []
    for stage in ("pretrain", "finetune"):
        if getattr(cfg, stage) is None:
            continue
        try:
            print(f"memory: {check_stage(cfg, stage)[1]}")
        except ConfigError as err:
            found.append(f"memory: {err}")
    return found


def _fingerprint(data_dir: str) -> str | None:
    """The prepared dataset's fingerprint where the PVC is mounted here (in the step's pod), else None."""
    from kubellm.data.format import open_prepared
    from kubellm.errors import DataError

    try:
        return open_prepared(Path(data_dir)).manifest.fingerprint
    except DataError:
        return None
