"""The run config: every stage's section in one document, loaded from YAML with dotted overrides."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from kubellm.config.base import StrictModel
from kubellm.config.data import DataConfig
from kubellm.config.evaluate import EvalConfig
from kubellm.config.platform import PlatformConfig
from kubellm.config.secrets import WHERE_CREDENTIALS_GO, find_secrets
from kubellm.config.serve import DeployConfig, PlaygroundConfig, ServeConfig
from kubellm.config.tracking import TrackingConfig
from kubellm.config.train import FinetuneConfig, PretrainConfig
from kubellm.errors import ConfigError

_SERVED_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,127}$")


class SweepConfig(StrictModel):
    """``llm-lora-sweep``: several fine-tunes at once, the best by ``metric`` is registered."""

    trials: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"lora.r": 4}, {"lora.r": 8}, {"lora.r": 16}], min_length=1, max_length=64
    )
    """One entry per fine-tune: dotted overrides of the ``finetune`` section (``{"lora.r": 16,
    "optim.lr": 0.0005}``). Every trial is validated when the config loads."""
    metric: str = "perplexity"
    """Evaluation metric that picks the best trial among those that passed the gate."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower (``min``: perplexity) or higher (``max``: ROUGE-L) metric is better."""

    def items(self) -> list[dict[str, Any]]:
        """The trials as a pipeline's ``ParallelFor`` items: ``{"name": "trial-1", "overrides": {...}}``."""
        return [{"name": f"trial-{i + 1}", "overrides": dict(t)} for i, t in enumerate(self.trials)]


class ReleaseConfig(StrictModel):
    """What the deploy step reads at run time: the rollout, the predictor and the playground. (Where it
    runs — ``platform`` — is fixed when the pipeline is compiled.)"""

    deploy: DeployConfig = DeployConfig()
    serve: ServeConfig = ServeConfig()
    playground: PlaygroundConfig = PlaygroundConfig()


class RunConfig(StrictModel):
    """One lifecycle run. Sections a pipeline does not use may be left out."""

    name: str = Field(default="kubellm", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """Run name: lower-case letters, digits and dashes (it becomes part of Kubernetes names)."""
    workdir: str = ".kubellm"
    """Local working directory for outputs, the sqlite MLflow store and run summaries (relative to the
    current directory unless absolute)."""
    data: DataConfig | None = None
    """The pretraining corpus (``kind: pretrain``)."""
    instruct_data: DataConfig | None = None
    """The instruction data for fine-tuning (``kind: instruct``)."""
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None
    evaluate: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    deploy: DeployConfig = DeployConfig()
    playground: PlaygroundConfig = PlaygroundConfig()
    platform: PlatformConfig = PlatformConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _kinds(self) -> RunConfig:
        if self.data is not None and self.data.kind != "pretrain":
            raise ValueError("data.kind must be 'pretrain' (instruction data goes in instruct_data)")
        if self.instruct_data is not None and self.instruct_data.kind != "instruct":
            raise ValueError("instruct_data.kind must be 'instruct'")
        if self.finetune is not None:
            for i, trial in enumerate(self.sweep.trials):
                trial_finetune(self.finetune, trial, f"sweep.trials.{i}")
        if "model_name" not in self.serve.model_fields_set and _SERVED_NAME.match(self.tracking.registered_model):
            # Clients see the model under the registry's name (``model: kubellm-local``), not "kubellm".
            self.serve.model_name = self.tracking.registered_model
        if self.tracking.register_merged is False and self.deploy.runtime == "huggingface":
            raise ValueError(
                "tracking.register_merged: false with deploy.runtime huggingface: KServe's Hugging Face "
                "runtime cannot load an adapter version; set tracking.register_merged: true"
            )
        return self

    def merged_versions(self, target: str = "local") -> bool:
        """Whether the register step stores merged versions (``tracking.register_merged``; ``None`` decided
        here for ``target``, ``local`` or ``cluster``)."""
        if self.tracking.register_merged is not None:
            return self.tracking.register_merged
        if self.deploy.runtime == "huggingface":
            return True
        return target == "cluster" and self.deploy.runtime == "kubellm" and self.serve.base_model is None

    def release(self) -> ReleaseConfig:
        """The sections the deploy step reads at run time."""
        return ReleaseConfig(deploy=self.deploy, serve=self.serve, playground=self.playground)

    @model_validator(mode="after")
    def _no_secrets(self) -> RunConfig:
        # The whole config is compiled into pipeline YAML and logged to MLflow: no secret may ride along.
        found = find_secrets(self.model_dump(mode="json"))
        if found:
            raise ValueError(
                f"{'; '.join(found)}: a config is compiled and logged, never put a secret in it; {WHERE_CREDENTIALS_GO}"
            )
        return self

    def job_shared_pvc(self, stage: str) -> str | None:
        """The shared PVC of the cluster job that ``stage``'s step launches (a training job, the prep RayJob),
        which the step's own pod mounts too; None where the step works in its own pod."""
        if stage in ("pretrain", "finetune"):
            dist = self.platform.distributed_for(stage)
            return dist.shared_pvc if dist.engine != "none" else None
        data = {"prep": self.data, "prep_instruct": self.instruct_data}.get(stage)
        return data.cluster.shared_pvc if data is not None and data.cluster.nodes else None

    def config_hash(self) -> str:
        """A short, stable hash of the validated config (tags runs, names pipeline versions)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def trial_finetune(base: FinetuneConfig, overrides: dict[str, Any], origin: str) -> FinetuneConfig:
    """``base`` with a sweep trial's dotted overrides applied, validated (ValueError names ``origin``)."""
    doc = base.model_dump(mode="json")
    try:
        apply_overrides(doc, [f"{k}={json.dumps(v)}" for k, v in overrides.items()], origin)
        return FinetuneConfig.model_validate(doc)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, origin, FinetuneConfig).replace(": invalid config", "")) from None
    except ConfigError as err:
        raise ValueError(str(err)) from None


def _parse_value(raw: str) -> Any:
    """Parse an override value as YAML (``1000`` → int, ``true`` → bool, ``[a, b]`` → list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(doc: dict[str, Any], overrides: list[str], origin: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; list items by index, ``data.sources[0].uri=…`` or
    ``data.sources.0.uri=…``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{origin} {item!r}: expected KEY=VALUE, for example data.max_docs=1000")
        key = override_key(key)
        parts = key.split(".")
        node: Any = doc
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{origin} {key}: {'.'.join(parts[: i + 1])} is not a valid list index")
                node = node[int(part)]
            else:
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = {}
                elif not isinstance(nxt, dict | list):
                    raise ConfigError(f"{origin} {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
                node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{origin} {key}: {last} is not a valid list index")
            node[int(last)] = _parse_value(raw)
        else:
            node[last] = _parse_value(raw)
    return doc


def override_key(key: str) -> str:
    """``data.sources[0].uri`` → ``data.sources.0.uri`` (both spellings are accepted)."""
    return re.sub(r"\[(\d+)\]", r".\1", key.strip())


def format_validation_error(err: ValidationError, origin: str, model: type[StrictModel] | None = None) -> str:
    """One line per problem: ``origin: field.path: reason``; joined with '; '. With the ``model`` that was
    validated, an unknown field gets a "did you mean" from the fields of its section."""
    from kubellm.config.reference import unknown_field_hint

    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            hint = unknown_field_hint(model, e["loc"]) if model is not None else ""
            msg = f"unknown field{hint or ' (check the spelling)'} (every field: `kubellm config`)"
        problems.append(f"{loc}: {msg}")
    return f"{origin}: invalid config: " + "; ".join(problems)


def validate_section(model: type[StrictModel], doc: Any, origin: str) -> Any:
    """Validate one section (as a component does with its config dict), raising a one-line ConfigError."""
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin, model)) from None


def default_config_path() -> Path:
    """The embedded default run config (what ``make run`` runs), shipped inside the package so every
    command behaves the same from any folder."""
    return Path(__file__).with_name("local.yaml")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML run config, apply ``--set`` overrides and validate everything up front."""
    doc: dict[str, Any] = {}
    origin = "--set"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: {'a directory, not a config file' if p.is_dir() else 'config file not found'}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        if loaded is None:  # silently running on built-in defaults would hide a wrong or truncated file
            raise ConfigError(
                f"{p}: the config file is empty (or only comments); write {{}} in it to run with the built-in defaults"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, not {type(loaded).__name__}")
        doc = loaded
    apply_overrides(doc, list(overrides))
    return validate_section(RunConfig, doc, origin)
