"""The MLflow Model Registry: register a trained model, move aliases, fetch a version back as a folder.

Aliases carry the lifecycle: every new version gets ``candidate``; ``champion`` moves only through an
explicit :func:`promote`, which the pipeline calls after the gate passed and the deployment is healthy.
Promotion only moves an alias forward, also when runs promote concurrently (a compare-and-set over
version tags, see :func:`_converge`); moving it back is a deliberate rollback (``force``).

A LoRA adapter is registered *merged into its base model*. MLflow 3.17 can log a PEFT model, but with a
local (non-Hub) base it stores the base with the adapter layers injected (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``), which ``from_pretrained`` cannot read back as a plain base; and with
``base_model_path`` it stores a path that only exists in the pod that trained it. A merged model is
self-contained, needs no peft at serving time and runs as fast as a full model; the adapter directory
itself is kept beside it as the run artifact ``adapter/``.

:func:`register_adapter` registers the adapter *as an adapter* instead, for runtimes that serve many
adapters on one base (``kubellm serve --adapter``, KServe's LLMInferenceService): the version stores the
adapter files (megabytes) and ``kubellm-base.json``, naming the base version it belongs to; the base is
registered once as a version of ``<name>-base``, found again by its content fingerprint
(:func:`weights_fingerprint`: the tensors, not the file bytes, so a registry round trip keeps it).
Resolving such a version fetches the base as well and checks its fingerprint. The pipeline's register
step registers adapter versions unless ``tracking.register_merged`` (:mod:`kubellm.stages.registry`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kubellm.config.tracking import TrackingConfig
from kubellm.fsutil import atomic_dir
from kubellm.log import get_logger
from kubellm.tracking.base import TrackingError
from kubellm.tracking.connect import _check_filter_value, mlflow_client, mlflow_errors
from kubellm.tracking.headline import HEADLINE_METRICS

log = get_logger("tracking.registry")

CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
_COMPLETE = ".kubellm-complete"
# What the logged model needs at load time. Explicit: MLflow's inference of requirements imports
# torchvision, which this stack does not have, and crashes (MLflow 3.17).
_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version."""

    name: str
    version: int
    aliases: list[str]
    uri: str
    """``models:/<name>/<version>``: loadable with :func:`resolve_model_uri` anywhere the registry is."""
    tags: dict[str, str] = field(default_factory=dict)
    """The version's tags: ``base_model``, ``source``, ``adapter``, ``metric.<name>`` and the caller's
    own (for example the data fingerprint the model was trained on)."""
    run_id: str | None = None


def weights_fingerprint(model_dir: str | Path) -> str:
    """Content fingerprint of a model directory's weights: SHA-256 over every tensor of its
    ``*.safetensors`` files (name, dtype, shape and bytes, in name order), so the same weights saved again
    (a registry round trip, other shards) keep their fingerprint. An adapter records its base's
    (``kubellm-base.json``), so a server refuses to put it on another base even when the shapes match
    (:mod:`kubellm.serve.adapters`)."""
    import hashlib

    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise TrackingError(f"{model_dir}: no *.safetensors weights to fingerprint")
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            where.update({key: path for key in fh.keys()})  # noqa: SIM118 - safe_open is not a mapping
    digest = hashlib.sha256()
    for key in sorted(where):
        with safe_open(str(where[key]), framework="pt") as fh:
            tensor = fh.get_tensor(key).contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=sorted(mv.aliases or []),
        uri=f"models:/{mv.name}/{mv.version}",
        tags=dict(mv.tags or {}),
        run_id=mv.run_id,
    )


def _require_enabled(cfg: TrackingConfig, what: str) -> None:
    if not cfg.enabled:
        raise TrackingError(f"tracking.enabled is false: {what} needs the MLflow Model Registry")


def _pip_requirements() -> list[str]:
    pins = []
    for dist in _REQUIREMENTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            # "2.13.0+cpu" → "2.13.0": the local build tag does not exist on PyPI.
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
    return pins


def register_model(
    cfg: TrackingConfig,
    workdir: str | Path,
    model_dir: str | Path,
    *,
    run_id: str,
    base_model: str | Path | None = None,
    metrics: dict | None = None,
    tags: dict[str, str] | None = None,
    alias: str | None = CANDIDATE,
) -> ModelVersionInfo:
    """Log ``model_dir`` (a full model or a LoRA adapter, merged into ``base_model`` or the base its
    config records) under run ``run_id``, register it as a new version of ``cfg.registered_model`` and
    give it the ``candidate`` alias (``alias``; ``None``: none). ``tags`` and the headline ``metrics``
    (:data:`HEADLINE_METRICS`) become version tags (``metric.<name>``); ``storage_bytes`` records what
    the version stores."""
    _require_enabled(cfg, "registering a model")
    import mlflow

    from kubellm.models.causal_lm import is_adapter_dir, load_causal_lm
    from kubellm.models.tensors import nonfinite_names

    model_dir = Path(model_dir)
    adapter = is_adapter_dir(model_dir)
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"run {run_id}"):
        run = client.get_run(run_id)
    lm = load_causal_lm(model_dir, base_model=base_model, device="cpu", merge_adapter=True)
    bad = nonfinite_names(dict(lm.model.named_parameters()))
    if bad:  # a diverged run's weights: never a candidate, so never a champion either
        raise TrackingError(
            f"{model_dir}: {len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]}); "
            "refusing to register a broken model"
        )
    # mlflow.transformers asks the Hub for a model card and license under the model's name_or_path; a
    # relative local path ("pretrained") looks like a Hub id and cost ~45 s of retries offline. An
    # absolute path is refused by the Hub client at once.
    lm.model.name_or_path = lm.model.config._name_or_path = str(model_dir.resolve())
    version_tags = {
        "source": str(model_dir),
        "adapter": str(adapter).lower(),
        "storage_bytes": str(_parameter_bytes(lm.model)),
        **(tags or {}),
    }
    if base_model is not None or adapter:
        version_tags["base_model"] = str(base_model) if base_model is not None else lm.source.split(" + ")[0]
    # a handful of headline figures, not every metric (25 tags filled a screen per version); the version's
    # run (its ``run_id``, linked by the UI) holds them all
    for key, value in (metrics or {}).items():
        if key in HEADLINE_METRICS:
            version_tags[f"metric.{key}"] = f"{float(value):.6g}"

    with mlflow_errors(uri, f"registering {model_dir} as {cfg.registered_model!r}"):
        if adapter:
            client.log_artifacts(run_id, str(model_dir), "adapter")
        # The fluent log_model files a model it creates itself under the process's *active* experiment
        # (``Default`` in ``./mlruns`` for a fresh process), so create it in the run's experiment here.
        # log_model, and the registry when it resolves the model's URI, also read the process-wide
        # tracking URI: scope ours to these calls only.
        logged = client.create_logged_model(
            run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id, tags=version_tags
        )
        with _use_tracking_uri(uri):
            info = mlflow.transformers.log_model(
                {"model": lm.model, "tokenizer": lm.tokenizer},
                name=MODEL_ARTIFACT,
                task="text-generation",
                pip_requirements=_pip_requirements(),
                run_id=run_id,
                model_id=logged.model_id,
            )
            _ensure_registered_model(client, cfg.registered_model)
            mv = client.create_model_version(
                cfg.registered_model, source=info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id
            )
        if alias:
            client.set_registered_model_alias(cfg.registered_model, alias, mv.version)
        mv = client.get_model_version(cfg.registered_model, mv.version)
    log.info("registered %s version %s (%s) from %s", mv.name, mv.version, alias or "no alias", model_dir)
    return _info(mv)


def _parameter_bytes(model: Any) -> int:
    """Bytes of a model's weights (tied weights once): what a merged version stores."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


#: The registered model holding the bases adapters of ``<name>`` are trained on: ``<name>-base``.
BASE_SUFFIX = "-base"
#: Version tag of a base version: its :func:`weights_fingerprint`.
FINGERPRINT_TAG = "fingerprint"
ADAPTER_BASE_RECORD = "kubellm-base.json"
# What an adapter version stores (the weights, the config, the tokenizer the fine-tune saved).
_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)


def register_adapter(
    cfg: TrackingConfig,
    workdir: str | Path,
    adapter_dir: str | Path,
    *,
    run_id: str,
    base_model: str | Path,
    metrics: dict | None = None,
    tags: dict[str, str] | None = None,
) -> ModelVersionInfo:
    """Register the LoRA adapter at ``adapter_dir`` *as an adapter* (megabytes, not a merged copy): a new
    version of ``cfg.registered_model`` with the ``candidate`` alias, recording the base version it
    belongs to (tags ``base_name``, ``base_version``, ``base_fingerprint``, and ``kubellm-base.json``
    inside the version, which ``kubellm serve`` checks).

    ``base_model`` is the local base directory; it is registered once, as a version of
    ``<registered_model>-base`` found again by its content fingerprint (:func:`weights_fingerprint`), so
    every adapter of one base points at the same base version. Resolving an adapter version
    (:func:`resolve_model_uri`) brings its base too. Aliases and promotion work per adapter model as for
    merged versions (:func:`register_model` keeps those for runtimes that need them).
    """
    import json
    import tempfile

    from kubellm.models.causal_lm import is_adapter_dir
    from kubellm.models.tensors import nonfinite_names

    _require_enabled(cfg, "registering an adapter")
    adapter_dir, base_dir = Path(adapter_dir), Path(base_model)
    if not is_adapter_dir(adapter_dir):
        raise TrackingError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    if not base_dir.is_dir():
        raise TrackingError(f"{base_model}: the base of an adapter version must be a local model directory")
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrackingError(f"{adapter_dir}: no adapter_model.safetensors")
    bad = nonfinite_names(load_file(str(weights)))
    if bad:
        raise TrackingError(
            f"{adapter_dir}: {len(bad)} adapter tensors hold NaN or infinite values (e.g. {bad[0]}); "
            "refusing to register a broken adapter"
        )
    fingerprint = weights_fingerprint(base_dir)
    base = _base_version(cfg, workdir, base_dir, fingerprint, run_id)
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"run {run_id}"):
        run = client.get_run(run_id)
    record = {"name": base.name, "version": base.version, "uri": base.uri, "fingerprint": fingerprint}
    version_tags = {
        "source": str(adapter_dir),
        "adapter": "true",
        "kind": "adapter",
        "base_name": base.name,
        "base_version": str(base.version),
        "base_fingerprint": fingerprint,
        "storage_bytes": str(weights.stat().st_size),
        "merged_storage_bytes": base.tags.get("storage_bytes", ""),
        **(tags or {}),
    }
    for key, value in (metrics or {}).items():
        if key in HEADLINE_METRICS:  # as register_model: the version's run holds them all
            version_tags[f"metric.{key}"] = f"{float(value):.6g}"
    with (
        tempfile.TemporaryDirectory(prefix="kubellm-adapter-") as tmp,
        mlflow_errors(uri, f"registering adapter {adapter_dir} as {cfg.registered_model!r}"),
    ):
        for name in _ADAPTER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, Path(tmp) / name)
        (Path(tmp) / ADAPTER_BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        logged = client.create_logged_model(
            run.info.experiment_id, name="adapter", source_run_id=run_id, tags=version_tags
        )
        client.log_model_artifacts(logged.model_id, tmp)
        client.finalize_logged_model(logged.model_id, "READY")
        _ensure_registered_model(client, cfg.registered_model)
        with _use_tracking_uri(uri):  # the registry resolves the source with the process-wide URI
            mv = client.create_model_version(
                cfg.registered_model,
                source=f"models:/{logged.model_id}",
                run_id=run_id,
                tags=version_tags,
                model_id=logged.model_id,
            )
        client.set_registered_model_alias(cfg.registered_model, CANDIDATE, mv.version)
        mv = client.get_model_version(cfg.registered_model, mv.version)
    log.info("registered adapter %s version %s (%s) on base %s", mv.name, mv.version, CANDIDATE, base.uri)
    return _info(mv)


def storage_figures(tags: dict[str, str]) -> dict[str, Any]:
    """What a version stores, from its tags: ``kind`` (``adapter`` or ``merged``), ``storage_bytes``, and
    for an adapter version its ``base`` (``models:/<name>-base/<version>``), ``merged_storage_bytes`` (what
    a merged copy stores: its base's weights) and ``storage_factor`` (merged / adapter). Versions registered
    before these tags existed give what they have."""
    out: dict[str, Any] = {"kind": "adapter" if tags.get("kind") == "adapter" else "merged"}
    for key in ("storage_bytes", "merged_storage_bytes"):
        if tags.get(key, "").isdigit():
            out[key] = int(tags[key])
    if out["kind"] == "adapter":
        out["base"] = f"models:/{tags.get('base_name')}/{tags.get('base_version')}"
        if out.get("storage_bytes") and out.get("merged_storage_bytes"):
            out["storage_factor"] = round(out["merged_storage_bytes"] / out["storage_bytes"], 2)
    return out


def storage_line(storage: dict[str, Any]) -> str:
    """``adapter 1.1 MiB vs 4.8 MiB merged (4.2x less), on models:/x-base/1``, or a merged version's size."""

    def mib(n: int) -> str:
        return f"{n / 2**20:.3g} MiB"

    if "storage_factor" in storage:
        return (
            f"adapter {mib(storage['storage_bytes'])} vs {mib(storage['merged_storage_bytes'])} merged "
            f"({storage['storage_factor']:.3g}x less), on {storage['base']}"
        )
    if "storage_bytes" in storage:
        return f"{storage['kind']} {mib(storage['storage_bytes'])}"
    return ""


def _use_tracking_uri(uri: str) -> Any:
    """MLflow's private ``_use_tracking_uri`` (the process-wide URI, scoped to a block): ``log_model`` and
    the registry's source resolution read only that. The one place kubellm reaches it: a renamed or moved
    name fails in one line naming the installed MLflow, not as an ImportError deep in registration."""
    from importlib import metadata

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri as scoped
    except ImportError:
        raise TrackingError(
            f"mlflow {metadata.version('mlflow')}: no mlflow.tracking._tracking_service.utils."
            "_use_tracking_uri, which kubellm's registration needs (tested with mlflow 3.17)"
        ) from None
    return scoped(uri)


def _ensure_registered_model(client: Any, name: str) -> None:
    """Create registered model ``name`` unless it exists (the usual case). Only "already exists" is
    expected: an auth or connection failure is the user's to see, named by :func:`mlflow_errors`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _base_version(
    cfg: TrackingConfig, workdir: str | Path, base_dir: Path, fingerprint: str, run_id: str
) -> ModelVersionInfo:
    """The version of ``<registered_model>-base`` holding the weights with ``fingerprint``, registered now
    if there is none yet."""
    name = cfg.registered_model + BASE_SUFFIX
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"looking up {name}"):
        found = client.search_model_versions(
            f"name = '{_check_filter_value(name, 'registered model')}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"
        )
    if found:
        return _info(min(found, key=lambda mv: int(mv.version)))
    return register_model(
        cfg.model_copy(update={"registered_model": name}),
        workdir,
        base_dir,
        run_id=run_id,
        tags={FINGERPRINT_TAG: fingerprint, "kind": "base"},
        alias=None,
    )


def promote(
    cfg: TrackingConfig, workdir: str | Path, version: int, alias: str = CHAMPION, *, force: bool = False
) -> ModelVersionInfo:
    """Point ``alias`` (``champion`` by default) at ``version``, the version the promoting run registered.
    Call it only after the gate passed (and, for ``champion``, the deployment is healthy).

    An automatic promotion only moves the alias forward: when a newer version holds it or claims it
    (a concurrent run promoting too), the alias stays there and the returned version lacks the alias.
    ``force`` is a deliberate rollback: the alias moves to ``version`` even if it is older, and newer
    versions' claims are withdrawn so that a late automatic promotion does not undo it.
    """
    _require_enabled(cfg, "promoting a model")
    client, uri = mlflow_client(cfg, workdir)
    name = cfg.registered_model
    with mlflow_errors(uri, f"promoting {name} version {version} to @{alias}"):
        _get_version(client, name, str(version), uri)
        holder: int | None = version
        if force:
            _roll_back(client, name, alias, version)
        else:
            holder = _holder(client, name, alias)
            if holder is None or holder < version:
                client.set_model_version_tag(name, str(version), _claim_tag(alias), _CLAIMED)
                holder = _converge(client, name, alias, uri)
        mv = client.get_model_version(name, str(version))
    if alias in (mv.aliases or []):
        log.info("%s version %s is now @%s", name, version, alias)
    else:
        log.warning("%s version %s not promoted: @%s is version %s, which is newer", name, version, alias, holder)
    return _info(mv)


# Promotion as compare-and-set over MLflow, which has neither locks nor a conditional alias update. A
# promoting run first *claims* its version (a version tag: each run writes only its own version, so
# claims never collide), then loops: the target is the newest claimed version (or the current holder,
# if newer); if the alias is there it stops, otherwise it sets the alias and reads again. Whichever run
# writes last reads after its own write, and it sees every claim made before its read: the alias ends
# on the newest claim whatever the interleaving. Measured before: four runs promoting 13 ms apart left
# the alias on the second-newest version.
_CLAIMED = "claimed"
_WITHDRAWN = "withdrawn"
_CONVERGE_ROUNDS = 20  # each round is two or three requests; two runs settle in two rounds


def _claim_tag(alias: str) -> str:
    return f"kubellm.promotion.{alias}"


def _holder(client: Any, name: str, alias: str) -> int | None:
    version = (client.get_registered_model(name).aliases or {}).get(alias)
    return None if version is None else int(version)


def _claims(client: Any, name: str, alias: str) -> list[int]:
    found = client.search_model_versions(
        f"name = '{_check_filter_value(name, 'registered model')}' and tags.`{_claim_tag(alias)}` = '{_CLAIMED}'"
    )
    return [int(mv.version) for mv in found]


def _converge(client: Any, name: str, alias: str, uri: str) -> int:
    """Move ``alias`` to the newest claimed version, re-reading after each write; the final holder."""
    for _ in range(_CONVERGE_ROUNDS):
        holder = _holder(client, name, alias)
        target = max([*_claims(client, name, alias), *([holder] if holder is not None else [])])
        if holder == target:
            return target
        client.set_registered_model_alias(name, alias, str(target))
    raise TrackingError(
        f"MLflow at {uri}: {name}@{alias} kept changing during {_CONVERGE_ROUNDS} rounds of promotion; promote again"
    )


def _roll_back(client: Any, name: str, alias: str, version: int) -> None:
    for newer in (v for v in _claims(client, name, alias) if v > version):
        client.set_model_version_tag(name, str(newer), _claim_tag(alias), _WITHDRAWN)
    client.set_model_version_tag(name, str(version), _claim_tag(alias), _CLAIMED)
    client.set_registered_model_alias(name, alias, str(version))
    log.warning("%s@%s rolled back to version %s (forced)", name, alias, version)


def _get_version(client: Any, name: str, version: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise TrackingError(f"MLflow at {uri}: registered model {name!r} has no version {version}") from None


def _version_by_alias(client: Any, name: str, alias: str, uri: str) -> Any | None:
    """The version of ``name`` holding ``alias``; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise TrackingError(f"MLflow at {uri}: model {name!r}: {str(err.message).splitlines()[0]}") from None
    version = (registered.aliases or {}).get(alias)
    return None if version is None else client.get_model_version(name, str(version))


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI."""

    name: str
    version: int | None = None
    alias: str | None = None


def parse_model_uri(uri: str) -> ModelRef:
    """``models:/name/3`` → ``ModelRef("name", 3)``; ``models:/name@champion`` → alias; else TrackingError."""
    m = _MODEL_URI.match(uri)
    if m is None:
        raise TrackingError(f"model URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return ModelRef(m["name"], int(m["version"]) if m["version"] else None, m["alias"])


def model_uri(name: str, *, version: int | str | None = None, alias: str | None = None) -> str:
    """The registry URI of a version (``models:/name/3``) or an alias (``models:/name@champion``)."""
    return f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"


def version_aliases(cfg: TrackingConfig, workdir: str | Path, version: int) -> list[str]:
    """The aliases version ``version`` of the configured model holds now, sorted."""
    _require_enabled(cfg, "reading aliases")
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"reading the aliases of {cfg.registered_model} version {version}"):
        mv = _get_version(client, cfg.registered_model, str(version), uri)
    return sorted(mv.aliases or [])


def version_info(cfg: TrackingConfig, workdir: str | Path, version: int) -> ModelVersionInfo:
    """Version ``version`` of the configured model, with its tags (``kind`` says adapter or merged)."""
    _require_enabled(cfg, "reading a model version")
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"reading {cfg.registered_model} version {version}"):
        return _info(_get_version(client, cfg.registered_model, str(version), uri))


def download_uri(cfg: TrackingConfig, workdir: str | Path, version: int) -> str:
    """Where the registry keeps a version's files (``s3://…``, ``gs://…`` or a local path): what an
    InferenceService's ``storageUri`` points at."""
    _require_enabled(cfg, "locating a model version")
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"locating {cfg.registered_model} version {version}"):
        return client.get_model_version_download_uri(cfg.registered_model, str(version))


def fetch_version_files(cfg: TrackingConfig, workdir: str | Path, version: int, dst: str | Path) -> Path:
    """The files version ``version`` stores, downloaded into ``dst`` as they are: for an adapter version the
    adapter (megabytes) without its base, which :func:`resolve_model_uri` would fetch too."""
    _require_enabled(cfg, "fetching a model version")
    from mlflow.artifacts import download_artifacts

    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"fetching {cfg.registered_model} version {version}"):
        source = client.get_model_version_download_uri(cfg.registered_model, str(version))
        return Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))


def champion_info(cfg: TrackingConfig, workdir: str | Path, alias: str = CHAMPION) -> ModelVersionInfo | None:
    """The version holding the ``champion`` alias (or ``alias``), with its tags; None if there is none
    yet (or tracking is disabled)."""
    if not cfg.enabled:
        return None
    client, uri = mlflow_client(cfg, workdir)
    with mlflow_errors(uri, f"looking up {cfg.registered_model}@{alias}"):
        mv = _version_by_alias(client, cfg.registered_model, alias, uri)
    return None if mv is None else _info(mv)


def _assemble(downloaded: Path, out: Path) -> None:
    """MLflow's transformers layout (``model/`` weights, ``components/tokenizer/``) → one Hugging Face
    model directory with the tokenizer beside the weights, as ``load_causal_lm`` expects. An adapter
    version is such a directory already."""
    if (downloaded / ADAPTER_BASE_RECORD).is_file():
        shutil.move(str(downloaded), str(out))
        return
    weights = downloaded / "model"
    tokenizer = downloaded / "components" / "tokenizer"
    if not (weights / "config.json").is_file():
        raise TrackingError(f"{downloaded}: not a model logged by kubellm (no model/config.json)")
    shutil.move(str(weights), str(out))
    if tokenizer.is_dir():
        for item in tokenizer.iterdir():
            shutil.move(str(item), str(out / item.name))


def resolve_model_uri(cfg: TrackingConfig, workdir: str | Path, uri: str) -> Path:
    """A local, loadable model directory for ``models:/<name>@<alias>``, ``models:/<name>/<version>``
    or an existing local directory (returned as is).

    Versions are downloaded once into ``<workdir>/models/<name>/<version>/model`` (atomically: an
    interrupted download leaves nothing that looks complete) and reused afterwards; an alias is
    resolved to its version first, so a moved alias fetches the new version.
    """
    local = Path(uri)
    if "://" not in uri and not uri.startswith("models:/") and local.is_dir():
        return local
    m = _MODEL_URI.match(uri)
    if m is None:
        raise TrackingError(
            f"model URI {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a local directory"
        )
    _require_enabled(cfg, f"resolving {uri}")
    from mlflow.artifacts import download_artifacts

    client, tracking_uri = mlflow_client(cfg, workdir)
    name = m["name"]
    with mlflow_errors(tracking_uri, f"resolving {uri}"):
        if m["alias"]:
            mv = _version_by_alias(client, name, m["alias"], tracking_uri)
            if mv is None:
                raise TrackingError(f"MLflow at {tracking_uri}: {uri}: no version of {name!r} has alias @{m['alias']}")
        else:
            mv = _get_version(client, name, m["version"], tracking_uri)
        dest = Path(workdir).resolve() / "models" / name / str(mv.version)
        if (dest / _COMPLETE).is_file():
            return dest / "model"
        with atomic_dir(dest) as tmp:
            # The version's own artifact location (file://, s3://, mlflow-artifacts:/ behind a server):
            # a models:/ URI here would be resolved against the process-wide registry URI instead.
            source = client.get_model_version_download_uri(name, str(mv.version))
            got = download_artifacts(artifact_uri=source, dst_path=str(tmp / "mlflow"), tracking_uri=tracking_uri)
            _assemble(Path(got), tmp / "model")
            if (tmp / "mlflow").exists():
                shutil.rmtree(tmp / "mlflow")
            if (tmp / "model" / ADAPTER_BASE_RECORD).is_file():
                _attach_base(cfg, workdir, tmp / "model")
            (tmp / _COMPLETE).write_text(f"models:/{name}/{mv.version}\n", encoding="utf-8")
    log.info("%s → version %s at %s", uri, mv.version, dest / "model")
    return dest / "model"


def _attach_base(cfg: TrackingConfig, workdir: str | Path, adapter: Path) -> None:
    """Fetch the base an adapter version records, check it is the same weights, and point the local
    adapter's config at it (the recorded path is the training pod's)."""
    import json

    record = json.loads((adapter / ADAPTER_BASE_RECORD).read_text(encoding="utf-8"))
    base = resolve_model_uri(cfg, workdir, record["uri"])
    got = weights_fingerprint(base)
    if got != record["fingerprint"]:
        raise TrackingError(
            f"{record['uri']}: its weights' fingerprint {got[:12]} is not the {record['fingerprint'][:12]} "
            "the adapter was registered with"
        )
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
