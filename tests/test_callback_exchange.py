"""The callback sees what happened: ``request.state.chat`` for each of the four
messages, in a user's own app with the ChatStream article's route patterns
(``tests/apps/seed_app.py``), against real Redis, API and generator processes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.common.contract import session_key
from services.common.semaphore import GENERATIONS
from tests.apps.seed_app import EXCHANGES_KEY
from tests.conftest import synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.processes import eventually

SEED_APP = "tests.apps.seed_app:app"
FIELDS = {
    "message", "path", "request_id", "session_id", "user_input", "reply", "finish_reason", "usage", "history",
    "history_turns_used", "regenerate", "timings", "error",
}


def exchanges(stack) -> list[dict]:
    return [json.loads(raw) for raw in stack.redis.lrange(EXCHANGES_KEY, 0, -1)]


async def exchange_of(stack, request_id: str) -> dict:
    await eventually(lambda: any(e["request_id"] == request_id for e in exchanges(stack)), 10, "the callback")
    [found] = [e for e in exchanges(stack) if e["request_id"] == request_id]
    assert set(found) == FIELDS
    return found


def tokens(reply) -> str:
    return "".join(data["text"] for name, data in reply.sse_events() if name == "token")


def check_timings(timings: dict, *, queued: bool, first_token: bool) -> None:
    assert timings["total"] > 0
    if queued:
        assert 0 <= timings["queue_wait"] < timings["total"]
    else:
        assert timings["queue_wait"] is None
    if first_token:
        assert timings["queue_wait"] <= timings["time_to_first_token"] <= timings["total"]
    else:
        assert timings["time_to_first_token"] is None


async def test_success_and_regenerate_show_the_whole_exchange(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="4"))
    api = stack.api(app=SEED_APP)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        # The article's plain route: no callback, but it streams and keeps the session.
        plain = await stream_chat(client, "/chat_stream", {"user_input": "zero one"})
        assert plain.status == 200 and plain.text == "zero one zero one"
        first = await stream_chat(client, "/chat_stream_callback", {"user_input": "alpha beta"}, sse=True)
        second = await stream_chat(
            client, "/chat_stream_intercept", {"user_input": "gamma delta", "regenerate": False}, sse=True
        )
        again = await stream_chat(client, "/chat_stream_intercept", {"user_input": "", "regenerate": True}, sse=True)
    assert [r.status for r in (first, second, again)] == [200, 200, 200]
    assert not any(e["request_id"] == plain.request_id for e in exchanges(stack))

    one = await exchange_of(stack, first.request_id)
    session_id = one["session_id"]
    assert stack.redis.exists(session_key(session_id))  # the session the request really used
    assert one["message"] == "success" and one["path"] == "/chat_stream_callback"
    assert one["user_input"] == "alpha beta"
    assert one["reply"] == tokens(first) == "alpha beta alpha beta"
    assert one["finish_reason"] == "length"
    assert one["usage"] == {"prompt_tokens": 2 + 2 + 4, "completion_tokens": 4}  # synthetic counts words
    assert one["history"] == [["zero one", "zero one zero one"]]
    assert one["history_turns_used"] == 1
    assert one["regenerate"] is False and one["error"] is None
    check_timings(one["timings"], queued=True, first_token=True)

    two = await exchange_of(stack, second.request_id)
    assert two["session_id"] == session_id and two["path"] == "/chat_stream_intercept"
    assert two["user_input"] == "gamma delta" and two["reply"] == tokens(second) == "gamma delta gamma delta"
    assert two["history"] == [["zero one", "zero one zero one"], ["alpha beta", "alpha beta alpha beta"]]
    assert two["history_turns_used"] == 2 and two["regenerate"] is False

    three = await exchange_of(stack, again.request_id)
    # Regenerating answers the last input again, with the turns before it as history.
    assert three["regenerate"] is True and three["user_input"] == "gamma delta"
    assert three["history"] == two["history"] and three["reply"] == tokens(again)
    assert three["message"] == "success" and three["usage"]["completion_tokens"] == 4


async def test_client_disconnects_show_what_was_sent(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="200"))
    # No grace: the disconnect ends the request at once (the grace is tested in test_resume.py).
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "RESUME_GRACE_SECONDS": "0"}, app=SEED_APP)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        # Leaves after three chunks of the reply.
        leaving = await stream_chat(client, "/chat_stream_callback", {"user_input": "one two three"}, stop_after_chunks=3)
        # Its generation stops and gives the permit back; then "busy" takes it (so the
        # permit the next check sees is busy's, not the stopping one's).
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 5, "the first permit back")
        # Holds the only permit, so the next one waits in admission and leaves there.
        busy = asyncio.create_task(stream_chat(client, "/chat_stream_callback", {"user_input": "busy"}))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 1, 5, "the permit to be taken")
        waiter = asyncio.create_task(stream_chat(client, "/chat_stream_callback", {"user_input": "gives up"}, sse=True))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 1, 5, "a waiter")
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        # Only once the server saw it leave: a permit freed before that would be handed
        # to it (whoever polls next), and it would have waited, then left holding it.
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 0, 5, "the waiter to leave")
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)

    await eventually(lambda: len(exchanges(stack)) == 3, 10, "three callbacks")
    by_input = {e["user_input"]: e for e in exchanges(stack)}

    streaming = by_input["one two three"]
    assert streaming["request_id"] == leaving.request_id
    assert streaming["message"] == "client_disconnected_while_streaming"
    # What the client read is what the server sent, or a prefix of it when the last
    # chunk was on the wire as the client left.
    assert streaming["reply"].startswith(leaving.text) and leaving.text
    assert ("one two three " * 70).startswith(streaming["reply"])
    assert streaming["finish_reason"] == "cancelled" and streaming["error"] is None
    assert streaming["usage"] == {"prompt_tokens": None, "completion_tokens": len(streaming["reply"].split())}
    assert streaming["history"] == [] and streaming["history_turns_used"] is None
    check_timings(streaming["timings"], queued=True, first_token=True)

    before = by_input["gives up"]
    assert before["message"] == "client_disconnected_before_streaming"
    assert before["reply"] == "" and before["finish_reason"] == "cancelled"
    assert before["usage"] == {"prompt_tokens": None, "completion_tokens": 0}
    # It never got a permit: no queue wait, no first token.
    check_timings(before["timings"], queued=False, first_token=False)
    # Only finished replies are recorded in the session: the one cut short is not history.
    assert before["history"] == [] and before["session_id"] == streaming["session_id"]


async def test_an_error_mid_stream_shows_the_code_and_the_text_sent(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=100, SYNTHETIC_FAIL_AFTER_TOKENS="3"))
    api = stack.api(app=SEED_APP)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await stream_chat(client, "/chat_stream_callback", {"user_input": "red green"}, sse=True)
    assert reply.status == 200 and reply.sse_events()[-1][0] == "error"
    failed = await exchange_of(stack, reply.request_id)
    assert failed["message"] == "unknown_error_occurred"
    assert failed["error"] == "generation_failed" and failed["finish_reason"] == "error"
    assert failed["reply"] == tokens(reply) == "red green red"
    assert failed["usage"] == {"prompt_tokens": None, "completion_tokens": 3}
    assert failed["user_input"] == "red green" and failed["regenerate"] is False
    check_timings(failed["timings"], queued=True, first_token=True)


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "chunks"])
async def test_the_openai_route_sets_the_same_object(stack, stream):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="3"))
    api = stack.api({"SYSTEM_PROMPT": "be kind"}, app=SEED_APP)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "tell more"},
    ]
    response = httpx.post(
        f"{api.base_url}/v1/chat/completions", json={"messages": messages, "stream": stream}, timeout=30
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    chat = await exchange_of(stack, request_id)
    assert chat["message"] == "success" and chat["path"] == "/v1/chat/completions"
    assert chat["session_id"] is None and chat["regenerate"] is False
    assert chat["user_input"] == "tell more" and chat["reply"] == "tell more tell"
    # The request's own messages before its last user message; not the operator's SYSTEM_PROMPT.
    assert chat["history"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
    ]
    assert chat["history_turns_used"] is None
    assert chat["finish_reason"] == "length" and chat["usage"]["completion_tokens"] == 3
    check_timings(chat["timings"], queued=True, first_token=True)
