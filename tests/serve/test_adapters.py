"""Many LoRA adapters on one base (issue 22): one predictor serves the base and three adapters, each
adapter answers what a predictor serving that adapter alone (merged) answers, rows of different adapters
share batches, names select adapters on every protocol, adapters load and unload at run time behind the
admin token, and a rank or base mismatch is refused in one line.

The adapters are made here on the tiny model of ``conftest.py`` with different ranks, target modules and
seeds (random non-zero ``B``: each changes the answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubellm.config.serve import ServeConfig
from kubellm.errors import ServingError
from kubellm.serve.adapters import BASE_RECORD, parse_adapter_args
from kubellm.serve.app import ADMIN_TOKEN_ENV, BackgroundServer, build_app
from kubellm.serve.metrics import EngineMetrics
from kubellm.serve.predictor import LLMModel

PROMPTS = ["The quick brown fox", "The cat sits", "Where is the bird? The bird sings"]
TOKEN = "admin-" + "a" * 12  # never a real one
#: (rank, target modules, seed) of the three adapters.
SHAPES = {
    "alpha": (2, ["q_proj", "v_proj"], 11),
    "beta": (4, ["k_proj", "o_proj"], 12),
    "gamma": (8, ["gate_proj", "down_proj", "q_proj"], 13),
}


def make_adapter(base_dir: Path, out: Path, rank: int, targets: list[str], seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, *shape) for name, shape in SHAPES.items()}


def _cfg(**kw) -> ServeConfig:
    return ServeConfig(precision="fp32", max_new_tokens=32, default_max_tokens=12, batch_wait_ms=30, **kw)


@pytest.fixture(scope="module")
def shared(tiny_model_dir: Path, adapters: dict[str, Path]) -> LLMModel:
    """The base and the three adapters in one predictor."""
    model = LLMModel(_cfg(adapters={n: str(p) for n, p in adapters.items()}), str(tiny_model_dir))
    model.load(observer=EngineMetrics("kubellm"))
    return model


def _answers(model: LLMModel, jobs: list[tuple[str, str]], max_tokens: int = 12) -> list[str]:
    """Greedy answers of ``(served name, prompt)`` jobs, all submitted together (one engine run)."""

    async def main() -> list[str]:
        await model.engine.start()
        try:
            reqs = []
            for name, prompt in jobs:
                served = model.lookup(name)
                reqs.append(served.submit(served.encode_prompt(prompt), served.sampling(max_tokens=max_tokens)))
            return [(await r.result()).text for r in reqs]
        finally:
            await model.engine.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def alone(adapters: dict[str, Path]) -> dict[str, list[str]]:
    """Each adapter's greedy answers from a predictor serving it alone (merged into its base, as before)."""
    out = {}
    for name, path in adapters.items():
        single = LLMModel(_cfg(), str(path))
        single.load()
        out[name] = _answers(single, [("kubellm", p) for p in PROMPTS])
    return out


def test_adapters_in_one_batch_answer_as_each_adapter_alone(shared: LLMModel, alone: dict[str, list[str]]) -> None:
    assert sorted(shared.views) == sorted(SHAPES)
    batches_before = len(shared.engine.stats.batch_sizes)
    jobs = [(name, p) for name in ["kubellm", *SHAPES] for p in PROMPTS]
    answers = dict(zip(jobs, _answers(shared, jobs), strict=True))
    for name in SHAPES:
        assert [answers[(name, p)] for p in PROMPTS] == alone[name], name
    # Mixed: the 12 requests went in batches of up to 8 rows, holding several adapters each.
    assert max(shared.engine.stats.batch_sizes[batches_before:]) == 8
    # The adapters matter: each answers differently from the base (a test that cannot fail otherwise).
    base = [answers[("kubellm", p)] for p in PROMPTS]
    assert all(alone[name] != base for name in SHAPES)


def test_a_name_not_served_is_a_404(shared: LLMModel) -> None:
    from kubellm.serve.predictor import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        shared.lookup("delta")
    assert err.value.status == 404 and "alpha" in str(err.value)


def test_rank_above_the_limit_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    big = make_adapter(tiny_model_dir, tmp_path / "big", 16, ["q_proj"], 3)
    model = LLMModel(_cfg(adapters={"big": str(big)}, max_lora_rank=8), str(tiny_model_dir))
    with pytest.raises(ServingError, match=r"^adapter big: rank 16 is above this server's max_lora_rank 8"):
        model.load()


def test_adapter_of_another_base_is_refused(tiny_model_dir: Path, tmp_path: Path, tiny_model_builder) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other-base"
    tiny_model_builder(AutoTokenizer.from_pretrained(tiny_model_dir), preset="small").save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    foreign = make_adapter(other, tmp_path / "foreign", 4, ["q_proj"], 4)
    model = LLMModel(_cfg(adapters={"foreign": str(foreign)}), str(tiny_model_dir))
    with pytest.raises(ServingError) as err:
        model.load()
    assert str(err.value).startswith(
        "adapter foreign: base mismatch: model.layers.0.self_attn.q_proj has input "
        "size 64 in the base, 256 in the adapter"
    )
    assert "\n" not in str(err.value)


def test_adapter_recording_another_base_fingerprint_is_refused(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from kubellm.tracking.registry import weights_fingerprint

    same, other = tmp_path / "same", tmp_path / "other"
    for d, fp in ((same, weights_fingerprint(tiny_model_dir)), (other, "0" * 64)):
        shutil.copytree(adapters["alpha"], d)
        (d / BASE_RECORD).write_text(json.dumps({"name": "base", "version": 1, "fingerprint": fp}))
    model = LLMModel(_cfg(adapters={"same": str(same)}), str(tiny_model_dir))
    model.load()  # the recorded base is the served one
    assert model.views["same"].adapter.base_fingerprint == weights_fingerprint(tiny_model_dir)
    model = LLMModel(_cfg(adapters={"other": str(other)}), str(tiny_model_dir))
    with pytest.raises(ServingError, match=r"^adapter other: base mismatch: trained on a base with fingerprint 0{12}"):
        model.load()


def test_an_adapter_as_the_model_with_adapters_is_refused(adapters: dict[str, Path]) -> None:
    model = LLMModel(_cfg(adapters={"beta": str(adapters["beta"])}), str(adapters["alpha"]))
    with pytest.raises(ServingError, match="is a LoRA adapter; with serve.adapters the model must be the base"):
        model.load()


def test_config_and_command_line_names_are_checked() -> None:
    with pytest.raises(ValueError, match="is the base model's name"):
        ServeConfig(adapters={"kubellm": "/x"})
    with pytest.raises(ValueError, match="more than max_adapters"):
        ServeConfig(adapters={"a": "/a", "b": "/b"}, max_adapters=1)
    assert parse_adapter_args(["a=/x", "b=models:/m@champion"]) == {"a": "/x", "b": "models:/m@champion"}
    with pytest.raises(ServingError, match="expected NAME=URI"):
        parse_adapter_args(["nameless"])


# --- over HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapters: dict[str, Path]) -> Iterator[tuple[str, LLMModel]]:
    """The base and two adapters over HTTP, the admin routes on (``gamma`` is loaded at run time)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_TOKEN_ENV, TOKEN)
    cfg = _cfg(adapters={n: str(adapters[n]) for n in ("alpha", "beta")}, model_repository_api=True, max_adapters=3)
    model = LLMModel(cfg, str(tiny_model_dir))
    model.load(observer=EngineMetrics("kubellm"))
    try:
        with BackgroundServer(build_app(model)) as bg:
            yield bg.url, model
    finally:
        mp.undo()


@pytest.mark.integration
def test_names_select_adapters_on_openai_and_kserve(
    server: tuple[str, LLMModel], tiny_model_dir: Path, adapters: dict[str, Path], alone: dict[str, list[str]]
) -> None:
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards["kubellm"]["parent"] is None and cards["kubellm"]["root"] == str(tiny_model_dir)
    assert cards["alpha"]["parent"] == "kubellm" and cards["alpha"]["root"] == str(adapters["alpha"])
    assert set(cards) == {"kubellm", "alpha", "beta"}
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == alone["alpha"][0] and out.model == "alpha"
    v1 = httpx.post(
        f"{url}/v1/models/beta:predict", json={"instances": PROMPTS[:2], "parameters": {"max_tokens": 12}}, timeout=60
    )
    assert v1.status_code == 200 and v1.json()["predictions"] == alone["beta"][:2]
    v2 = httpx.post(
        f"{url}/v2/models/alpha/infer",
        timeout=60,
        json={
            "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPTS[2]]}],
            "parameters": {"max_tokens": 12},
        },
    )
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [alone["alpha"][2]]
    assert v2.json()["model_name"] == "alpha"
    with pytest.raises(openai.NotFoundError, match="alpha, beta"):
        client.completions.create(model="delta", prompt="The cat", max_tokens=2)


@pytest.mark.integration
def test_logprobs_and_echo_follow_the_adapter(server: tuple[str, LLMModel], adapters: dict[str, Path]) -> None:
    """What lm-eval's ``local-completions`` sends: an adapter's prompt log-probabilities are its own."""
    url, _ = server
    body = {"prompt": PROMPTS[2], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    shared = {
        name: httpx.post(f"{url}/openai/v1/completions", json={**body, "model": name}, timeout=60).json()
        for name in ("kubellm", "alpha")
    }
    single = LLMModel(_cfg(), str(adapters["alpha"]))
    single.load()
    with BackgroundServer(build_app(single)) as bg:
        ref = httpx.post(f"{bg.url}/openai/v1/completions", json={**body, "model": "kubellm"}, timeout=60).json()
    got = shared["alpha"]["choices"][0]["logprobs"]["token_logprobs"]
    want = ref["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and want[0] is None and len(got) == len(want)
    assert got[1:] == pytest.approx(want[1:], abs=1e-4)
    assert shared["kubellm"]["choices"][0]["logprobs"]["token_logprobs"][1:] != pytest.approx(want[1:], abs=1e-4)


@pytest.mark.integration
def test_load_and_unload_at_run_time(
    server: tuple[str, LLMModel],
    adapters: dict[str, Path],
    alone: dict[str, list[str]],
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    url, model = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    load = {"lora_name": "gamma", "lora_path": str(adapters["gamma"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=30).status_code == 401
    resp = httpx.post(f"{url}/v1/load_lora_adapter", json=load, headers=admin, timeout=30)
    assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'gamma' added successfully."
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=load, headers=admin, timeout=30)
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]
    answer = httpx.post(
        f"{url}/openai/v1/completions",
        timeout=60,
        json={"model": "gamma", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0},
    )
    assert answer.json()["choices"][0]["text"] == alone["gamma"][1]
    assert httpx.post(f"{url}/v1/models/gamma:predict", json={"instances": ["The cat"]}, timeout=60).status_code == 200

    # Refused in one line: beyond max_adapters, a rank beyond max_lora_rank, another base.
    big = make_adapter(tiny_model_dir, tmp_path / "big", 128, ["q_proj"], 5)
    full = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)}, headers=admin, timeout=30
    )
    assert full.status_code == 400 and "3 adapters are loaded, this server's limit" in full.json()["error"]
    resp = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=admin, timeout=30)
    assert resp.status_code == 200 and "removed successfully" in resp.text
    rank = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)}, headers=admin, timeout=30
    )
    assert rank.status_code == 400
    assert rank.json()["error"] == "adapter big: rank 128 is above this server's max_lora_rank 64 (serve.max_lora_rank)"

    gone = httpx.post(
        f"{url}/openai/v1/completions", json={"model": "gamma", "prompt": "The cat", "max_tokens": 2}, timeout=30
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/v1/models/gamma:predict", json={"instances": ["The cat"]}, timeout=30).status_code == 404
    missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=admin, timeout=30)
    assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]
    assert sorted(model.views) == ["alpha", "beta"] and "gamma" not in model.engine.model.peft_config
    # The others still answer as before.
    answer = httpx.post(
        f"{url}/openai/v1/completions",
        timeout=60,
        json={"model": "beta", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
    )
    assert answer.json()["choices"][0]["text"] == alone["beta"][0]


@pytest.mark.integration
def test_lora_routes_are_off_without_the_admin_switch(tiny_model_dir: Path) -> None:
    model = LLMModel(_cfg(), str(tiny_model_dir))
    model.load()
    with BackgroundServer(build_app(model)) as bg:
        resp = httpx.post(f"{bg.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}, timeout=30)
    assert resp.status_code == 404 and "serve.model_repository_api" in resp.json()["error"]


@pytest.mark.integration
def test_vllm_metric_names_per_adapter(server: tuple[str, LLMModel]) -> None:
    url, _ = server
    for name in ("alpha", "kubellm"):
        httpx.post(
            f"{url}/openai/v1/completions",
            json={"model": name, "prompt": "The cat", "max_tokens": 3, "min_tokens": 3},
            timeout=60,
        ).raise_for_status()
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        for name in ("kubellm", "alpha", "beta"):
            assert f'{metric}{{model_name="{name}"}} 0.0' in text, (metric, name)
    for name in ("alpha", "kubellm"):
        assert f'vllm:e2e_request_latency_seconds_count{{model_name="{name}"}}' in text
        assert f'vllm:time_to_first_token_seconds_count{{model_name="{name}"}}' in text
        assert _value(text, f'vllm:generation_tokens_total{{model_name="{name}"}}') >= 3
        assert _value(text, f'vllm:prompt_tokens_total{{model_name="{name}"}}') >= 2


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


@pytest.mark.integration
@pytest.mark.slow
def test_kubellm_serve_with_adapter_options(
    start_serve, tiny_model_dir: Path, adapters: dict[str, Path], alone: dict[str, list[str]], tmp_path: Path
) -> None:
    """``kubellm serve --adapter NAME=URI`` (twice) beside ``serve.adapters`` in the config."""
    sets = (f"serve.adapters={{gamma: {adapters['gamma']}}}",)
    with start_serve(
        tiny_model_dir,
        tmp_path,
        *sets,
        extra_args=("--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}"),
    ) as (url, _):
        cards = httpx.get(f"{url}/openai/v1/models", timeout=10).json()["data"]
        assert sorted(c["id"] for c in cards) == ["alpha", "beta", "gamma", "kubellm"]
        for name in ("alpha", "gamma"):
            got = httpx.post(
                f"{url}/openai/v1/completions",
                timeout=60,
                json={"model": name, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
            ).json()
            assert got["choices"][0]["text"] == alone[name][0]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)  # lm-eval's imports and two scored runs on the shared CPUs
def test_lm_eval_scores_an_adapter_by_name_as_alone(
    server: tuple[str, LLMModel], adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """lm-evaluation-harness's ``local-completions`` (log-likelihoods of choices: ``echo`` + ``logprobs``)
    scores adapter ``alpha`` by name on the shared base exactly as on a predictor serving it alone."""
    from transformers import AutoTokenizer

    from kubellm.config.evaluate import BenchmarkConfig
    from kubellm.evaluate.benchmarks import plan_benchmarks, run_benchmarks_served

    url, _ = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentences = [
        "The cat sits on the mat.",
        "The bird sings in the tree.",
        "The fox jumps over the dog.",
        "Who jumps over the dog?",
        "Where is the bird?",
        "What does the cat do?",
    ]
    heldout = [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": s}], "reference": s}
        for i, s in enumerate(sentences)
    ]
    plan = plan_benchmarks(
        [BenchmarkConfig(task="kubellm_choice", limit=6)],
        heldout=heldout,
        tokenizer=tokenizer,
        stop_ids=[tokenizer.eos_token_id],
        max_new_tokens=8,
        seed=0,
        work_dir=tmp_path,
        data_dir=tmp_path,
    )
    shared = run_benchmarks_served(
        plan, base_url=url, model_name="alpha", tokenizer_dir=tiny_model_dir, batch_size=4, max_length=256
    )
    base = run_benchmarks_served(
        plan, base_url=url, model_name="kubellm", tokenizer_dir=tiny_model_dir, batch_size=4, max_length=256
    )
    single = LLMModel(_cfg(), str(adapters["alpha"]))
    single.load()
    with BackgroundServer(build_app(single)) as bg:
        alone = run_benchmarks_served(
            plan, base_url=bg.url, model_name="kubellm", tokenizer_dir=tiny_model_dir, batch_size=4, max_length=256
        )
    assert shared["scores"] and shared["scores"] == pytest.approx(alone["scores"], abs=1e-9)
    assert base["scores"] != shared["scores"]  # the name selected the adapter, not the base


def test_gathered_lora_computes_what_peft_computes(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    """One gathered product per layer (:func:`kubellm.serve.adapters.gather_lora`) gives peft's own
    mixed-batch logits, for rows of every adapter and of the base, ranks 2, 4 and 8 in one batch."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubellm.serve.adapters import gather_lora

    model = None
    for name, path in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(path), adapter_name=name
            )
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (5, 7), generator=torch.Generator().manual_seed(0))
    names = ["alpha", "__base__", "gamma", "beta", "alpha"]
    with torch.inference_mode():
        peft_logits = model(input_ids=ids, adapter_names=names).logits
        assert gather_lora(model, list(adapters)) == 2 * 6  # q, k, v, o, gate, down of 2 layers carry LoRA
        ours = model(input_ids=ids, adapter_names=names).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.allclose(ours, peft_logits, atol=1e-5)
    assert torch.allclose(ours[1], base[1], atol=1e-5)  # the base row is the base model's
    for row in (0, 2, 3, 4):  # and every adapter row is not
        assert not torch.allclose(ours[row], base[row], atol=1e-2), row
