"""The batching engine and the predictor model in-process: batching, requests joining a running batch,
limits, stop strings, streaming, seeds, the bounded queue, adapters and where models are found."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kubellm.config.serve import ServeConfig
from kubellm.errors import ServingError
from kubellm.serve.engine import Completion, EngineOverloaded, GenerationEngine, SamplingParams
from kubellm.serve.predictor import InvalidRequest, LLMModel, find_model_dir, resolve_model

PROMPTS = ["The quick brown fox", "The cat sits", "Where is the bird? The bird sings in the green tree"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LLMModel:
    m = LLMModel(
        ServeConfig(
            precision="fp32",
            max_prompt_tokens=64,
            max_new_tokens=32,
            max_queue=4,
            default_max_tokens=16,
            batch_wait_ms=20,
        ),
        str(tiny_model_dir),
    )
    m.load()
    return m


def _run(engine: GenerationEngine, coro_fn):
    async def main():
        await engine.start()
        try:
            return await coro_fn()
        finally:
            await engine.stop()

    return asyncio.run(main())


def _reference(model: LLMModel, prompt: str, max_tokens: int, min_tokens: int = 0) -> str:
    """The answer of a plain ``generate`` on batch 1, outside the engine."""
    import torch

    ids = torch.tensor([model.encode_prompt(prompt)])
    with torch.inference_mode():
        out = model.engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=min_tokens,
            do_sample=False,
        )
    return model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_concurrent_requests_are_batched_and_answer_as_alone(model: LLMModel) -> None:
    engine = model.engine
    params = SamplingParams(max_tokens=12)
    alone = {p: _reference(model, p, 12) for p in PROMPTS}
    batches_before = len(engine.stats.batch_sizes)

    async def go():
        reqs = [engine.submit(model.encode_prompt(PROMPTS[i % 3]), params) for i in range(4)]
        return await asyncio.gather(*(r.result() for r in reqs))

    results = _run(engine, go)
    # Prompts of different lengths share one left-padded batch and still answer as they do alone.
    assert [r.text for r in results] == [alone[PROMPTS[i % 3]] for i in range(4)]
    assert engine.stats.batch_sizes[batches_before:] == [4]
    assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in results)


async def _join_while_decoding(engine: GenerationEngine, model: LLMModel) -> tuple[list[str], list[str]]:
    """A long request decodes; three short ones arrive meanwhile. Returns the answers (long first) and the
    order in which they finished."""
    finished: list[str] = []

    async def answer(name: str, request) -> str:
        text = (await request.result()).text
        finished.append(name)
        return text

    # The long row has the shortest prompt: the newcomers' longer prompts left-pad its cache when they
    # join, and the padding is cut again when they leave.
    long = engine.submit(model.encode_prompt(PROMPTS[1]), SamplingParams(max_tokens=200, min_tokens=200))
    stream = long.stream()
    await stream.__anext__()  # the long row is decoding now
    shorts = [engine.submit(model.encode_prompt(p), SamplingParams(max_tokens=6)) for p in PROMPTS]
    rest = asyncio.ensure_future(answer("long", _Rest(stream)))
    texts = await asyncio.gather(*(answer(f"short{i}", r) for i, r in enumerate(shorts)))
    return [await rest, *texts], finished


class _Rest:
    """The completion at the end of an already started stream."""

    def __init__(self, stream) -> None:
        self.stream = stream

    async def result(self) -> Completion:
        async for item in self.stream:
            if isinstance(item, Completion):
                return item
        raise AssertionError("the stream ended without a completion")


def test_requests_join_a_running_batch_and_finish_first_with_the_same_answers(model: LLMModel) -> None:
    engine = model.engine
    alone = [_reference(model, PROMPTS[1], 200, 200), *(_reference(model, p, 6) for p in PROMPTS)]
    before = len(engine.stats.batch_sizes)
    texts, finished = _run(engine, lambda: _join_while_decoding(engine, model))
    assert texts == alone  # the completion holds the whole text, the streamed head included
    assert finished[-1] == "long"  # the short requests did not wait for the long one
    assert engine.stats.batch_sizes[before:] == [1, 3]  # one join of three while the long row ran

    engine.batching = "static"
    try:
        texts, finished = _run(engine, lambda: _join_while_decoding(engine, model))
    finally:
        engine.batching = "continuous"
    assert texts == alone
    assert finished[0] == "long"  # static batching: the newcomers waited for the whole batch


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(model: LLMModel) -> None:
    engine = model.engine
    ids = model.encode_prompt(PROMPTS[0])
    sampled = SamplingParams(max_tokens=10, min_tokens=10, temperature=0.8, top_p=0.9, seed=3)

    async def go():
        alone = await engine.submit(ids, sampled).result()
        crowd = [engine.submit(model.encode_prompt(p), SamplingParams(max_tokens=10)) for p in PROMPTS]
        together = engine.submit(ids, sampled)
        await asyncio.gather(*(r.result() for r in crowd))
        return alone.text, (await together.result()).text

    alone, together = _run(engine, go)
    assert alone == together


def test_streamed_deltas_add_up_to_the_text_and_stop_strings_cut(model: LLMModel) -> None:
    engine = model.engine
    full = _reference(model, PROMPTS[0], 16)
    middle = len(full) // 2
    stop = full[middle : middle + 3]  # a stop string met mid-answer, likely spanning a token boundary
    assert full.index(stop) > 0, full

    async def go():
        ids = model.encode_prompt(PROMPTS[0])
        plain = [x async for x in engine.submit(ids, SamplingParams(max_tokens=16)).stream()]
        stopped = [x async for x in engine.submit(ids, SamplingParams(max_tokens=16, stop=(stop, "zzz"))).stream()]
        return plain, stopped

    plain, stopped = _run(engine, go)
    assert isinstance(plain[-1], Completion) and "".join(plain[:-1]) == plain[-1].text == full
    done = stopped[-1]
    assert done.finish_reason == "stop" and done.text == full[: full.index(stop)]
    assert "".join(stopped[:-1]) == done.text  # nothing of the stop string was streamed


def test_min_tokens_fixes_length_and_a_seed_repeats_a_sample(model: LLMModel) -> None:
    engine = model.engine
    ids = model.encode_prompt(PROMPTS[1])

    async def go():
        sampled = SamplingParams(max_tokens=10, min_tokens=10, temperature=1.0, seed=7)
        a = await engine.submit(ids, sampled).result()
        b = await engine.submit(ids, sampled).result()
        c = await engine.submit(ids, SamplingParams(max_tokens=10, min_tokens=10, temperature=1.0, seed=8)).result()
        return a, b, c

    a, b, c = _run(engine, go)
    assert a.completion_tokens == b.completion_tokens == c.completion_tokens == 10
    assert a.text == b.text and a.text != c.text


def test_full_queue_refuses_at_once(model: LLMModel) -> None:
    engine = model.engine

    async def go():
        ids = model.encode_prompt(PROMPTS[0])
        accepted = [engine.submit(ids, SamplingParams(max_tokens=2)) for _ in range(engine.max_queue)]
        with pytest.raises(EngineOverloaded, match="4 requests already waiting"):
            engine.submit(ids, SamplingParams(max_tokens=2))
        return await asyncio.gather(*(r.result() for r in accepted))

    assert len(_run(engine, go)) == 4


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 33}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_sampling_limits(model: LLMModel, kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        model.sampling(**kwargs)
    assert err.value.param == param and err.value.status == 400


def test_prompt_limits(model: LLMModel) -> None:
    with pytest.raises(InvalidRequest, match="more than this server's limit of 64") as err:
        model.encode_prompt("the cat " * 100)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match="empty"):
        model.encode_prompt("")
    with pytest.raises(InvalidRequest, match="token ids"):
        model.encode_prompt([1, 10_000])
    assert model.sampling().max_tokens == 16  # default_max_tokens when a request does not say


def test_chat_uses_the_template(model: LLMModel) -> None:
    ids = model.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert model.tokenizer.decode(ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_adapter_is_served_merged_into_its_base(tiny_adapter_dir: Path, model: LLMModel) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    served = LLMModel(ServeConfig(precision="fp32"), str(tiny_adapter_dir))
    served.load()
    assert "adapter" in served.description
    base_dir = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tiny_adapter_dir).eval()
    ids = torch.tensor([served.encode_prompt(PROMPTS[2])])
    with torch.inference_mode():
        want = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    got = _run(served.engine, lambda: served.submit(ids[0].tolist(), SamplingParams(max_tokens=8)).result())
    assert got.text == served.tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    assert got.text != _reference(model, PROMPTS[2], 8)  # the adapter does change the answer


def test_model_directories_are_found_where_kserve_and_mlflow_put_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    nested = tmp_path / "mnt" / "models" / "model"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    assert find_model_dir(tmp_path / "mnt" / "models") == nested
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model("someorg/some-model") == "someorg/some-model"
    (tmp_path / "mnt" / "models" / "other").mkdir()
    (tmp_path / "mnt" / "models" / "other" / "adapter_config.json").write_text("{}")
    with pytest.raises(ServingError, match="several models"):
        find_model_dir(tmp_path / "mnt" / "models")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingError, match="no model in this directory"):
        find_model_dir(tmp_path / "empty")
    with pytest.raises(ServingError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ServingError, match="found a file"):
        resolve_model(str(nested / "config.json"))


def test_a_request_whose_client_left_stops_generating(model: LLMModel) -> None:
    engine = model.engine
    ids = model.encode_prompt(PROMPTS[0])

    async def go():
        before = engine.stats.generated_tokens
        stream = engine.submit(ids, SamplingParams(max_tokens=32, min_tokens=32)).stream()
        await stream.__anext__()
        await stream.aclose()  # what a disconnected client's cancelled handler does
        # Queued behind the abandoned row, so it ends after that row has stopped.
        await engine.submit(ids, SamplingParams(max_tokens=1)).result()
        return engine.stats.generated_tokens - before

    assert _run(engine, go) < 32
