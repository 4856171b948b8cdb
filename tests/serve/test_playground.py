"""The prompt playground against the real predictor: side by side, history, endpoints that are down,
and the page itself in Debian's headless Chromium."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubellm.config import load_config
from kubellm.serve import playground as pg
from kubellm.serve.app import BackgroundServer, build_app, load_model

pytestmark = pytest.mark.integration

SYSTEM = "You are a helpful assistant."
SETTINGS = pg.Settings(SYSTEM, temperature=0.0, top_p=1.0, max_tokens=8)


@pytest.fixture(scope="module")
def predictor_url(tiny_model_dir: Path) -> Iterator[str]:
    cfg = load_config(None, ["serve.precision=fp32", "serve.max_new_tokens=32", "serve.default_max_tokens=8"])
    with BackgroundServer(build_app(load_model(cfg, str(tiny_model_dir)))) as server:
        yield server.url


@pytest.fixture(scope="module")
def down_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _direct(url: str, messages: list[dict]) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.chat.completions.create(model="kubellm", messages=messages, max_tokens=8, temperature=0)
    return answer.choices[0].message.content


def test_endpoints_get_kserves_openai_prefix() -> None:
    assert pg.normalize_endpoint("http://h:8080/") == "http://h:8080/openai/v1"
    assert pg.normalize_endpoint("h.svc:80") == "http://h.svc:80/openai/v1"
    assert pg.normalize_endpoint("https://api.example.com/v1") == "https://api.example.com/v1"
    cfg = load_config(None, ["serve.port=9001"])
    assert pg.default_endpoint(cfg) == "http://127.0.0.1:9001/openai/v1"


def test_side_by_side_with_history_and_a_down_endpoint(predictor_url: str, down_url: str) -> None:
    a = pg.Side(predictor_url, None)  # the model name is discovered from /openai/v1/models
    b = pg.Side(down_url, "kubellm")
    *_, last = pg.respond("Who jumps over the dog?", SETTINGS, [a, b], timeout_s=10)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who jumps over the dog?"}]
    assert last[0][-1] == {"role": "assistant", "content": _direct(predictor_url, first)}
    assert last[1][-1]["content"].startswith(pg.ERROR_MARK) and "is unreachable" in last[1][-1]["content"]
    assert "Traceback" not in last[1][-1]["content"]

    # The second turn carries A's conversation so far; B's failed turn is not sent again.
    *_, last = pg.respond("Where is the bird?", SETTINGS, [a, b], timeout_s=10)
    second = [*first, {"role": "assistant", "content": a.history[1]["content"]},
              {"role": "user", "content": "Where is the bird?"}]
    assert last[0][-1]["content"] == _direct(predictor_url, second)
    assert len(a.history) == len(b.history) == 4
    assert pg._clean_history(b.history) == []


def test_an_endpoint_error_is_one_line(predictor_url: str) -> None:
    *_, last = pg.respond("hi", SETTINGS, [pg.Side(predictor_url, "no-such-model")], timeout_s=10)
    message = last[0][-1]["content"]
    assert message.startswith(pg.ERROR_MARK + predictor_url + "/openai/v1 answered HTTP 404")
    assert "'no-such-model' does not exist" in message and "\n" not in message


def _chrome(tmp: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp}",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    # An explicit driver path and browser binary: Selenium Manager has nothing to look up or download.
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_shows_the_predictors_answer(predictor_url: str, down_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (bash .ci/system-deps.sh)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    cfg = load_config(None, ["playground.temperature=0", "playground.max_tokens=8",
                             f"playground.system_prompt={SYSTEM}"])
    prompt = "Where is the bird?"
    want = _direct(predictor_url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
    assert want.strip(), "the model's greedy answer is empty: nothing to look for on the page"

    def shown(driver, elem_id: str) -> str:
        return " ".join(driver.find_element(By.ID, elem_id).text.split())

    app = pg.build_app(cfg, endpoint=predictor_url, compare_endpoint=down_url)
    with BackgroundServer(app) as page, tempfile.TemporaryDirectory() as profile:
        driver = _chrome(profile)
        try:
            driver.get(page.url)
            box = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
            box.send_keys(prompt)
            box.send_keys(Keys.ENTER)
            WebDriverWait(driver, 30).until(lambda d: " ".join(want.split()) in shown(d, "answer-a"))
            WebDriverWait(driver, 30).until(lambda d: "is unreachable" in shown(d, "answer-b"))
            assert prompt in shown(driver, "answer-a")
            assert "is unreachable" in shown(driver, "status")
            assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
        finally:
            driver.quit()
