"""The deploy stage without a cluster: the real predictor answers the smoke request, and the stage says
what happened rather than claiming an endpoint where nothing listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from kubellm.config import load_config
from kubellm.stages import StageContext, registry
from kubellm.stages import deploy as stage


@pytest.mark.slow
def test_local_deploy_smoke_tests_a_real_predictor_and_claims_no_endpoint(
    workdir: Path, tiny_models: dict[str, Path]
) -> None:
    cfg = load_config(
        None,
        [
            f"workdir={workdir}",
            "tracking.registered_model=tiny-lm",
            "deploy.smoke_max_tokens=2",
            "deploy.storage_uri=pvc://models/tiny",
        ],
    )
    ctx = StageContext(cfg.tracking, str(workdir))
    uri = registry.register(tiny_models["full"], ctx).values["uri"]

    out = stage.deploy(cfg, workdir / "deploy", ctx, target="local", model_uri=uri)

    v = out.values
    assert v["status"] == "verified" and v["endpoint"] == ""  # nothing keeps listening after the step
    assert "predictor started for them at http://127.0.0.1:" in v["detail"]
    assert f"kubellm serve --model {uri}" in v["detail"]
    assert v["aliases"] == ["candidate", "champion"]
    port = int(v["detail"].split("http://127.0.0.1:")[1].split(" ")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # the temporary predictor was stopped
    isvc = yaml.safe_load(Path(v["manifests"]).read_text())
    assert isvc["kind"] == "InferenceService" and "tiny-lm" in str(isvc)  # served under the registry's name
    assert (workdir / "deploy" / "playground.yaml").is_file()
    assert "verified" in out.report_md and "kubellm serve" in out.report_md
