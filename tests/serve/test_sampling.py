"""Sampling parity with vLLM where clients send it (issue 22): ``repetition_penalty``, ``logit_bias``,
``presence_penalty`` and ``frequency_penalty`` give the answers plain ``transformers`` generation gives
with the same settings, row by row inside a shared batch; ``n`` returns that many choices; values out of
range are a 400 naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubellm.config.serve import ServeConfig
from kubellm.serve.app import BackgroundServer, build_app
from kubellm.serve.predictor import LLMModel

PROMPTS = ["The quick brown fox", "The cat sits on the mat", "Where is the bird?"]
N = 16


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LLMModel:
    m = LLMModel(
        ServeConfig(precision="fp32", max_new_tokens=32, default_max_tokens=8, batch_wait_ms=30), str(tiny_model_dir)
    )
    m.load()
    return m


class OpenAIPenalties:
    """OpenAI's documented presence and frequency penalties as a transformers logits processor (on the
    generated tokens only): ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.start, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        import torch

        for row in range(scores.shape[0]):
            generated = input_ids[row, self.start :]
            if generated.numel():
                counts = torch.bincount(generated, minlength=scores.shape[1]).to(scores.dtype)
                scores[row] -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores


def _reference(model: LLMModel, prompt: str, **settings) -> str:
    """Plain ``generate`` on batch 1, greedy, with transformers' own processors where it has them."""
    import torch
    from transformers import LogitsProcessorList

    ids = torch.tensor([model.encode_prompt(prompt)])
    kwargs = {}
    if "repetition_penalty" in settings:
        kwargs["repetition_penalty"] = settings["repetition_penalty"]
    if "logit_bias" in settings:
        kwargs["sequence_bias"] = {(int(t),): float(b) for t, b in settings["logit_bias"].items()}
    processors = LogitsProcessorList()
    if "presence_penalty" in settings or "frequency_penalty" in settings:
        processors.append(
            OpenAIPenalties(ids.shape[1], settings.get("presence_penalty", 0.0), settings.get("frequency_penalty", 0.0))
        )
    with torch.inference_mode():
        out = model.engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            logits_processor=processors,
            **kwargs,
        )
    return model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _engine_answers(model: LLMModel, jobs: list[tuple[str, dict]]) -> list[str]:
    async def main() -> list[str]:
        await model.engine.start()
        try:
            reqs = [model.submit(model.encode_prompt(p), model.sampling(max_tokens=N, **s)) for p, s in jobs]
            return [(await r.result()).text for r in reqs]
        finally:
            await model.engine.stop()

    return asyncio.run(main())


SETTINGS = [
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 2.0},
    {"presence_penalty": -0.5, "frequency_penalty": 1.0},
]


def test_penalties_and_biases_match_transformers_row_by_row(model: LLMModel) -> None:
    bias_token = model.tokenizer.convert_tokens_to_ids("Ġcat")
    settings = [*SETTINGS, {"logit_bias": {str(bias_token): 100.0}}]
    jobs = [(p, s) for s in settings for p in PROMPTS] + [(p, {}) for p in PROMPTS]
    answers = _engine_answers(model, jobs)
    plain = dict(zip(PROMPTS, answers[-len(PROMPTS) :], strict=True))
    for (prompt, s), got in zip(jobs, answers, strict=True):
        assert got == _reference(model, prompt, **s), (prompt, s)
    for s in settings:  # every setting changes at least one answer: the test can tell
        assert any(_reference(model, p, **s) != plain[p] for p in PROMPTS), s
    assert max(model.engine.stats.batch_sizes) == 8  # rows of different settings shared batches


@pytest.fixture(scope="module")
def url(model: LLMModel) -> Iterator[str]:
    with BackgroundServer(build_app(model)) as server:
        yield server.url


@pytest.mark.integration
def test_n_choices(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
    greedy = client.completions.create(model="kubellm", prompt=PROMPTS[:2], n=3, max_tokens=6, temperature=0)
    assert [c.index for c in greedy.choices] == list(range(6))
    texts = [c.text for c in greedy.choices]
    assert texts[:3] == [texts[0]] * 3 and texts[3:] == [texts[3]] * 3 and texts[0] != texts[3]
    single = client.completions.create(model="kubellm", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # counted once per prompt
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens

    sampled = [
        client.chat.completions.create(
            model="kubellm", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=8, temperature=1.0, seed=7
        )
        for _ in range(2)
    ]
    first = [c.message.content for c in sampled[0].choices]
    assert [c.message.content for c in sampled[1].choices] == first  # seeded: repeatable
    assert len(set(first)) > 1  # and the choices differ


@pytest.mark.integration
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", 3),
        ("logit_bias", {"99999": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"x": 1}),
        ("n", 17),
        ("n", 0),
    ],
)
def test_out_of_range_values_are_refused_by_name(url: str, field: str, value) -> None:
    resp = httpx.post(
        f"{url}/openai/v1/completions",
        timeout=30,
        json={"model": "kubellm", "prompt": "Hi", "max_tokens": 2, field: value},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field and resp.json()["error"]["message"].startswith(field)


@pytest.mark.integration
def test_penalties_on_kserve_v1(url: str, model: LLMModel) -> None:
    resp = httpx.post(
        f"{url}/v1/models/kubellm:predict",
        timeout=60,
        json={"instances": [PROMPTS[0]], "parameters": {"max_tokens": N, "repetition_penalty": 1.8}},
    )
    assert resp.json()["predictions"] == [_reference(model, PROMPTS[0], repetition_penalty=1.8)]
