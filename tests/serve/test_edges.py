"""The predictor at its edges (issue 24): deeply nested JSON, the model-repository routes, readiness
that follows whether the model can answer, and the versioned V2 routes.

Before: 100,000 nested ``[`` answered 500 on the OpenAI routes; an anonymous ``POST
/v2/repository/models/<name>/unload`` answered 200 and took the model offline while ``/v2/health/ready``
still said ready; ``/v2/models/<name>/versions/<v>/ready`` answered 501.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubellm.config import load_config
from kubellm.errors import ServingError
from kubellm.serve.app import (
    ADMIN_TOKEN_ENV,
    MAX_JSON_DEPTH,
    BackgroundServer,
    build_app,
    json_depth,
    load_model,
)

pytestmark = pytest.mark.integration

TOKEN = "admin-" + "t" * 12  # never a real one
V2_INFER = {
    "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["The cat"]}],
    "parameters": {"max_tokens": 2},
}


def _model(model_dir: Path, *overrides: str):
    cfg = load_config(
        None,
        [
            "serve.precision=fp32",
            "serve.model_name=kubellm",
            "serve.max_new_tokens=8",
            "serve.default_max_tokens=2",
            *overrides,
        ],
    )
    return load_model(cfg, str(model_dir))


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Iterator[str]:
    """A predictor with the defaults: the model-repository routes off."""
    with BackgroundServer(build_app(_model(tiny_model_dir))) as server:
        yield server.url


def _ready(url: str) -> tuple[int, int]:
    return (
        httpx.get(f"{url}/v2/health/ready", timeout=10).status_code,
        httpx.get(f"{url}/v2/models/kubellm/ready", timeout=10).status_code,
    )


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"prompt": "[[[[ \\"[[[ ]]"}') == 1
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


@pytest.mark.parametrize(
    "path",
    ["/v1/models/kubellm:predict", "/v2/models/kubellm/infer", "/openai/v1/completions", "/openai/v1/chat/completions"],
)
def test_deeply_nested_json_is_a_400_naming_the_limit(predictor: str, path: str) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        resp = httpx.post(predictor + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 400, resp.text[:300]
        assert f"nested deeper than this server's limit of {MAX_JSON_DEPTH} levels" in resp.text
    # Brackets inside strings are text, not nesting: a prompt full of them is answered.
    ok = httpx.post(
        f"{predictor}/openai/v1/completions",
        timeout=30,
        json={"model": "kubellm", "prompt": "The [" * 500, "max_tokens": 2},
    )
    assert ok.status_code == 200, ok.text[:300]
    assert _ready(predictor) == (200, 200)


def test_the_model_repository_routes_are_off_by_default(predictor: str) -> None:
    for action in ("unload", "load"):
        resp = httpx.post(f"{predictor}/v2/repository/models/kubellm/{action}", timeout=10)
        assert resp.status_code == 404 and "serve.model_repository_api" in resp.json()["error"]
    assert httpx.get(f"{predictor}/v2", timeout=10).json()["extensions"] == []
    assert _ready(predictor) == (200, 200)
    assert httpx.post(f"{predictor}/v2/models/kubellm/infer", json=V2_INFER, timeout=30).status_code == 200
    schema = httpx.get(f"{predictor}/openapi.json", timeout=10).json()["paths"]
    assert not any(p.startswith("/v2/repository") for p in schema)


def test_the_versioned_routes_answer_for_the_served_version(predictor: str) -> None:
    assert httpx.get(f"{predictor}/v2/models/kubellm/versions/1/ready", timeout=10).json() == {
        "name": "kubellm",
        "ready": True,
    }
    assert httpx.get(f"{predictor}/v2/models/kubellm/versions/1", timeout=10).json()["name"] == "kubellm"
    infer = httpx.post(f"{predictor}/v2/models/kubellm/versions/1/infer", json=V2_INFER, timeout=30)
    assert infer.status_code == 200 and infer.json()["outputs"][0]["name"] == "text_output"
    for path in ("/v2/models/kubellm/versions/2/ready", "/v2/models/kubellm/versions/2/infer"):
        resp = httpx.request("POST" if path.endswith("infer") else "GET", predictor + path, json=V2_INFER, timeout=10)
        assert resp.status_code == 404 and "serves version 1 only" in resp.json()["error"]


def test_the_model_repository_routes_need_the_token_and_readiness_follows(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ServingError, match=f"{ADMIN_TOKEN_ENV} is not set"):
        build_app(_model(tiny_model_dir, "serve.model_repository_api=true"))
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    with BackgroundServer(build_app(_model(tiny_model_dir, "serve.model_repository_api=true"))) as server:
        url = f"{server.url}/v2/repository/models/kubellm"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            resp = httpx.post(f"{url}/unload", headers=headers, timeout=10)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
            assert TOKEN not in resp.text
        assert _ready(server.url) == (200, 200)
        admin = {"authorization": f"Bearer {TOKEN}"}
        assert (
            httpx.post(f"{server.url}/v2/repository/models/other/unload", headers=admin, timeout=10).status_code == 404
        )
        assert httpx.post(f"{url}/unload", headers=admin, timeout=30).json() == {"name": "kubellm", "unload": True}
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 503
        assert httpx.post(f"{server.url}/v2/models/kubellm/infer", json=V2_INFER, timeout=10).status_code == 404
        assert httpx.post(f"{url}/load", headers=admin, timeout=30).json() == {"name": "kubellm", "load": True}
        assert _ready(server.url) == (200, 200)
        assert httpx.post(f"{server.url}/v2/models/kubellm/infer", json=V2_INFER, timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/v2", timeout=10).json()["extensions"] == ["model_repository_extension"]


def test_readiness_turns_false_when_the_engine_dies(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    with BackgroundServer(build_app(model)) as server:
        assert _ready(server.url) == (200, 200)

        def broken(*args: object) -> list:
            raise RuntimeError("simulated fault in the decode loop")

        model.engine._joining = broken  # fails after the next request's first step, outside the step's guard
        first = httpx.post(
            f"{server.url}/openai/v1/completions",
            timeout=30,
            json={"model": "kubellm", "prompt": "The cat", "max_tokens": 4},
        )
        assert first.status_code == 503 and "the generation engine stopped" in first.text
        assert _ready(server.url) == (503, 503)
        after = httpx.post(
            f"{server.url}/openai/v1/completions",
            timeout=30,
            json={"model": "kubellm", "prompt": "The cat", "max_tokens": 4},
        )
        assert after.status_code == 503
