"""With ``RESPONSE_FORMAT=chatstream``, a web client written for ChatStream 0.3 works
unchanged, errors included. The client is ``tests/apps/chatstream_client/``, served
by a user's own app (``tests/apps/chatstream_client_app.py``) and driven in Debian's
chromium; it relies on what ChatStream's own clients rely on, as read in chatstream
0.3.0's server, the web UI in ChatStream's repository (``chatstream/data/chatstream.js``)
and the ChatStreamJs ``ChatStreamClient`` that UI bundles:

* ``POST chat_stream`` from the page's origin (the session cookie comes along), JSON
  ``{"user_input": text, "regenerate": false}``; to regenerate, ``{"user_input": null,
  "regenerate": true}`` (the server reuses the last input).
* A 2xx body is read chunk by chunk; each read is shown as the whole reply so far,
  never appended. ChatStream ends every chunk, the reply so far, with ``<::EOS::>``, so
  a client splits on it and shows the last complete text. The end of the body is the
  end of the reply.
* Any other status is sorted by its range alone, 4xx ``client_error``, 5xx
  ``server_error``, with ``err = {json: body as JSON or null, rawData: body}``;
  ``err.json.error`` is the code (ChatStreamJs' own test: a full queue is 429
  ``{"error": "too_many_requests"}``) and ``err.json.detail`` a sentence (ChatStream
  answers every server-side failure 500 ``{"error": "internal_server_error", "detail": ...}``).
* A body that breaks off makes the read throw a ``TypeError``: ``network_error``
  (ChatStreamJs' test for a server that drops the connection mid-reply).
* ``POST clear_context`` with JSON ``Accept`` and ``Content-Type``, on every page load
  too; the answer is read as text. ChatStream answers ``{"success": true, ...}``.
* Neither client reads a response header; ChatStream sends
  ``X-ChatStream-Last-Generated-Message-Id`` with each reply.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from services.api.framing import CHATSTREAM_EOS
from services.api.sessions import Turn
from services.common.semaphore import GENERATIONS
from tests.conftest import synthetic_generator_env
from tests.support.processes import wait_until
from tests.test_web import browser, page  # noqa: F401  (fixtures: Debian's chromium, one page)

APP = "tests.apps.chatstream_client_app:app"
CHATSTREAM = {"RESPONSE_FORMAT": "chatstream"}


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def open_page(page, base_url: str) -> None:
    assert page.goto(base_url + "/").status == 200
    # ChatStream's web UI clears the context when it loads; so does this page.
    page.wait_for_selector("#cleared:text-is('success')", timeout=5_000)


def ask(page, button: str = "#send", user_input: str | None = None, timeout_ms: int = 15_000) -> None:
    """Send (or regenerate) and wait until the client says the reply ended."""
    if user_input is not None:
        page.fill("#input", user_input)
    page.click(button)
    page.wait_for_selector("#state:text-is('end')", timeout=timeout_ms)


def session_turns(stack) -> list[Turn]:
    keys = stack.redis.keys("chatstream:session:*")
    assert len(keys) <= 1, keys
    return [Turn.from_json(raw) for key in keys for raw in stack.redis.lrange(key, 0, -1)]


def test_the_client_shows_the_growing_reply_regenerates_and_clears(stack, page):  # noqa: F811
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="8"))
    api = stack.api(CHATSTREAM, app=APP)
    open_page(page, api.base_url)
    reply = "alpha beta gamma alpha beta gamma alpha beta"

    ask(page, user_input="alpha beta gamma")
    assert text(page, "#status") == "ok"
    assert text(page, "#reply") == reply
    shown = page.evaluate("window.shownTexts")
    assert len(shown) >= 3, f"the reply must grow chunk by chunk: {shown}"
    for shorter, longer in zip(shown, shown[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter), shown
    assert not any(CHATSTREAM_EOS in s for s in shown)
    first_id = text(page, "#message-id")
    assert first_id and first_id == text(page, "#request-id")
    assert session_turns(stack) == [Turn("alpha beta gamma", reply)]

    # The synthetic generator repeats itself, so make the stored reply stale first: a
    # regenerate that replaced it restores it; one that appended would leave two turns.
    (key,) = stack.redis.keys("chatstream:session:*")
    stack.redis.lset(key, -1, Turn("alpha beta gamma", "a stale reply").to_json())
    ask(page, "#regenerate")
    assert text(page, "#status") == "ok"
    assert text(page, "#reply") == reply
    assert len(page.evaluate("window.shownTexts")) >= 3
    assert text(page, "#message-id") not in ("", first_id), "each reply has its own message id"
    assert session_turns(stack) == [Turn("alpha beta gamma", reply)]

    page.click("#clear")
    page.wait_for_selector("#cleared:text-is('success')", timeout=5_000)
    assert session_turns(stack) == []


@contextmanager
def other_client(base_url: str, started: Callable[[], bool]) -> Iterator[None]:
    """A ``/chat_stream`` request of another client, open until the block ends;
    ``started`` says when it holds what the test needs (a permit, a queue place)."""
    stop = threading.Event()

    def run() -> None:
        with httpx.stream("POST", base_url + "/chat_stream", json={"user_input": "busy"}, timeout=30) as response:
            for _ in response.iter_raw():
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(started, 10, "the other client's request")
        yield
    finally:
        stop.set()
        thread.join(30)


def assert_refused(page, status: str, status_code: int, error: str, code: str) -> dict:
    """The client saw an HTTP error of this kind, with ChatStream's ``error`` and a
    ``detail``, and our own ``code`` and ``message`` in the body; returns the body."""
    assert text(page, "#status") == status
    assert text(page, "#status-code") == str(status_code)
    assert text(page, "#error-code") == error
    body = json.loads(text(page, "#error-raw"))
    assert body["code"] == code and body["message"]
    assert text(page, "#error-detail") == body["message"]
    assert text(page, "#reply") == "", "no reply text for a refused request"
    return body


def test_the_client_sees_refusals_in_the_shape_it_parses(stack, page):  # noqa: F811
    stack.generator(synthetic_generator_env(tokens_per_second=10, MAX_NEW_TOKENS="200"))
    limits = {"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT_SECONDS": "1.5"}
    api = stack.api({**CHATSTREAM, **limits, "MAX_INPUT_CHARS": "50"}, app=APP)
    open_page(page, api.base_url)

    ask(page, user_input="x" * 51)
    assert "at most 50" in assert_refused(page, "client_error", 422, "input_too_long", "input_too_long")["message"]
    ask(page, user_input="   ")
    assert_refused(page, "client_error", 422, "invalid_request", "invalid_request")
    ask(page, "#regenerate")
    assert_refused(page, "client_error", 409, "nothing_to_regenerate", "nothing_to_regenerate")

    with other_client(api.base_url, lambda: stack.redis.zcard(GENERATIONS.holders) == 1):
        with other_client(api.base_url, lambda: stack.redis.zcard(GENERATIONS.waiters) == 1):
            ask(page, user_input="hello")
            assert_refused(page, "client_error", 429, "too_many_requests", "too_many_requests")
        # The queue place is free again; waiting in it outlasts QUEUE_TIMEOUT_SECONDS.
        wait_until(lambda: stack.redis.zcard(GENERATIONS.waiters) == 0, 5, "the queue place to be free")
        ask(page, user_input="hello")
        assert_refused(page, "server_error", 503, "internal_server_error", "queue_timeout")
    assert session_turns(stack) == [], "nothing refused is recorded"


def test_the_client_sees_a_reply_cut_off_as_a_network_error(stack, page):  # noqa: F811
    stack.generator(synthetic_generator_env(tokens_per_second=20, SYNTHETIC_FAIL_AFTER_TOKENS="3"))
    api = stack.api(CHATSTREAM, app=APP)
    open_page(page, api.base_url)

    ask(page, user_input="one two three four")
    assert text(page, "#status") == "network_error"
    assert text(page, "#reply") == "one two three", "the text that arrived stays"
    assert text(page, "#status-code") == "", "no HTTP error: the reply had begun"
    assert session_turns(stack) == [], "a failed reply is not recorded"
