"""A relative local base model is a path, never a Hub id (offline that cost ~45 s of retries)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubellm.config.tracking import TrackingConfig
from kubellm.stages import StageContext, registry


def test_register_with_a_relative_base_asks_the_hub_nothing(
    workdir: Path, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    asked: list[str] = []

    def no_hub(repo_id: str, *a, **kw):
        asked.append(repo_id)
        huggingface_hub.utils.validate_repo_id(repo_id)  # what the real client checks before any request
        raise AssertionError(f"the Hub was asked for {repo_id!r}")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", no_hub)
    shutil.copytree(tiny_models["full"], tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    ctx = StageContext(TrackingConfig(registered_model="rel"), str(workdir))
    out = registry.register(tiny_models["adapter"], ctx, base_model="pretrained")
    assert out.values["version"] == 1
    assert all(Path(a).is_absolute() for a in asked), asked  # refused by the client before any request
