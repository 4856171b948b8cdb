"""The prompt playground: a Gradio app for prompt engineering against OpenAI-compatible endpoints.

One prompt goes to model A and, when a second endpoint is set, to model B (say the base model and the
fine-tuned one) at the same time; both answers stream side by side, each model keeping its own
conversation history. System prompt, temperature, top_p, max tokens and seed apply to both. An endpoint
that is down, slow or answers an error shows a one-line message in its answer bubble and the status
line; the other side carries on.

The Gradio Blocks are mounted on a FastAPI app (:func:`build_app`) so the same app runs under uvicorn for
``kubellm playground`` (127.0.0.1 unless ``playground.host`` says otherwise) and in a thread for tests.
A bare ``http://host:port`` endpoint gets KServe's ``/openai/v1`` prefix; the local default is the
predictor that ``kubellm serve`` starts.

The page's host makes the requests, so a page whose endpoints anyone can type would make a pod inside
the cluster call any URL and show the answer (a server-side request forger). With
``playground.editable_endpoints: false`` (always on a cluster) the endpoints are those the operator
configured, checked on the server for every send, whatever a client posts. A login (Gradio's own) is
read from ``KUBELLM_PLAYGROUND_USERNAME``/``PASSWORD``, which the pod takes from a Kubernetes Secret.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kubellm.errors import ServingError
from kubellm.log import get_logger

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kubellm.config.run import RunConfig
    from kubellm.config.serve import PlaygroundConfig

log = get_logger("kubellm.serve.playground")

#: Marks an answer bubble that holds an error, not model text (left out of the history sent later).
ERROR_MARK = "⚠️ "
#: The login the page asks for (the cluster's pod sets both from ``playground.auth_secret``).
USERNAME_ENV = "KUBELLM_PLAYGROUND_USERNAME"
PASSWORD_ENV = "KUBELLM_PLAYGROUND_PASSWORD"


def auth_from_env() -> tuple[str, str] | None:
    """``(username, password)`` from the environment, None when neither is set."""
    import os

    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if not user and not password:
        return None
    if not user or not password:
        present, missing = (USERNAME_ENV, PASSWORD_ENV) if user else (PASSWORD_ENV, USERNAME_ENV)
        raise ServingError(f"{present} is set but {missing} is not: the playground's login needs both")
    return user, password


def normalize_endpoint(url: str) -> str:
    """``http://host:port`` → ``http://host:port/openai/v1`` (KServe's OpenAI prefix); others as given."""
    url = url.strip().rstrip("/")
    if "://" not in url:  # urlsplit reads "host:80" as scheme "host"
        url = f"http://{url}"
    return url if urlsplit(url).path else f"{url}/openai/v1"


def default_endpoint(run_cfg: RunConfig) -> str:
    """``playground.endpoint``, else the local predictor of ``kubellm serve``."""
    return run_cfg.playground.endpoint or f"http://127.0.0.1:{run_cfg.serve.port}/openai/v1"


@dataclass
class Settings:
    """What one send uses: the generation parameters shared by both sides."""

    system_prompt: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


@dataclass
class Side:
    """One model column: where it is and what it said so far."""

    endpoint: str
    model: str | None
    history: list[dict[str, str]] = field(default_factory=list)


def chat_stream(side: Side, prompt: str, settings: Settings, timeout_s: float) -> Iterator[str]:
    """Text deltas of ``side``'s answer to ``prompt`` after its history; raises :class:`EndpointError`."""
    import openai

    base_url = normalize_endpoint(side.endpoint)
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=timeout_s, max_retries=0)
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt.strip() else []
    messages += _clean_history(side.history) + [{"role": "user", "content": prompt}]
    try:
        model = side.model or client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            stream=True,
            **({"seed": settings.seed} if settings.seed is not None else {}),
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    except openai.APITimeoutError:
        raise EndpointError(f"{base_url} did not answer within {timeout_s:g} s") from None
    except openai.APIConnectionError as err:
        cause = err.__cause__ or err
        raise EndpointError(
            f"{base_url} is unreachable ({' '.join(str(cause).split()) or type(cause).__name__})"
        ) from None
    except openai.APIStatusError as err:
        raise EndpointError(f"{base_url} answered HTTP {err.status_code}: {_api_message(err)}") from None
    except IndexError:
        raise EndpointError(f"{base_url} lists no models; set the model name") from None


class EndpointError(Exception):
    """An endpoint that cannot answer; ``str()`` is the one line shown in the UI."""


def respond(prompt: str, settings: Settings, sides: list[Side], timeout_s: float) -> Iterator[list[list[dict]]]:
    """Send ``prompt`` to every side at once; yields every side's history as answers stream in.

    Each side's history gets the user message and a growing assistant message; an endpoint failure turns
    that side's assistant message into ``ERROR_MARK`` + the reason.
    """
    events: queue.Queue[tuple[int, str, str]] = queue.Queue()
    before = [Side(s.endpoint, s.model, list(s.history)) for s in sides]
    for side in sides:
        side.history = [*side.history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]

    def work(index: int, side: Side) -> None:
        try:
            for delta in chat_stream(side, prompt, settings, timeout_s):
                events.put((index, "delta", delta))
            events.put((index, "done", ""))
        except EndpointError as err:
            events.put((index, "error", str(err)))
        except Exception as err:  # anything else is still one line in the UI, never a traceback
            log.exception("playground request to %s failed", side.endpoint)
            events.put((index, "error", f"{type(err).__name__}: {err}"))

    for i, side in enumerate(before):
        threading.Thread(target=work, args=(i, side), daemon=True, name=f"playground-{i}").start()
    yield [s.history for s in sides]
    open_sides = len(sides)
    while open_sides:
        index, kind, text = events.get()
        answer = sides[index].history[-1]
        if kind == "delta":
            answer["content"] += text
        else:
            open_sides -= 1
            if kind == "error":
                answer["content"] = ERROR_MARK + text
        yield [s.history for s in sides]


def _endpoint_box(gr: Any, value: str, label: str, elem_id: str, allowed: list[str] | None) -> Any:
    """A free text box, or for a locked page a choice among ``allowed`` (fixed when there is one)."""
    if allowed is None:
        return gr.Textbox(value, label=label, elem_id=elem_id)
    # Custom values pass Gradio untouched so that the send handler's own check answers them in one line.
    return gr.Dropdown(
        allowed,
        value=value,
        label=label,
        elem_id=elem_id,
        allow_custom_value=True,
        interactive=len([a for a in allowed if a]) > 1,
    )


def _refused(url: str, allowed: list[str] | None) -> bool:
    if allowed is None or not url:
        return False
    return normalize_endpoint(url) not in {normalize_endpoint(a) for a in allowed if a}


def build_blocks(
    cfg: PlaygroundConfig, endpoint: str, compare_endpoint: str | None = None, compare_model: str | None = None
) -> Any:
    """The Gradio Blocks of the playground."""
    import gradio as gr

    extra = list(cfg.allowed_endpoints)
    locked_a = None if cfg.editable_endpoints else list(dict.fromkeys([endpoint, *extra]))
    locked_b = (
        None
        if cfg.editable_endpoints
        else list(dict.fromkeys(["", *([compare_endpoint] if compare_endpoint else []), *extra]))
    )

    with gr.Blocks(title="kubellm playground", analytics_enabled=False) as blocks:
        gr.Markdown(
            "## kubellm playground\nOne prompt, two models side by side. Each answer streams from its "
            "OpenAI-compatible endpoint; each side keeps its own conversation."
        )
        with gr.Row():
            with gr.Column():
                endpoint_a = _endpoint_box(gr, endpoint, "Model A endpoint", "endpoint-a", locked_a)
                model_a = gr.Textbox(
                    cfg.model or "", label="Model A name (empty: the endpoint's first model)", elem_id="model-a"
                )
            with gr.Column():
                endpoint_b = _endpoint_box(
                    gr, compare_endpoint or "", "Model B endpoint (empty: A only)", "endpoint-b", locked_b
                )
                model_b = gr.Textbox(compare_model or "", label="Model B name", elem_id="model-b")
        with gr.Accordion("System prompt and generation", open=True):
            system = gr.Textbox(cfg.system_prompt, label="System prompt", lines=2, elem_id="system-prompt")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=cfg.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=cfg.top_p, step=0.05, label="Top p")
                max_tokens = gr.Number(cfg.max_tokens, precision=0, minimum=1, label="Max tokens")
                # A textbox, not gr.Number: an empty Number shows and sends 0, which is a seed.
                seed = gr.Textbox(
                    "" if cfg.seed is None else str(cfg.seed), label="Seed (empty: random)", elem_id="seed"
                )
        with gr.Row():
            chat_a = gr.Chatbot(label="Model A", elem_id="answer-a", height=420)
            chat_b = gr.Chatbot(label="Model B", elem_id="answer-b", height=420)
        with gr.Row():
            prompt = gr.Textbox(
                placeholder="Type a prompt and press Enter", show_label=False, scale=8, elem_id="prompt"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        status = gr.Markdown("", elem_id="status")

        def on_send(text, sys_prompt, temp, tp, max_tok, seed_value, ep_a, name_a, ep_b, name_b, hist_a, hist_b):
            if not text.strip():
                yield hist_a, hist_b, "Type a prompt first.", text
                return
            ep_a, ep_b = str(ep_a or "").strip(), str(ep_b or "").strip()
            if not ep_a:
                yield hist_a, hist_b, f"{ERROR_MARK}Model A needs an endpoint URL.", text
                return
            for label, url, allowed in (("A", ep_a, locked_a), ("B", ep_b, locked_b)):
                if _refused(url, allowed):
                    log.warning("playground: refused a send to %s (not a configured endpoint)", url)
                    yield (
                        hist_a,
                        hist_b,
                        f"{ERROR_MARK}Model {label} endpoint {url} is not one this playground may call",
                        text,
                    )
                    return
            seed_text = str(seed_value or "").strip()
            if seed_text and not seed_text.lstrip("-").isdigit():
                yield hist_a, hist_b, f"{ERROR_MARK}Seed must be a whole number or empty, not {seed_text!r}.", text
                return
            settings = Settings(
                sys_prompt, float(temp), float(tp), max(1, int(max_tok or 1)), int(seed_text) if seed_text else None
            )
            sides = [Side(ep_a, name_a.strip() or None, _history(hist_a))]
            if ep_b:
                sides.append(Side(ep_b, name_b.strip() or None, _history(hist_b)))
            for histories in respond(text, settings, sides, cfg.request_timeout_s):
                yield histories[0], histories[1] if len(histories) > 1 else hist_b, "", ""
            failed = [
                f"{label}: {h[-1]['content'][len(ERROR_MARK) :]}"
                for label, h in zip("AB", histories, strict=False)
                if h[-1]["content"].startswith(ERROR_MARK)
            ]
            yield (
                histories[0],
                histories[1] if len(histories) > 1 else hist_b,
                (ERROR_MARK + " · ".join(failed)) if failed else "",
                "",
            )

        inputs = [
            prompt,
            system,
            temperature,
            top_p,
            max_tokens,
            seed,
            endpoint_a,
            model_a,
            endpoint_b,
            model_b,
            chat_a,
            chat_b,
        ]
        outputs = [chat_a, chat_b, status, prompt]
        prompt.submit(on_send, inputs, outputs)
        send.click(on_send, inputs, outputs)
        clear.click(lambda: ([], [], ""), None, [chat_a, chat_b, status])
    return blocks


def build_app(
    run_cfg: RunConfig,
    *,
    endpoint: str | None = None,
    compare_endpoint: str | None = None,
    port: int | None = None,
    auth: tuple[str, str] | None = None,
) -> FastAPI:
    """A FastAPI app with the playground mounted at ``/`` (``port``: where it will listen, for Gradio's
    links; ``auth``: the login every page and API call needs)."""
    import gradio as gr
    from fastapi import FastAPI

    cfg = run_cfg.playground
    blocks = build_blocks(
        cfg, endpoint or default_endpoint(run_cfg), compare_endpoint or cfg.compare_endpoint, cfg.compare_model
    )
    return gr.mount_gradio_app(
        FastAPI(title="kubellm playground"),
        blocks,
        path="",
        server_name=cfg.host,
        server_port=port or cfg.port,
        ssr_mode=False,
        auth=auth,
        auth_message="kubellm playground" if auth else None,
    )


def launch(
    run_cfg: RunConfig, *, endpoint: str | None = None, compare_endpoint: str | None = None, port: int | None = None
) -> None:
    """``kubellm playground``: serve the playground until SIGINT/SIGTERM."""
    import os

    import uvicorn

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a laptop or a pod
    cfg = run_cfg.playground
    host, port = cfg.host, port or cfg.port
    auth = auth_from_env()
    app = build_app(run_cfg, endpoint=endpoint, compare_endpoint=compare_endpoint, port=port, auth=auth)
    log.info(
        "playground on http://%s:%d (model A: %s%s; endpoints %s; %s)",
        host,
        port,
        endpoint or default_endpoint(run_cfg),
        f", model B: {compare_endpoint or cfg.compare_endpoint}" if (compare_endpoint or cfg.compare_endpoint) else "",
        "editable" if cfg.editable_endpoints else "locked",
        "login required" if auth else "no login",
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _history(value: list[dict] | None) -> list[dict[str, str]]:
    """Gradio's chat messages (content as text parts) as plain ``{"role", "content"}`` dicts."""
    out = []
    for message in value or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": message.get("role", "user"), "content": str(content or "")})
    return out


def _clean_history(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The history minus turns whose answer was an error (the model never saw them)."""
    out: list[dict[str, str]] = []
    for message in history:
        if message["role"] == "assistant" and message["content"].startswith(ERROR_MARK):
            if out and out[-1]["role"] == "user":
                out.pop()
            continue
        out.append(message)
    return out


def _api_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return " ".join(str(message).split())
    return " ".join(str(err).split())
