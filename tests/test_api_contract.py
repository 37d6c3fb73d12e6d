"""What clients see at the HTTP boundary: framings, bad input, health."""

from __future__ import annotations

import httpx

from services.api.framing import CHATSTREAM_EOS
from tests.conftest import synthetic_generator_env
from tests.support.client import stream_chat


async def test_bad_input_gets_a_clear_json_error_and_no_job(stack):
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        cases = [
            (b"", 400, "invalid_request"),
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 422, "invalid_request"),
            (b'{"regenerate": false}', 422, "invalid_request"),
            (b'{"user_input": "   "}', 422, "invalid_request"),
            (b'{"user_input": 42}', 422, "invalid_request"),
            (b'{"user_input": "hi", "regenerate": "maybe"}', 422, "invalid_request"),
            (('{"user_input": "' + "x" * 9000 + '"}').encode(), 422, "input_too_long"),
            (b'{"user_input": "", "regenerate": true}', 409, "nothing_to_regenerate"),
        ]
        for body, status, code in cases:
            response = await client.post("/chat_stream", content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (body[:40], response.text)
            assert response.json()["error"] == code
            assert response.json()["message"]
    assert stack.redis.zcard("chatstream:queue") == 0


async def test_chatstream_framing_sends_the_whole_reply_so_far_with_eos_markers(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="6"))
    api = stack.api({"RESPONSE_FORMAT": "chatstream"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await stream_chat(client, "/chat_stream", {"user_input": "one two three"})
    assert reply.status == 200
    frames = [f for f in reply.text.split(CHATSTREAM_EOS) if f]
    assert frames[-1] == "one two three one two three"
    assert len(frames) == 6
    for shorter, longer in zip(frames, frames[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)


async def test_sse_events_carry_tokens_then_done_with_usage(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="4"))
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await stream_chat(client, "/chat_stream", {"user_input": "alpha beta"}, sse=True)
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.sse_events()
    assert [name for name, _ in events] == ["token"] * 4 + ["done"]
    assert "".join(d["text"] for n, d in events if n == "token") == "alpha beta alpha beta"
    assert events[-1][1] == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 2, "completion_tokens": 4},
        "history_turns": 0,
    }


async def test_readiness_needs_a_live_generator(stack):
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["generators"] == 0
        generator = stack.generator(synthetic_generator_env())
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["generators"] == 1
        generator.stop()  # a clean shutdown unregisters at once
        assert (await client.get("/readyz")).status_code == 503
