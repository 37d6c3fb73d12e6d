"""The browser chat page, in a real browser: Debian's chromium, headless, driven by
Playwright's Python package (never Playwright's own browser download).

A missing chromium fails these tests (``make setup`` installs it); it never skips them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.contract import session_key
from tests.conftest import synthetic_generator_env, synthetic_reply
from tests.support.processes import REPO, ApiServer
from tests.support.tcp_proxy import TcpProxy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO / "docs" / "screenshots" / "chat.png"

#: Counts the separate DOM updates of the last reply bubble, to prove it grew piece by piece.
WATCH_REPLY = """() => {
  window.replyUpdates = [];
  new MutationObserver(() => window.replyUpdates.push(performance.now()))
    .observe(document.getElementById("messages"), {subtree: true, characterData: true, childList: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the web page is tested in Debian's chromium. "
            "Run `make setup` (scripts/install_chromium.sh: apt-get install chromium).",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 640})
    page = context.new_page()
    yield page
    context.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def last_reply(page) -> str:
    return page.locator(".msg.assistant .text").last.inner_text()


def wait_done(page, timeout_ms: int = 60_000) -> None:
    page.wait_for_selector("#status:text-matches('^Done')", timeout=timeout_ms)


def tokens_relayed(api: ApiServer) -> float:
    """The pod's ``chatstream_tokens_relayed_total``: tells which pod relays a stream."""
    metrics = httpx.get(api.base_url + "/metrics", timeout=5).text
    return float(re.search(r"^chatstream_tokens_relayed_total (\S+)$", metrics, re.MULTILINE).group(1))


def test_page_streams_a_reply_then_regenerates_and_clears(stack, default_model, page, tmp_path):
    stack.generator({"MODEL_ID": str(default_model), "TEMPERATURE": "0", "MAX_NEW_TOKENS": "48"})
    api = stack.api()
    response = page.goto(api.base_url + "/")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page.evaluate(WATCH_REPLY)

    send(page, "In one sentence, what is Paris famous for?")
    page.wait_for_selector(".msg.assistant.streaming")
    wait_done(page)
    reply = last_reply(page)
    assert len(reply.split()) >= 5, reply
    updates = page.evaluate("window.replyUpdates")
    assert len(updates) >= 3 and updates[-1] - updates[0] > 50, "the reply must appear piece by piece"
    assert page.locator(".msg.user").inner_text() == "In one sentence, what is Paris famous for?"
    assert any(c["name"] == "sid" and c["httpOnly"] for c in page.context.cookies())

    page.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("UPDATE_SCREENSHOT"):
        # The README's picture (docs/screenshots/chat.png); refreshed on request so a test run leaves the tree clean.
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "chat.png", SCREENSHOT)

    # Regenerate: same history, greedy decoding, so the same reply, in the same bubble.
    assert page.is_enabled("#regenerate")
    page.click("#regenerate")
    page.wait_for_selector("#status:text-matches('^(Sending|Generating)')")
    wait_done(page)
    assert last_reply(page) == reply
    assert page.locator(".msg").count() == 2
    sessions = stack.redis.keys("chatstream:session:*")
    assert len(sessions) == 1 and stack.redis.llen(sessions[0]) == 1, "regenerate replaced the turn"

    page.click("#clear")
    page.wait_for_selector("#status:has-text('Conversation cleared.')")
    assert page.locator(".msg").count() == 0
    assert stack.redis.llen(sessions[0]) == 0
    assert page.is_disabled("#regenerate")


def test_page_shows_the_queue_position_while_waiting(stack, page):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="40"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1"})
    page.goto(api.base_url + "/")
    started = threading.Event()

    def keep_busy() -> None:
        with httpx.stream("POST", api.base_url + "/chat_stream", json={"user_input": "busy"}, timeout=30) as r:
            for _ in r.iter_raw():
                started.set()

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        assert started.wait(10), "the busy request did not start"
        send(page, "hello queue")
        page.wait_for_selector("#status:has-text('Waiting in queue: position 1')", timeout=5_000)
        wait_done(page, timeout_ms=15_000)
        assert last_reply(page).startswith("hello queue hello queue")
    finally:
        busy.join(30)


def test_page_stop_stops_the_generation_at_once_not_after_the_grace(stack, page):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400"))
    api = stack.api()  # RESUME_GRACE_SECONDS: 10
    page.goto(api.base_url + "/")
    send(page, "stop me")
    deadline = time.monotonic() + 10
    while len(last_reply(page)) < 10:  # a few tokens shown
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.05)
    stopped_at = time.monotonic()
    page.click("#stop")
    page.wait_for_selector("#status:has-text('Stopped.')", timeout=5_000)
    deadline = time.monotonic() + 3
    while "stopping: cancelled" not in generator.log():
        assert time.monotonic() < deadline, "the generation went on after Stop"
        time.sleep(0.05)
    assert time.monotonic() - stopped_at < 3


def test_page_shows_errors_clearly(stack, page):
    stack.generator(synthetic_generator_env(tokens_per_second=50, SYNTHETIC_FAIL_AFTER_TOKENS="2"))
    api = stack.api()
    page.goto(api.base_url + "/")
    send(page, "this will fail")
    error = page.wait_for_selector(".msg.assistant .error", timeout=10_000)
    assert "generation_failed" in error.inner_text()
    assert last_reply(page) == "this will", "the text that arrived stays"
    assert page.locator("#status.error").inner_text() == "The reply failed"
    assert page.is_disabled("#regenerate"), "nothing was recorded, so nothing to regenerate"
    assert page.is_enabled("#send")


def test_page_asks_for_the_api_key_and_sends_it(stack, page):
    stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="4"))
    api = stack.api({"API_KEYS": "sk-page-key-4c1d9e"})
    assert page.goto(api.base_url + "/").status == 200, "the page itself needs no key"
    send(page, "knock knock")
    page.wait_for_selector("#key-panel:not([hidden])", timeout=5_000)
    page.fill("#api-key", "sk-wrong")
    page.click("#save-key")
    page.wait_for_selector("#key-panel:not([hidden])", timeout=5_000)
    page.fill("#api-key", "sk-page-key-4c1d9e")
    page.click("#save-key")
    wait_done(page, timeout_ms=10_000)
    assert last_reply(page) == "knock knock knock knock"
    page.click("#clear")
    page.wait_for_selector("#status:has-text('Conversation cleared.')")


def test_page_settings_panel_saves_shows_refusals_and_resets(stack, page):
    stack.generator(
        synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="6", MAX_NEW_TOKENS_LIMIT="16", TEMPERATURE="0.3")
    )
    api = stack.api({"API_KEYS": "sk-settings-77aa"})
    page.goto(api.base_url + "/")
    page.click("#settings-toggle")
    page.wait_for_selector("#key-panel:not([hidden])", timeout=5_000)  # the settings need the key too
    page.fill("#api-key", "sk-settings-77aa")
    page.click("#save-key")
    # Prefilled from GET /generation_params: nothing set, the generator's defaults shown.
    page.wait_for_selector("#set-temperature[placeholder='default 0.3']", timeout=5_000)
    assert page.get_attribute("#set-max_new_tokens", "placeholder") == "default 6"
    assert page.input_value("#set-max_new_tokens") == ""
    page.wait_for_selector("#load[data-state='idle']", timeout=5_000)  # the load badge got the key as well

    page.fill("#set-max_new_tokens", "3")
    page.fill("#set-temperature", "0.5")
    page.click("#save-settings")
    page.wait_for_selector("#settings-status:text-is('Saved.')", timeout=5_000)
    send(page, "knock")
    page.wait_for_selector("#status:text-matches('^Done: 3 tokens')", timeout=10_000)
    assert last_reply(page) == "knock knock knock"

    page.fill("#set-max_new_tokens", "99")
    page.click("#save-settings")
    page.wait_for_selector("#settings-status.error", timeout=5_000)
    assert page.inner_text("#settings-status") == (
        "max_new_tokens: must be between 1 and 16 (the live generators' MAX_NEW_TOKENS_LIMIT) (HTTP 422)"
    )
    assert page.get_attribute("#set-max_new_tokens", "aria-invalid") == "true"
    (key,) = stack.redis.keys("chatstream:session:*:params")
    assert stack.redis.hget(key, "max_new_tokens") == b"3", "a refused value changes nothing"

    page.click("#reset-settings")
    page.wait_for_selector("#settings-status:text-is('Reset to the defaults.')", timeout=5_000)
    assert page.input_value("#set-max_new_tokens") == "" and page.input_value("#set-temperature") == ""
    assert page.get_attribute("#set-max_new_tokens", "aria-invalid") is None
    assert stack.redis.keys("chatstream:session:*:params") == []
    send(page, "knock")
    page.wait_for_selector("#status:text-matches('^Done: 6 tokens')", timeout=10_000)


def test_page_load_badge_shows_no_generator_then_ready_then_busy(stack, page):
    # No resume grace: the busy client's leaving ends its generation at once.
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "RESUME_GRACE_SECONDS": "0"})
    page.goto(api.base_url + "/")
    page.wait_for_selector("#load[data-state='down']:text-is('No generator')", timeout=5_000)
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="2000"))
    # The page polls GET /load every 5 s while visible.
    page.wait_for_selector("#load[data-state='idle']:text-is('Ready')", timeout=8_000)
    streaming, leave = threading.Event(), threading.Event()

    def keep_busy() -> None:
        with httpx.stream("POST", api.base_url + "/chat_stream", json={"user_input": "busy"}, timeout=60) as r:
            for _ in r.iter_raw():
                streaming.set()
                if leave.is_set():
                    return  # leaving ends the generation and frees the permit

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        assert streaming.wait(10), "the busy request did not start"
        page.wait_for_selector("#load[data-state='busy']:text-is('Busy')", timeout=8_000)
        assert page.get_attribute("#load", "title") == "1 of 1 generating, 0 of 32 waiting"
    finally:
        leave.set()
        busy.join(30)
    page.wait_for_selector("#load[data-state='idle']", timeout=8_000)


def kill_the_pod_relaying_the_reply(page, pods: list[ApiServer]) -> ApiServer:
    """Once the page shows 10 words of its reply, SIGKILL the pod that relays it (the page's
    connection drops with it); returns the other one."""
    page.wait_for_function("() => document.querySelector('.msg.assistant .text').textContent.split(' ').length >= 10")
    [doomed] = [pod for pod in pods if tokens_relayed(pod) > 0]
    doomed.stop(signal.SIGKILL)
    [survivor] = [pod for pod in pods if pod is not doomed]
    return survivor


@pytest.mark.parametrize("api_key", ["", "sk-resume-5e0b71"], ids=["cookie", "api_key"])
def test_page_resumes_the_reply_on_another_pod_when_its_pod_is_killed(stack, page, api_key):
    tokens, text = 100, "alpha beta gamma delta epsilon"
    stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS=str(tokens)))
    # RESUME_GRACE_SECONDS (10 s by default) keeps the generation going while the page reconnects.
    env = {"API_KEYS": api_key} if api_key else {}
    pods = [stack.api(env), stack.api(env)]
    with TcpProxy([("127.0.0.1", pod.port) for pod in pods]) as proxy:
        page.goto(proxy.url + "/")
        send(page, text)
        if api_key:  # a keyed request resumes with the same key only
            page.wait_for_selector("#key-panel:not([hidden])", timeout=5_000)
            page.fill("#api-key", api_key)
            page.click("#save-key")
        survivor = kill_the_pod_relaying_the_reply(page, pods)
        shown_when_killed = last_reply(page)
        page.wait_for_selector("#status:text-matches('^Reconnecting')", timeout=5_000)
        wait_done(page, timeout_ms=15_000)
    reply = last_reply(page)
    assert len(shown_when_killed.split()) < tokens, "the pod died mid-reply"
    assert tokens_relayed(survivor) > 0, "the rest came through the other pod"
    assert reply == synthetic_reply(text, tokens), "the whole reply, each word once"
    [session] = stack.redis.keys(session_key("*"))
    assert json.loads(stack.redis.lindex(session, 0))["assistant"] == reply, "as the server recorded it"
    assert page.is_enabled("#regenerate")


def test_page_says_so_when_the_reply_it_resumes_is_gone(stack, page):
    stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="50"))
    # Each pod signs sessions with its own secret, so the survivor does not know the page's
    # session: the reply is not the page's there (404), as after RESUME_RETENTION_SECONDS.
    pods = [stack.api({"SESSION_SECRET": f"pod-{i}-session-secret-8d2f"}) for i in range(2)]
    with TcpProxy([("127.0.0.1", pod.port) for pod in pods]) as proxy:
        page.goto(proxy.url + "/")
        send(page, "gone soon")
        kill_the_pod_relaying_the_reply(page, pods)
        error = page.wait_for_selector(".msg.assistant .error", timeout=5_000)
    assert error.inner_text() == "The connection was lost, and the server no longer has this reply."
    assert last_reply(page).startswith("gone soon gone soon gone soon gone soon gone soon"), "the text shown stays"
    assert page.locator("#status.error").inner_text() == "The reply failed"
    assert page.is_disabled("#regenerate") and page.is_enabled("#send")
