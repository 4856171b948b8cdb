"""The predictor over HTTP with real clients: the ``openai`` package, httpx for KServe V1/V2, concurrency,
and every malformed request answered with its documented status while the server keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubellm.config import load_config
from kubellm.serve.app import BackgroundServer, build_app, load_model

pytestmark = pytest.mark.integration

PROMPTS = ["The quick brown fox", "The cat sits on", "Where is the bird?", "You are a helpful assistant"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who jumps over the dog?"}]


def _server(model_dir: Path, *overrides: str) -> tuple[BackgroundServer, object]:
    cfg = load_config(
        None,
        [
            "serve.precision=fp32",
            "serve.max_prompt_tokens=64",
            "serve.max_new_tokens=32",
            "serve.default_max_tokens=8",
            *overrides,
        ],
    )
    model = load_model(cfg, str(model_dir))
    return BackgroundServer(build_app(model)), model


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Iterator[tuple[str, object]]:
    server, model = _server(tiny_model_dir)
    with server:
        yield server.url, model


@pytest.fixture(scope="module")
def client(predictor):
    import openai

    return openai.OpenAI(base_url=predictor[0] + "/openai/v1", api_key="unused", max_retries=0, timeout=30)


def _completion(client, prompt: str, **kw) -> str:
    return client.completions.create(model="kubellm", prompt=prompt, max_tokens=8, temperature=0, **kw).choices[0].text


def test_openai_models_chat_and_completion(client) -> None:
    assert [m.id for m in client.models.list().data] == ["kubellm"]
    chat = client.chat.completions.create(model="kubellm", messages=CHAT, max_tokens=8, temperature=0)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 10
    # max_completion_tokens (the newer name) is honoured like max_tokens.
    again = client.chat.completions.create(model="kubellm", messages=CHAT, max_completion_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    text = client.completions.create(model="kubellm", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert text.object == "text_completion" and text.usage.completion_tokens == 6
    batch = client.completions.create(model="kubellm", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text.choices[0].text


def test_streaming_adds_up_to_the_same_answer(client) -> None:
    whole = client.chat.completions.create(model="kubellm", messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="kubellm",
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    streamed = client.completions.create(model="kubellm", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == _completion(client, PROMPTS[1])


def test_32_concurrent_requests_answer_as_alone(predictor, client) -> None:
    import openai

    url, model = predictor
    alone = {p: _completion(client, p) for p in PROMPTS}
    batches_before = len(model.engine.stats.batch_sizes)

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
        calls = [
            aclient.completions.create(model="kubellm", prompt=PROMPTS[i % 4], max_tokens=8, temperature=0)
            for i in range(32)
        ]
        return [r.choices[0].text for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [alone[PROMPTS[i % 4]] for i in range(32)]
    sizes = model.engine.stats.batch_sizes[batches_before:]
    # batched, never beyond serve.max_batch_size (how full a batch gets depends on arrival timing: rows join
    # a running batch at step boundaries)
    assert sum(sizes) == 32 and 1 < max(sizes) <= 8


def test_kserve_v1_and_v2(predictor, client) -> None:
    url, _ = predictor
    want = [_completion(client, p) for p in PROMPTS[:2]]
    v1 = httpx.post(
        f"{url}/v1/models/kubellm:predict",
        timeout=30,
        json={"instances": [PROMPTS[0], {"prompt": PROMPTS[1]}], "parameters": {"max_tokens": 8}},
    )
    assert v1.status_code == 200 and v1.json() == {"predictions": want}
    assert httpx.get(f"{url}/v1/models").json() == {"models": ["kubellm"]}
    assert httpx.get(f"{url}/v1/models/kubellm").json() == {"name": "kubellm", "ready": True}

    v2 = httpx.post(
        f"{url}/v2/models/kubellm/infer",
        timeout=30,
        json={
            "id": "r1",
            "parameters": {"max_tokens": 8},
            "inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": PROMPTS[:2]}],
        },
    )
    assert v2.status_code == 200
    out = v2.json()
    assert out["id"] == "r1" and out["outputs"][0]["name"] == "text_output" and out["outputs"][0]["data"] == want
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2/models/kubellm/ready").json()["ready"] is True
    meta = httpx.get(f"{url}/v2/models/kubellm").json()
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]


LONG = "The cat sits on the mat " * 20  # > 64 tokens
OAI = "/openai/v1/chat/completions"
MALFORMED = [
    # (path, body (dict → JSON, str → raw), status, OpenAI code or None, message fragment)
    (OAI, "{not json", 400, "invalid_json", "not valid JSON"),
    (OAI, "[1, 2]", 400, "invalid_json", "JSON object"),
    (OAI, {"model": "kubellm"}, 400, "invalid_value", "messages"),
    (OAI, {"model": "kubellm", "messages": "hi"}, 400, "invalid_value", "messages"),
    (OAI, {"model": "gpt-4", "messages": CHAT}, 404, "model_not_found", "'gpt-4' does not exist"),
    (
        OAI,
        {"model": "kubellm", "messages": [{"role": "user", "content": LONG}]},
        400,
        "context_length_exceeded",
        "limit of 64",
    ),
    (OAI, {"model": "kubellm", "messages": CHAT, "max_tokens": -1}, 400, None, "max_tokens"),
    (OAI, {"model": "kubellm", "messages": CHAT, "max_tokens": 0}, 400, None, "max_tokens"),
    (OAI, {"model": "kubellm", "messages": CHAT, "max_tokens": 10**9}, 400, None, "limit"),
    (OAI, {"model": "kubellm", "messages": CHAT, "temperature": 9}, 400, None, "temperature"),
    (OAI, {"model": "kubellm", "messages": CHAT, "n": 17}, 400, "invalid_value", "n: Input should be less than"),
    ("/openai/v1/completions", {"model": "kubellm", "prompt": LONG}, 400, "context_length_exceeded", "limit of 64"),
    ("/openai/v1/completions", {"model": "kubellm", "prompt": [5, 99999]}, 400, None, "token ids"),
    ("/v1/models/kubellm:predict", "{not json", 400, None, "Unrecognized request format"),
    ("/v1/models/kubellm:predict", {"inputs": ["x"]}, 400, None, "instances"),
    ("/v1/models/kubellm:predict", {"instances": [42]}, 400, None, "instances[0]"),
    ("/v1/models/kubellm:predict", {"instances": ["x"], "parameters": {"beams": 4}}, 400, None, "beams"),
    ("/v1/models/kubellm:predict", {"instances": ["x"], "parameters": {"max_tokens": -5}}, 400, None, "max_tokens"),
    ("/v1/models/nope:predict", {"instances": ["x"]}, 404, None, "nope does not exist"),
    (
        "/v2/models/kubellm/infer",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        400,
        None,
        "text_input",
    ),
    (
        "/v2/models/kubellm/infer",
        {"inputs": [{"name": "text_input", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
        400,
        None,
        "BYTES",
    ),
    ("/v2/models/kubellm/infer", {"inputs": "nope"}, 400, None, "inputs"),
    ("/v2/models/nope/infer", {"inputs": []}, 404, None, "nope does not exist"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "fragment"),
    MALFORMED,
    ids=[f"{i}-{row[0].split('/')[-1]}-{row[2]}" for i, row in enumerate(MALFORMED)],
)
def test_malformed_requests_get_their_status_and_the_server_keeps_serving(
    predictor, path, body, status, code, fragment
) -> None:
    url, _ = predictor
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    resp = httpx.post(url + path, timeout=30, **kw)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    if path.startswith("/openai/"):
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
        assert error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        message = error
    assert fragment in message and "\n" not in message
    ok = httpx.post(
        f"{url}/openai/v1/completions", json={"model": "kubellm", "prompt": "The cat", "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


def test_full_queue_answers_503_and_recovers(tiny_model_dir: Path) -> None:
    server, model = _server(tiny_model_dir, "serve.max_queue=1", "serve.max_batch_size=1")

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "kubellm", "prompt": "The cat", "max_tokens": 32, "min_tokens": 32}
            return await asyncio.gather(*(http.post(f"{url}/openai/v1/completions", json=body) for _ in range(8)))

    with server:
        answers = asyncio.run(burst(server.url))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}
        busy = next(r for r in answers if r.status_code == 503).json()["error"]
        assert busy["code"] == "overloaded" and "1 requests already waiting" in busy["message"]
        again = httpx.post(
            f"{server.url}/openai/v1/completions",
            timeout=30,
            json={"model": "kubellm", "prompt": "The cat", "max_tokens": 4},
        )
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def test_rollout_smoke_check_against_the_predictor(predictor) -> None:
    from kubellm.errors import ServingError
    from kubellm.k8s.rollout import _cluster_local, http_smoke

    url, _ = predictor
    http_smoke("kubellm", max_tokens=2)(url)  # passes: a 200 with a completion
    with pytest.raises(ServingError, match="HTTP 404"):
        http_smoke("other-model")(url)
    # An external Knative URL is tried cluster-local first; here neither resolves, so the error names the
    # URL as KServe reported it.
    with pytest.raises(ServingError, match=r"local\.serving\.invalid/openai/v1/completions failed"):
        http_smoke("kubellm", timeout_s=2)("http://local.serving.invalid")
    assert (
        _cluster_local("http://latest-local-predictor.serving.example.com")
        == "http://latest-local-predictor.serving.svc.cluster.local"
    )
    assert _cluster_local(url) is None and _cluster_local("http://x.ns.svc.cluster.local") is None
