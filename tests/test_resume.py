"""Resumable streams: a reply survives its connection and its API pod.

Every SSE event carries its cursor; ``GET /chat_stream/{request_id}`` on any pod
continues after ``Last-Event-ID`` (or a plain body after ``?offset=``), for the
requester only. A client that leaves does not stop a started generation at once:
it goes on for ``RESUME_GRACE_SECONDS``, owning its permit, so a client that comes
back (even through another pod, even after the first pod was killed) gets the
whole reply, and the callback fires exactly once. Real Redis, API and generator
processes throughout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

from services.common.contract import session_key
from services.common.semaphore import GENERATIONS
from tests.apps.seed_app import EXCHANGES_KEY
from tests.conftest import synthetic_generator_env, synthetic_reply
from tests.support.client import StreamedReply
from tests.support.processes import eventually

SEED_APP = "tests.apps.seed_app:app"
SSE = {"accept": "text/event-stream"}


def cursor_key(cursor: str) -> tuple[int, int]:
    ms, seq = cursor.split("-")
    return int(ms), int(seq)


async def read_sse(
    client: httpx.AsyncClient, method: str, url: str, *, stop_after_tokens: int | None = None, **kwargs
) -> tuple[StreamedReply, list[tuple[str, dict, str]]]:
    """Read an SSE response event by event; leave after ``stop_after_tokens`` token events."""
    headers = {**SSE, **kwargs.pop("headers", {})}
    async with client.stream(method, url, headers=headers, **kwargs) as response:
        reply = StreamedReply(response.status_code, response.headers)
        buffer = b""
        try:
            async for chunk in response.aiter_raw():
                reply.chunks.append(chunk)
                buffer += chunk
                seen = buffer.count(b"event: token")
                if stop_after_tokens is not None and seen >= stop_after_tokens and buffer.endswith(b"\n\n"):
                    break
        except httpx.HTTPError as exc:  # the server went away mid-stream
            reply.error = exc
    return reply, reply.sse_events_with_ids()


def token_text(events: list[tuple[str, dict, str]]) -> str:
    return "".join(data["text"] for name, data, _ in events if name == "token")


def same_stream(replay: list[tuple[str, dict, str]], original: list[tuple[str, dict, str]]) -> bool:
    """A replay carries the same text and the same end at the same cursor; tokens read
    together may come as fewer events (each at the cursor of its last entry)."""
    return (
        token_text(replay) == token_text(original)
        and replay[-1] == original[-1]
        and {c for _, _, c in replay} <= {c for _, _, c in original}
    )


def exchanges(stack) -> list[dict]:
    return [json.loads(raw) for raw in stack.redis.lrange(EXCHANGES_KEY, 0, -1)]


async def test_sse_events_carry_increasing_cursors_and_a_retry(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="12"))
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply, events = await read_sse(client, "POST", "/chat_stream", json={"user_input": "one two"})
    assert reply.status == 200
    assert reply.text.startswith("retry: 1000\n\n")
    assert [name for name, _, _ in events][-1] == "done"
    cursors = [cursor for _, _, cursor in events]
    assert all(cursors), events
    assert [cursor_key(c) for c in cursors] == sorted({cursor_key(c) for c in cursors})  # strictly increasing


async def test_a_stream_resumes_on_another_pod_right_after_the_last_event_seen(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="60"))
    first_pod, second_pod = stack.api(app=SEED_APP), stack.api(app=SEED_APP)
    text = "red green blue"
    async with httpx.AsyncClient(timeout=30) as client:
        before, seen = await read_sse(
            client, "POST", f"{first_pod.base_url}/chat_stream_callback", json={"user_input": text}, stop_after_tokens=5
        )
        request_id = before.request_id
        last = seen[-1][2]
        resumed, rest = await read_sse(
            client, "GET", f"{second_pod.base_url}/chat_stream/{request_id}", headers={"last-event-id": last}
        )
    assert resumed.status == 200 and resumed.request_id == request_id
    assert rest[-1][0] == "done"
    # No gap, no duplicate: the cursors go on where they stopped, and the texts join up.
    assert cursor_key(rest[0][2]) > cursor_key(last)
    cursors = [cursor_key(c) for _, _, c in seen + rest]
    assert cursors == sorted(set(cursors))
    assert token_text(seen) + token_text(rest) == synthetic_reply(text, 60)

    # Exactly one callback, by the pod that saw the end, with the whole reply; one turn.
    await eventually(lambda: exchanges(stack), 10, "the callback")
    await asyncio.sleep(1.5)  # the first connection's grace would end by now if it were to fire
    [chat] = exchanges(stack)
    assert chat["message"] == "success" and chat["request_id"] == request_id
    assert chat["path"] == f"/chat_stream/{request_id}"
    assert chat["reply"] == synthetic_reply(text, 60) and chat["user_input"] == text
    [session] = stack.redis.keys(session_key("*"))
    assert stack.redis.llen(session) == 1
    assert json.loads(stack.redis.lindex(session, 0))["assistant"] == synthetic_reply(text, 60)


async def test_replay_from_the_start_and_until_the_retention_ends(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="8"))
    api = stack.api({"RESUME_RETENTION_SECONDS": "2"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        original, events = await read_sse(client, "POST", "/chat_stream", json={"user_input": "a b"})
        request_id = original.request_id
        replayed, again = await read_sse(client, "GET", f"/chat_stream/{request_id}")
        assert replayed.status == 200
        assert same_stream(again, events)
        # After the next-to-last event: the end alone.
        _, last_only = await read_sse(
            client, "GET", f"/chat_stream/{request_id}", headers={"last-event-id": events[-2][2]}
        )
        assert last_only == [events[-1]]
        # After the last: nothing more will come, and 204 says so (an EventSource
        # stops reconnecting), at once rather than after waiting on the stream.
        started = time.monotonic()
        ended = await client.get(f"/chat_stream/{request_id}", headers={**SSE, "last-event-id": events[-1][2]})
        assert ended.status_code == 204 and ended.headers["x-request-id"] == request_id
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(2.5)
        expired = await client.get(f"/chat_stream/{request_id}", headers=SSE)
    assert expired.status_code == 404 and expired.json()["error"] == "not_found"


async def test_only_the_requester_may_resume(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="8"))
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as owner:
        original, _ = await read_sse(owner, "POST", "/chat_stream", json={"user_input": "mine"})
        request_id = original.request_id
        assert (await owner.get(f"/chat_stream/{request_id}", headers=SSE)).status_code == 200
        bad_cursor = await owner.get(f"/chat_stream/{request_id}", headers={**SSE, "last-event-id": "x; drop"})
        assert bad_cursor.status_code == 400 and bad_cursor.json()["error"] == "invalid_cursor"
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as stranger:
        await stranger.post("/chat_stream", json={"user_input": "a session of my own"})
        foreign = await stranger.get(f"/chat_stream/{request_id}", headers=SSE)
        unknown = await stranger.get(f"/chat_stream/{'0' * 32}", headers=SSE)
        malformed = await stranger.get("/chat_stream/not-an-id", headers=SSE)
    # Someone else's request looks exactly like one that does not exist.
    for response in (foreign, unknown, malformed):
        assert response.status_code == 404, response.text
        assert response.json() == foreign.json()
    assert "mine" not in foreign.text


async def test_with_api_keys_the_same_key_resumes_without_a_cookie(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="8"))
    api = stack.api({"API_KEYS": "key-one-0123456789,key-two-0123456789"})
    one = {"authorization": "Bearer key-one-0123456789"}
    two = {"authorization": "Bearer key-two-0123456789"}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        original, events = await read_sse(client, "POST", "/chat_stream", json={"user_input": "keyed"}, headers=one)
        request_id = original.request_id
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as cookieless:
        again, replay = await read_sse(cookieless, "GET", f"/chat_stream/{request_id}", headers=one)
        other = await cookieless.get(f"/chat_stream/{request_id}", headers={**SSE, **two})
    assert again.status == 200 and same_stream(replay, events)
    assert other.status_code == 404


async def test_a_plain_text_reply_resumes_at_a_byte_offset(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="40"))
    api = stack.api()
    text = "héllo wörld"  # multi-byte characters: the offset counts bytes
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        async with client.stream("POST", "/chat_stream", json={"user_input": text}) as response:
            request_id = response.headers["x-request-id"]
            received = b""
            async for chunk in response.aiter_raw():
                received += chunk
                if len(received) > 20:
                    break
        rest = await client.get(f"/chat_stream/{request_id}", params={"offset": len(received)})
    assert rest.status_code == 200 and rest.headers["content-type"].startswith("text/plain")
    assert (received + rest.content).decode() == synthetic_reply(text, 40)


async def test_a_client_that_does_not_come_back_stops_the_generation_after_the_grace(stack):
    grace = 1.0
    generator = stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="500"))
    api = stack.api({"RESUME_GRACE_SECONDS": str(grace)}, app=SEED_APP)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        before, _ = await read_sse(client, "POST", "/chat_stream_callback", json={"user_input": "go on"}, stop_after_tokens=3)
    left_at = time.monotonic()
    request_id = before.request_id
    # Within the grace the generation goes on and nothing is reported yet.
    await asyncio.sleep(grace / 2)
    assert not exchanges(stack)
    assert stack.redis.zscore(GENERATIONS.holders, request_id) is not None
    await eventually(lambda: f"request {request_id} stopping" in generator.log(), grace + 2, "the generation to stop")
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 2, "the permit to return")
    assert time.monotonic() - left_at < grace + 1.5
    await eventually(lambda: exchanges(stack), 5, "the callback")
    [chat] = exchanges(stack)
    assert chat["message"] == "client_disconnected_while_streaming" and chat["request_id"] == request_id


async def test_the_requester_can_stop_a_generation_at_once_and_nobody_else_can(stack):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="500"))
    api = stack.api(app=SEED_APP)  # the default grace: 10 s
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        before, _ = await read_sse(client, "POST", "/chat_stream_callback", json={"user_input": "go on"}, stop_after_tokens=3)
        request_id = before.request_id
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as stranger:
            assert (await stranger.delete(f"/chat_stream/{request_id}")).status_code == 404
        assert (await client.delete("/chat_stream/not-an-id")).status_code == 404
        await asyncio.sleep(0.5)
        assert f"request {request_id} stopping" not in generator.log()  # the stranger stopped nothing
        stopped_at = time.monotonic()
        cancelled = await client.delete(f"/chat_stream/{request_id}")
        assert cancelled.status_code == 204 and cancelled.headers["x-request-id"] == request_id
        await eventually(lambda: f"request {request_id} stopping: cancelled" in generator.log(), 2, "the generation to stop")
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 2, "the permit to return")
        assert time.monotonic() - stopped_at < 1.5, "well within the 10 s grace"
        assert (await client.delete(f"/chat_stream/{request_id}")).status_code == 204  # again: still 204
    await eventually(lambda: exchanges(stack), 12, "the callback")
    [chat] = exchanges(stack)
    assert chat["request_id"] == request_id and chat["message"] == "client_disconnected_while_streaming"


async def test_a_killed_api_pod_does_not_stop_the_generation_and_the_client_resumes_elsewhere(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="150"))
    env = {"RESUME_GRACE_SECONDS": "10", "LEASE_SECONDS": "1.5"}
    doomed, survivor = stack.api(env, app=SEED_APP), stack.api(env, app=SEED_APP)
    text = "keep going"
    async with httpx.AsyncClient(timeout=30) as client:
        stream = asyncio.create_task(
            read_sse(client, "POST", f"{doomed.base_url}/chat_stream_callback", json={"user_input": text})
        )
        await eventually(lambda: stack.redis.keys("chatstream:stream:*"), 5, "the stream")
        await asyncio.sleep(1.0)
        doomed.stop(signal.SIGKILL)
        before, seen = await stream
        # Well past the dead pod's lease: the generation renews its own permit.
        await asyncio.sleep(2.0)
        assert stack.redis.zcard(GENERATIONS.holders) == 1
        last = [cursor for _, _, cursor in seen if cursor][-1]
        resumed, rest = await read_sse(
            client, "GET", f"{survivor.base_url}/chat_stream/{before.request_id}", headers={"last-event-id": last}
        )
    assert rest[-1][0] == "done"
    assert token_text(seen) + token_text(rest) == synthetic_reply(text, 150)
    await eventually(lambda: exchanges(stack), 10, "the callback")
    [chat] = exchanges(stack)
    assert chat["message"] == "success" and chat["reply"] == synthetic_reply(text, 150)
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 3, "the permit to return")
