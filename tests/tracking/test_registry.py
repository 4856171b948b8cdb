"""The Model Registry: register full models and adapters, aliases, promotion, fetching versions back."""

from __future__ import annotations

from pathlib import Path

import pytest
from trackhelpers import read_back

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import (
    TrackingError,
    champion_info,
    promote,
    register_model,
    resolve_model_uri,
    resolve_tracking_uri,
    stage_run,
    start_parent_run,
)


def _logits(model_dir: Path):
    import torch

    from kubellm.models.causal_lm import load_causal_lm

    lm = load_causal_lm(model_dir, device="cpu")
    ids = torch.tensor([lm.tokenizer("def add(a, b): return a + b")["input_ids"]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.mark.slow
def test_register_promote_resolve(workdir: Path, tiny_models: dict[str, Path]) -> None:
    import torch

    cfg = TrackingConfig(experiment="reg", registered_model="tiny-lm")
    assert champion_info(cfg, workdir) is None  # no registered model at all yet
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    with stage_run(cfg, workdir, parent_run_id=parent, stage="register") as tr:
        v1 = register_model(
            cfg,
            workdir,
            tiny_models["full"],
            run_id=tr.run_id,
            metrics={"perplexity": 12.5, "eval_tokens": 900.0, "bench.x.acc": 0.5},
            tags={"data_fingerprint": "fp-1"},
        )
        v2 = register_model(cfg, workdir, tiny_models["adapter"], run_id=tr.run_id, base_model=tiny_models["full"])
        run_id = tr.run_id
    assert (v1.version, v1.aliases, v1.uri) == (1, ["candidate"], "models:/tiny-lm/1")
    assert v1.tags["metric.perplexity"] == "12.5" and v1.tags["data_fingerprint"] == "fp-1"
    assert not {"metric.eval_tokens", "metric.bench.x.acc"} & set(v1.tags)  # a handful of headline figures only
    assert (v2.version, v2.aliases) == (2, ["candidate"])
    assert v2.tags["adapter"] == "true" and v2.tags["base_model"] == str(tiny_models["full"])
    assert champion_info(cfg, workdir) is None  # registered, but nothing promoted

    champ = promote(cfg, workdir, 2)
    assert champ.aliases == ["candidate", "champion"] and champion_info(cfg, workdir) == champ

    # read back in another process: both versions, the candidate alias moved to the newest one
    got = read_back(resolve_tracking_uri(cfg, workdir), "reg", "tiny-lm")
    assert [(v["version"], v["aliases"]) for v in got["versions"]] == [(1, []), (2, ["candidate", "champion"])]
    assert got["versions"][0]["tags"]["data_fingerprint"] == "fp-1" and got["versions"][0]["run_id"] == run_id
    assert "adapter" in got["runs"][run_id]["artifacts"]  # the raw adapter is kept beside the merged model

    # a version comes back as one loadable folder that computes what the registered model computed
    path = resolve_model_uri(cfg, workdir, "models:/tiny-lm@champion")
    assert path == workdir.resolve() / "models" / "tiny-lm" / "2" / "model"
    assert torch.allclose(_logits(path), _logits(tiny_models["adapter"]), atol=1e-5)  # merged = base + adapter
    assert torch.allclose(
        _logits(resolve_model_uri(cfg, workdir, "models:/tiny-lm/1")), _logits(tiny_models["full"]), atol=1e-6
    )
    assert resolve_model_uri(cfg, workdir, "models:/tiny-lm/2") == path  # downloaded once, then reused
    assert resolve_model_uri(cfg, workdir, str(tiny_models["full"])) == tiny_models["full"]

    promote(cfg, workdir, 1, force=True)  # a rollback moves the alias back: exactly one champion
    assert champion_info(cfg, workdir).version == 1


def test_registry_errors(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="reg", registered_model="nothing")
    with pytest.raises(TrackingError, match="has no version 7"):
        promote(cfg, workdir, 7)
    with pytest.raises(TrackingError, match="no version of 'nothing' has alias @champion"):
        resolve_model_uri(cfg, workdir, "models:/nothing@champion")
    with pytest.raises(TrackingError, match="expected models:/<name>@<alias>"):
        resolve_model_uri(cfg, workdir, "runs:/abc/model")
    off = TrackingConfig(enabled=False)
    assert champion_info(off, workdir) is None
    with pytest.raises(TrackingError, match="tracking.enabled is false"):
        register_model(off, workdir, workdir, run_id="x")


def test_a_model_with_nan_weights_is_never_registered(
    workdir: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A diverged run's model must not become a candidate (and so never the champion)."""
    import shutil

    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["full"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = sorted(k for k in tensors if "mlp" in k)[0]
    tensors[name][0, 0] = torch.nan
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})

    cfg = TrackingConfig(experiment="reg", registered_model="tiny-lm")
    refused = pytest.raises(
        TrackingError, match=rf"broken: 1 weight tensors hold NaN or infinite values \(e\.g\. {name}"
    )
    with stage_run(cfg, workdir, parent_run_id=None, stage="register") as tr, refused:
        register_model(cfg, workdir, broken, run_id=tr.run_id)
    client = MlflowClient(resolve_tracking_uri(cfg, workdir))
    assert client.search_model_versions("name='tiny-lm'") == []
