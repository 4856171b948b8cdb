"""The prompt playground against the real predictor: side by side, history, endpoints that are down,
a page whose endpoints are locked (it calls nothing else, whatever a client sends), a login from
the Kubernetes Secret's values, and the page itself in Debian's headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from kubellm.config import load_config
from kubellm.errors import ServingError
from kubellm.k8s.playground import build_playground
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


@pytest.fixture()
def canary() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that records every request it gets (what a forged request would hit)."""
    hits: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _send_via_api(url: str, endpoint_a: str, endpoint_b: str = "", auth: tuple[str, str] | None = None) -> tuple:
    """What any HTTP client can do without the page: call the send handler with endpoints of its choosing."""
    from gradio_client import Client

    client = Client(url, auth=auth, verbose=False, download_files=False)
    return client.predict(
        "Where is the bird?", SYSTEM, 0, 1, 8, "", endpoint_a, "", endpoint_b, "", [], [], api_name="/on_send"
    )


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
    second = [
        *first,
        {"role": "assistant", "content": a.history[1]["content"]},
        {"role": "user", "content": "Where is the bird?"},
    ]
    assert last[0][-1]["content"] == _direct(predictor_url, second)
    assert len(a.history) == len(b.history) == 4
    assert pg._clean_history(b.history) == []


def test_an_endpoint_error_is_one_line(predictor_url: str) -> None:
    *_, last = pg.respond("hi", SETTINGS, [pg.Side(predictor_url, "no-such-model")], timeout_s=10)
    message = last[0][-1]["content"]
    assert message.startswith(pg.ERROR_MARK + predictor_url + "/openai/v1 answered HTTP 404")
    assert "'no-such-model' does not exist" in message and "\n" not in message


def test_a_locked_page_calls_only_its_configured_endpoints(predictor_url: str, canary: tuple[str, list[str]]) -> None:
    canary_url, hits = canary
    cfg = load_config(None, ["playground.editable_endpoints=false", "playground.max_tokens=8"])
    with BackgroundServer(pg.build_app(cfg, endpoint=predictor_url)) as page:
        chat_a, _, status, _ = _send_via_api(page.url, canary_url)
        assert hits == []  # the pod forged no request
        assert status == f"{pg.ERROR_MARK}Model A endpoint {canary_url} is not one this playground may call"
        _, _, status, _ = _send_via_api(page.url, predictor_url, endpoint_b=canary_url + "/v1")
        assert hits == [] and "Model B endpoint" in status
        chat_a, _, status, _ = _send_via_api(page.url, predictor_url)  # the configured one answers
        assert status == "" and chat_a[-1]["role"] == "assistant" and chat_a[-1]["content"]


def test_an_editable_page_calls_what_it_is_given(predictor_url: str, canary: tuple[str, list[str]]) -> None:
    canary_url, hits = canary  # a laptop: editing endpoints is the point (and the page is on 127.0.0.1)
    with BackgroundServer(pg.build_app(load_config(None, []), endpoint=predictor_url)) as page:
        _send_via_api(page.url, canary_url)
    assert hits == ["GET /openai/v1/models"]


def test_login_from_the_secrets_environment(predictor_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg.USERNAME_ENV, "alice")
    monkeypatch.setenv(pg.PASSWORD_ENV, "pw-" + "9" * 12)
    app = pg.build_app(
        load_config(None, ["playground.editable_endpoints=false"]), endpoint=predictor_url, auth=pg.auth_from_env()
    )
    with BackgroundServer(app) as page:
        assert httpx.get(f"{page.url}/config", timeout=10).status_code == 401
        assert httpx.get(page.url + "/", timeout=10).status_code == 200  # the login page: the pod's probes pass
        with pytest.raises(ValueError, match="Could not login"):
            _send_via_api(page.url, predictor_url, auth=("alice", "wrong"))
        _, _, status, _ = _send_via_api(page.url, predictor_url, auth=("alice", "pw-" + "9" * 12))
        assert status == ""
    monkeypatch.delenv(pg.PASSWORD_ENV)
    with pytest.raises(ServingError, match=f"{pg.USERNAME_ENV} is set but {pg.PASSWORD_ENV} is not"):
        pg.auth_from_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_cluster_pod_is_locked_and_asks_for_the_secrets_login(
    predictor_url: str, canary: tuple[str, list[str]], tmp_path: Path
) -> None:
    """The playground Deployment's own command, args and env (the Secret's values filled in as the kubelet
    would), run on 127.0.0.1: a login is needed, and a forged endpoint is refused without a request."""
    canary_url, hits = canary
    password = "pw-" + "7" * 12
    deployment, _ = build_playground(load_config(None, ["playground.auth_secret=playground-login"]), predictor_url)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert password not in str(container["args"])  # the login reaches the pod as env from the Secret only
    port = _free_port()
    args = [str(port) if a == "7860" else a.replace('"0.0.0.0"', "127.0.0.1") for a in container["args"]]
    secret = {("playground-login", "username"): "bob", ("playground-login", "password"): password}
    env = dict(os.environ)
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = (
            secret[ref["name"], ref["key"]]
            if ref
            else item["value"].replace("/home/kubellm", str(tmp_path)).replace("/tmp", str(tmp_path))
        )
    kubellm = str(Path(sys.executable).with_name(container["command"][0]))
    log = (tmp_path / "pod.log").open("w")
    proc = subprocess.Popen([kubellm, *args], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "pod.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:  # what the pod's probes ask
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the playground did not start within 120 s"
            time.sleep(0.5)
        assert httpx.get(f"{url}/config", timeout=10).status_code == 401
        _, _, status, _ = _send_via_api(url, canary_url, auth=("bob", password))
        assert hits == [] and "is not one this playground may call" in status
        chat_a, _, status, _ = _send_via_api(url, predictor_url, auth=("bob", password))
        assert status == "" and chat_a[-1]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _chrome(tmp: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp}",
        "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    # An explicit driver path and browser binary: Selenium Manager has nothing to look up or download.
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_shows_the_predictors_answer(
    predictor_url: str, down_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (bash .ci/system-deps.sh)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    # As on a cluster: endpoints locked, a login (the Secret's values) before the page shows.
    cfg = load_config(
        None,
        [
            "playground.temperature=0",
            "playground.max_tokens=8",
            "playground.editable_endpoints=false",
            f"playground.system_prompt={SYSTEM}",
        ],
    )
    login = ("carol", "pw-" + "5" * 12)
    prompt = "Where is the bird?"
    want = _direct(predictor_url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
    assert want.strip(), "the model's greedy answer is empty: nothing to look for on the page"

    def shown(driver, elem_id: str) -> str:
        return " ".join(driver.find_element(By.ID, elem_id).text.split())

    app = pg.build_app(cfg, endpoint=predictor_url, compare_endpoint=down_url, auth=login)
    with BackgroundServer(app) as page, tempfile.TemporaryDirectory() as profile:
        driver = _chrome(profile)
        try:
            driver.get(page.url)
            password = WebDriverWait(driver, 30).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "input[type=password]")
            )
            driver.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys(login[0])
            password.send_keys(login[1])
            password.send_keys(Keys.ENTER)
            box = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
            box.send_keys(prompt)
            box.send_keys(Keys.ENTER)
            WebDriverWait(driver, 30).until(lambda d: " ".join(want.split()) in shown(d, "answer-a"))
            WebDriverWait(driver, 30).until(lambda d: "is unreachable" in shown(d, "answer-b"))
            assert prompt in shown(driver, "answer-a")
            assert "is unreachable" in shown(driver, "status")
            assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
            # the endpoints are shown, not editable: a single configured choice each
            for elem_id in ("endpoint-a", "endpoint-b"):
                field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
                assert not field.is_enabled() or field.get_attribute("readonly") is not None, elem_id
        finally:
            driver.quit()
