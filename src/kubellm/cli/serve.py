"""``kubellm serve`` (the predictor), ``kubellm deploy`` (KServe rollout) and ``kubellm playground``."""

from __future__ import annotations

from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, no_secrets

PortOpt = Annotated[
    int | None, typer.Option("--port", "-p", help="Port to listen on (default: from the config).", min=1, max=65535)
]


@app.command()
def serve(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to serve: a directory (merged model or LoRA adapter), "
            "models:/name@alias, or a Hub id. Default: serve.model, else "
            "models:/<tracking.registered_model>@champion.",
            callback=no_secrets,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Base model of a LoRA adapter (default: the base the adapter records).", callback=no_secrets),
    ] = None,
    port: PortOpt = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="A LoRA adapter served on the base model under its own name: NAME=URI (a directory or "
            "models:/name@alias); repeat for more. Adds to serve.adapters.",
            callback=no_secrets,
        ),
    ] = None,
) -> None:
    """Serve a model with KServe V1/V2 and an OpenAI-compatible API (on 127.0.0.1 unless serve.host says)."""
    from kubellm.errors import KubellmError

    cfg = load(config, overrides, reads=("serve",))  # a bad config fails before the server's imports
    from kubellm.serve.adapters import parse_adapter_args

    try:
        adapters = parse_adapter_args(adapter or [])
        if adapters:  # the same checks as serve.adapters in a config (names, count)
            cfg = cfg.model_copy(
                update={
                    "serve": type(cfg.serve).model_validate(
                        {**cfg.serve.model_dump(), "adapters": {**cfg.serve.adapters, **adapters}}
                    )
                }
            )
    except (KubellmError, ValueError) as err:
        raise typer.BadParameter(" ".join(str(err).split()), param_hint="--adapter") from None
    from kubellm.serve.app import serve as run_server

    run_server(cfg, model_ref=model, base_model=base, port=port)


@app.command()
def deploy(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    storage_uri: Annotated[
        str | None,
        typer.Option(
            help="Model location KServe downloads into /mnt/models "
            "(s3://, gs://, pvc://, hf://; llm-inference-service: the "
            "base's); default: deploy.storage_uri, else the registry's.",
            callback=no_secrets,
        ),
    ] = None,
    model_version: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Registry version being deployed: labelled on the "
            "InferenceService and given deploy.promote_alias "
            "(champion) after a healthy rollout; llm-inference-service: an "
            "adapter version, released on its base.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifests as YAML; touch no cluster.")] = False,
) -> None:
    """Roll the model out as a KServe InferenceService: canary, smoke test, promote or roll back. With
    deploy.runtime llm-inference-service: release the adapter version on its base's LLMInferenceService
    (candidate added and gated by name, then the alias moves, or the candidate is removed)."""
    import yaml

    from kubellm.k8s.inferenceservice import build_inferenceservice, isvc_name
    from kubellm.k8s.playground import build_playground

    cfg = load(config, overrides, reads=("deploy", "serve", "playground", "platform"))
    llm = cfg.deploy.runtime == "llm-inference-service"
    if dry_run:
        if llm and model_version:  # what the release would apply: the registry's base, champion and candidate
            from kubellm.stages import StageContext
            from kubellm.stages.deploy import adapter_service
            from kubellm.tracking.registry import model_uri as registry_uri

            docs = [
                adapter_service(
                    cfg,
                    StageContext.for_command(cfg.tracking, cfg.workdir),
                    registry_uri(cfg.tracking.registered_model, version=model_version),
                    storage_uri,
                )
            ]
        elif llm:
            from kubellm.k8s.llmisvc import build_llm_inference_service

            docs = [build_llm_inference_service(cfg, storage_uri or cfg.deploy.storage_uri or "", {})]
        else:
            docs = [build_inferenceservice(cfg, storage_uri, model_version=model_version)]
            if cfg.deploy.keda_prometheus_url:
                from kubellm.k8s.keda import build_scaled_object

                docs.append(build_scaled_object(cfg))
        if cfg.deploy.playground and not llm:
            # KServe names the predictor's cluster-local Service <name>-predictor; the real rollout uses
            # the address the InferenceService reports.
            address = f"http://{isvc_name(cfg)}-predictor.{cfg.platform.namespace}.svc.cluster.local"
            docs += build_playground(cfg, address)
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
        return

    from pathlib import Path

    from kubellm.log import print_table
    from kubellm.stages import StageContext
    from kubellm.stages import deploy as stage
    from kubellm.tracking.registry import model_uri

    # The deploy step of the pipelines, the same function: roll out (or release the adapter) → promote →
    # playground. A failed rollout raises (exit 2, one line) after rolling back.
    uri = model_uri(cfg.tracking.registered_model, version=model_version) if model_version else None
    out = stage.deploy(
        cfg,
        Path(cfg.workdir) / "deploy",
        StageContext.for_command(cfg.tracking, cfg.workdir),
        target="cluster",
        model_uri=uri,
        storage_uri=storage_uri,
    )
    v = out.values
    print_table(
        "kubellm deploy",
        [
            {"measure": k, "value": val}
            for k, val in (
                ("status", v["status"]),
                ("reason", v["detail"]),
                ("endpoint", v["endpoint"] or "-"),
                ("aliases", ", ".join(v["aliases"]) or "-"),
                ("manifests", v["manifests"]),
            )
        ],
    )


@app.command()
def playground(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible base URL of model A (default: playground.endpoint, else the local predictor).",
            callback=no_secrets,
        ),
    ] = None,
    compare_endpoint: Annotated[
        str | None,
        typer.Option(help="Base URL of model B, answered side by side (e.g. the base model).", callback=no_secrets),
    ] = None,
    port: PortOpt = None,
) -> None:
    """The prompt playground (Gradio) on 127.0.0.1 unless playground.host says otherwise."""
    cfg = load(config, overrides, reads=("playground", "serve"))
    from kubellm.serve.playground import launch

    launch(cfg, endpoint=endpoint, compare_endpoint=compare_endpoint, port=port)
