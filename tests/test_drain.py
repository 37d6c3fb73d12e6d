"""An API pod that stops (SIGTERM) or a client that stops reading ends a connection,
never a reply.

On SIGTERM a pod fails readiness at once, ends each resumable SSE stream with an
``event: reconnect`` (its client resumes on another pod), lets streams that cannot
be resumed finish, and waits out the grace of the streams it handed off before it
exits, so that a request no client came back for still gets its callback. A client
that takes nothing for ``SEND_TIMEOUT_SECONDS`` is disconnected, and may resume.
Real Redis, API and generator processes, real signals and real sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import httpx

from services.common.contract import readers_key, stream_key
from services.common.semaphore import GENERATIONS
from tests.conftest import synthetic_generator_env, synthetic_reply
from tests.support.client import StreamedReply, scrape, stream_chat
from tests.support.processes import eventually, free_port
from tests.test_resume import SEED_APP, SSE, exchanges, read_sse, token_text


async def _read_until_closed(client: httpx.AsyncClient, method: str, url: str, **kwargs) -> StreamedReply:
    reply, _ = await read_sse(client, method, url, **kwargs)
    return reply


async def test_sigterm_fails_readiness_at_once_and_hands_sse_streams_to_another_pod(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="60", GENERATOR_SLOTS="2"))
    internal_port = free_port()
    stopping = stack.api({"API_INTERNAL_PORT": str(internal_port), "MAX_CONCURRENT_GENERATIONS": "2"})
    other = stack.api()
    internal = f"http://127.0.0.1:{internal_port}"
    text = "alpha beta gamma"
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{internal}/acceptingz")).json() == {"status": "ok"}
        sse = asyncio.create_task(_read_until_closed(client, "POST", f"{stopping.base_url}/chat_stream", json={"user_input": text}))
        # A plain-text client cannot resume by itself: its reply must go on to the end.
        plain_client = httpx.AsyncClient(timeout=30)  # a session of its own
        plain = asyncio.create_task(stream_chat(plain_client, f"{stopping.base_url}/chat_stream", {"user_input": "one two"}))
        await eventually(lambda: len(stack.redis.keys("chatstream:stream:*")) == 2, 10, "both streams to start")
        await asyncio.sleep(0.5)  # a few tokens each

        stopping.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while True:  # readiness fails at once; liveness does not
            ready = await client.get(f"{internal}/acceptingz")
            if ready.status_code == 503:
                break
            assert time.monotonic() - signalled < 1, "readiness still passes 1 s after SIGTERM"
            await asyncio.sleep(0.02)
        assert ready.json() == {"status": "draining"}
        assert (await client.get(f"{internal}/readyz")).status_code == 503
        assert (await client.get(f"{internal}/healthz")).status_code == 200

        handed = await asyncio.wait_for(sse, 5)
        events = handed.sse_events_with_ids()
        assert handed.error is None, handed.error  # a clean end, not a cut connection
        assert events[-1][0] == "reconnect" and events[-1][2] == "", events[-1]
        assert events[-1][1] == {"reason": "shutting_down", "retry_ms": 1000}
        tokens = [e for e in events if e[0] == "token"]
        assert tokens, "the stream was handed off before its first token"
        resumed, rest = await read_sse(
            client,
            "GET",
            f"{other.base_url}/chat_stream/{handed.request_id}",
            headers={"last-event-id": tokens[-1][2]},  # the session cookie is in the client's jar
        )
        assert resumed.status == 200, resumed.text
        assert rest[-1][0] == "done"
        assert token_text(events) + token_text(rest) == synthetic_reply(text, 60)

        finished = await asyncio.wait_for(plain, 10)
        await plain_client.aclose()
        assert finished.status == 200 and finished.error is None
        assert finished.text == synthetic_reply("one two", 60)
    assert_exited_cleanly(stopping)
    assert "draining (SIGTERM)" in stopping.log()


def assert_exited_cleanly(api) -> None:
    """The pod ended by itself after its shutdown ran (uvicorn re-raises the SIGTERM it
    caught once it is done, so the status is that of SIGTERM)."""
    assert api.proc.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in api.log()


async def test_a_draining_pod_reports_the_end_of_a_handed_off_stream_nobody_resumed(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400"))
    # A user's app run by uvicorn: its first request installs the SIGTERM hook.
    stopping = stack.api({"RESUME_GRACE_SECONDS": "2"}, app=SEED_APP)
    async with httpx.AsyncClient(timeout=30) as client:
        sse = asyncio.create_task(
            _read_until_closed(client, "POST", f"{stopping.base_url}/chat_stream_callback", json={"user_input": "x y"})
        )
        await eventually(lambda: len(stack.redis.keys("chatstream:stream:*")) == 1, 10, "the stream to start")
        await asyncio.sleep(0.5)
        stopping.proc.send_signal(signal.SIGTERM)
        handed = await asyncio.wait_for(sse, 5)
    assert handed.sse_events_with_ids()[-1][0] == "reconnect"
    request_id = handed.request_id
    # The generation goes on for the grace, owning its permit ...
    assert stack.redis.exists(readers_key(request_id))
    assert stack.redis.zcard(GENERATIONS.holders) == 1
    # ... then nobody having come back, it stops, and the draining pod, which waited for
    # that, fires the callback before it exits.
    assert_exited_cleanly(stopping)
    [chat] = exchanges(stack)
    assert chat["message"] == "client_disconnected_while_streaming" and chat["request_id"] == request_id
    assert chat["reply"] == token_text(handed.sse_events_with_ids())
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 5, "the permit to return")
    assert 0 < stack.redis.ttl(stream_key(request_id)) <= 60  # kept for late readers


async def test_a_client_that_stops_reading_is_disconnected_and_resumes_the_whole_reply(stack):
    # Long tokens fast: the socket's buffers fill within a second of the client stalling.
    word = "w" * 3000
    text = f"{word}a {word}b"
    tokens = 2000
    stack.generator(synthetic_generator_env(tokens_per_second=400, MAX_NEW_TOKENS=str(tokens)))
    api = stack.api({"SEND_TIMEOUT_SECONDS": "1"})
    host, port = "127.0.0.1", api.port
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    stalled.connect((host, port))
    body = json.dumps({"user_input": text}).encode()
    stalled.sendall(
        b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = stalled.recv(1024)  # the headers arrive; then the client reads nothing
    assert head.startswith(b"HTTP/1.1 200"), head

    def timed_out() -> bool:
        return scrape(f"{api.base_url}/metrics").get("chatstream_send_timeouts_total", 0) >= 1

    await eventually(timed_out, 15, "the API to give up on the stalled client")
    # Whatever reached the client's socket is still there; then the connection ends.
    received = head
    stalled.settimeout(5)
    while chunk := stalled.recv(65536):
        received += chunk
    stalled.close()
    sse = received.split(b"\r\n\r\n", 1)[1].decode(errors="replace")
    request_id = re.search(rb"x-request-id: ([0-9a-f]+)", received).group(1).decode()
    cookie = re.search(rb"set-cookie: sid=([^;]+)", received).group(1).decode()
    payload = _dechunk(sse)
    complete = payload[: payload.rfind("\n\n") + 2]  # the events that arrived whole
    events = StreamedReply(200, httpx.Headers(), chunks=[complete.encode()]).sse_events_with_ids()
    assert events and events[-1][0] == "token"
    assert len(events) < tokens, "the client was sent everything: the test did not stall it"

    # The generation went on meanwhile; the client comes back for the rest.
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30, cookies={"sid": cookie}) as client:
        resumed, rest = await read_sse(
            client, "GET", f"/chat_stream/{request_id}", headers={"last-event-id": events[-1][2]}
        )
    assert resumed.status == 200 and rest[-1][0] == "done"
    assert token_text(events) + token_text(rest) == synthetic_reply(text, tokens)
    assert "took nothing for 1s" in api.log()


def _dechunk(body: str) -> str:
    """The payload of an HTTP/1.1 chunked body (possibly cut off)."""
    out, rest = [], body
    while rest:
        size_line, sep, rest = rest.partition("\r\n")
        if not sep or not size_line.strip():
            break
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return "".join(out)
