"""Adapters as registry versions (issue 22): an adapter version stores the adapter (kilobytes here,
megabytes for a 7 B base) and records its base version, registered once and found again by its content
fingerprint; ``models:/name@champion`` of an adapter brings the base too, and is served with the real
``openai`` client, alone or as one adapter of a shared base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import TrackingError, promote, resolve_model_uri, stage_run, start_parent_run
from kubellm.tracking.registry import (
    ADAPTER_BASE_RECORD,
    register_adapter,
    weights_fingerprint,
)

pytestmark = pytest.mark.slow
PROMPT = "def add(a, b):"


def _answer(model_ref: str, cfg: TrackingConfig, workdir: Path, name: str = "served", **serve: object) -> str:
    """One greedy completion from ``kubellm serve``'s app on 127.0.0.1, asked with the openai client."""
    import openai

    from kubellm.config.serve import ServeConfig
    from kubellm.serve.app import BackgroundServer, build_app
    from kubellm.serve.predictor import LLMModel

    model = LLMModel(
        ServeConfig(precision="fp32", model_name="served", **serve), model_ref, tracking=cfg, workdir=workdir
    )
    model.load()
    with BackgroundServer(build_app(model)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
        return client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def test_adapter_versions_share_one_base_and_resolve_with_it(workdir: Path, tiny_models: dict[str, Path]) -> None:
    cfg = TrackingConfig(experiment="adapters", registered_model="tiny-lm")
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    with stage_run(cfg, workdir, parent_run_id=parent, stage="register") as tr:
        v1 = register_adapter(
            cfg,
            workdir,
            tiny_models["adapter"],
            run_id=tr.run_id,
            base_model=tiny_models["full"],
            metrics={"perplexity": 9.5},
        )
        v2 = register_adapter(cfg, workdir, tiny_models["adapter"], run_id=tr.run_id, base_model=tiny_models["full"])
    fingerprint = weights_fingerprint(tiny_models["full"])
    for info, version in ((v1, 1), (v2, 2)):
        assert (info.name, info.version, info.aliases[-1:]) == ("tiny-lm", version, ["candidate"])
        assert info.tags["kind"] == "adapter" and info.tags["base_name"] == "tiny-lm-base"
        assert info.tags["base_version"] == "1" and info.tags["base_fingerprint"] == fingerprint
    assert v1.tags["metric.perplexity"] == "9.5"
    # The base was registered once, and an adapter version stores a fraction of a merged one.
    adapter_bytes, merged_bytes = int(v1.tags["storage_bytes"]), int(v1.tags["merged_storage_bytes"])
    factor = merged_bytes / adapter_bytes
    print(f"storage per released version: adapter {adapter_bytes} B, merged {merged_bytes} B ({factor:.1f}x less)")
    assert factor > 5

    promote(cfg, workdir, 2)
    path = resolve_model_uri(cfg, workdir, "models:/tiny-lm@champion")
    record = json.loads((path / ADAPTER_BASE_RECORD).read_text())
    assert record == {"name": "tiny-lm-base", "version": 1, "uri": "models:/tiny-lm-base/1", "fingerprint": fingerprint}
    base = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == workdir.resolve() / "models" / "tiny-lm-base" / "1" / "model"
    assert weights_fingerprint(base) == fingerprint  # a registry round trip keeps the fingerprint
    assert not list(path.glob("model*.safetensors"))  # the adapter version holds no base weights

    # Served alone (merged on load) and as an adapter of the shared base: what the local adapter answers.
    want = _answer(str(tiny_models["adapter"]), cfg, workdir)
    assert _answer("models:/tiny-lm@champion", cfg, workdir) == want
    shared = _answer(
        "models:/tiny-lm-base/1", cfg, workdir, name="support", adapters={"support": "models:/tiny-lm@champion"}
    )
    assert shared == want


def test_adapter_on_another_base_is_refused_when_served(
    workdir: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from kubellm.errors import ServingError

    cfg = TrackingConfig(experiment="adapters", registered_model="tiny-lm")
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    with stage_run(cfg, workdir, parent_run_id=parent, stage="register") as tr:
        register_adapter(cfg, workdir, tiny_models["adapter"], run_id=tr.run_id, base_model=tiny_models["full"])
    # Another base of the same shapes (a fine-tune of it, say): only the fingerprint tells them apart.
    other = tmp_path / "other"
    shutil.copytree(tiny_models["full"], other)
    from safetensors.torch import load_file, save_file

    weights = next(other.glob("*.safetensors"))
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ServingError, match=r"^adapter support: base mismatch: trained on a base with fingerprint"):
        _answer(str(other), cfg, workdir, adapters={"support": "models:/tiny-lm/1"})


def test_a_broken_adapter_is_never_registered(workdir: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = TrackingConfig(experiment="adapters", registered_model="tiny-lm")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["adapter"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    with (
        stage_run(cfg, workdir, parent_run_id=parent, stage="register") as tr,
        pytest.raises(TrackingError, match="NaN or infinite"),
    ):
        register_adapter(cfg, workdir, broken, run_id=tr.run_id, base_model=tiny_models["full"])
    with pytest.raises(TrackingError, match="not a LoRA adapter"):
        register_adapter(cfg, workdir, tiny_models["full"], run_id="x", base_model=tiny_models["full"])


def test_the_register_step_releases_adapter_versions_and_serve_takes_the_champion(
    workdir: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The pipeline's register step (issue 22): a LoRA fine-tune becomes an adapter version, its storage
    beside a merged copy's in the report; ``tracking.register_merged`` keeps merged versions; ``kubellm
    serve`` with no ``--model`` serves the champion adapter version, asked with the real openai client;
    fine-tuning from it fetches it merged; a cluster deploy that could not load it is refused up front."""
    import openai

    from kubellm.config import RunConfig
    from kubellm.errors import ServingError
    from kubellm.serve.app import BackgroundServer, build_app, load_model
    from kubellm.stages import StageContext
    from kubellm.stages.deploy import deploy
    from kubellm.stages.registry import register
    from kubellm.stages.train import fetch_model

    cfg = TrackingConfig(experiment="adapters", registered_model="tiny-lm")
    out = register(tiny_models["adapter"], StageContext.for_command(cfg, str(workdir)), base_model=tiny_models["full"])
    storage = out.values["storage"]
    assert out.values["uri"] == "models:/tiny-lm/1" and out.values["info"].tags["kind"] == "adapter"
    assert storage["kind"] == "adapter" and storage["base"] == "models:/tiny-lm-base/1"
    assert storage["storage_factor"] == round(storage["merged_storage_bytes"] / storage["storage_bytes"], 2) > 5
    assert f"({storage['storage_factor']:.3g}x less)" in out.report_md

    merged_ctx = StageContext.for_command(cfg.model_copy(update={"register_merged": True}), str(workdir))
    merged = register(tiny_models["adapter"], merged_ctx, base_model=tiny_models["full"]).values
    assert merged["uri"] == "models:/tiny-lm/2" and merged["info"].tags["adapter"] == "true"
    assert merged["storage"] == {"kind": "merged", "storage_bytes": storage["merged_storage_bytes"]}

    promote(cfg, workdir, 1)
    run_cfg = RunConfig(workdir=str(workdir), tracking=cfg, serve={"precision": "fp32"})
    model = load_model(run_cfg)  # no --model: models:/tiny-lm@champion, the adapter version and its base
    with BackgroundServer(build_app(model)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
        got = (
            client.completions.create(model=run_cfg.serve.model_name, prompt=PROMPT, max_tokens=8, temperature=0)
            .choices[0]
            .text
        )
    want = _answer(str(tiny_models["adapter"]), cfg, workdir)
    assert got == want

    ctx = StageContext.for_command(cfg, str(workdir))
    fetched = tmp_path / "base"  # finetune.base_model: models:/tiny-lm@champion
    fetch_model("models:/tiny-lm@champion", fetched, ctx)
    assert (fetched / "config.json").is_file() and not (fetched / "adapter_config.json").exists()
    assert _answer(str(fetched), cfg, workdir) == want

    with pytest.raises(
        ServingError,
        match=r"models:/tiny-lm/1 is an adapter version \(base models:/tiny-lm-base/1\): "
        r"the kubellm predictor pod cannot fetch its base",
    ):
        deploy(run_cfg, tmp_path / "deploy", ctx, target="cluster", model_uri="models:/tiny-lm/1")
    assert not (tmp_path / "deploy" / "inferenceservice.yaml").exists()
