"""Faults provoked for real: killed processes, dropped connections, a stopped Redis,
deadlines. Nothing may hang, leak a permit, or fire a callback twice."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from datetime import datetime

import httpx

from services.common.contract import stream_key
from services.common.semaphore import GENERATIONS
from tests.apps.recording_app import CALLBACKS_KEY
from tests.conftest import synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.processes import eventually


def callbacks(stack) -> list[str]:
    return [e.decode() for e in stack.redis.lrange(CALLBACKS_KEY, 0, -1)]


def log_time(log: str, pattern: str) -> float:
    """Timestamp of the first log line matching ``pattern``."""
    match = re.search(r"^(\S+ \S+) .*" + pattern, log, re.M)
    assert match, f"no log line matches {pattern!r}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def test_disconnect_mid_stream_stops_generation_within_half_a_second(stack):
    rate = 40
    generator = stack.generator(synthetic_generator_env(tokens_per_second=rate, MAX_NEW_TOKENS="400"))
    # Without a grace, as before resumable streams: the client's leaving stops it at once
    # (with a grace, test_resume.py).
    api = stack.api({"RESUME_GRACE_SECONDS": "0", "RESUME_RETENTION_SECONDS": "0"}, app="tests.apps.recording_app:app")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await stream_chat(client, "/chat_stream", {"user_input": "w"}, stop_after_chunks=10)
    disconnected_at = time.time()
    request_id = reply.request_id
    await eventually(lambda: f"request {request_id} finished" in generator.log(), 5, "the generation to stop")
    stopped_at = log_time(generator.log(), f"request {request_id} finished: cancelled")
    assert stopped_at - disconnected_at < 0.5
    tokens = int(re.search(rf"request {request_id} finished: cancelled \((\d+) tokens\)", generator.log()).group(1))
    # At 40 tokens/s, half a second is 20 tokens; the client had received about 10.
    assert tokens - len(reply.chunks) < 0.5 * rate
    await eventually(lambda: f"{request_id} client_disconnected_while_streaming" in callbacks(stack), 5, "callback")
    assert not stack.redis.exists(stream_key(request_id))
    # The generation owns its permit: it gives it back right after its last write,
    # which comes just after the "finished" log line.
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 1, "the generation to release its permit")


async def test_generator_killed_mid_stream_ends_the_stream_with_an_error_within_3s(stack):
    gen_env = synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400")
    generator = stack.generator(gen_env)
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1"}, app="tests.apps.recording_app:app")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        for sse in (True, False):
            reply_task = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "x"}, sse=sse))
            await eventually(lambda: "started" in generator.log(), 5, "the generation to start")
            await asyncio.sleep(0.5)
            generator.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            reply = await asyncio.wait_for(reply_task, 10)
            assert time.monotonic() - killed_at < 3.0
            assert reply.chunks, "tokens had reached the client before the kill"
            if sse:
                name, data = reply.sse_events()[-1]
                assert name == "error" and data["code"] == "generator_lost"
            else:
                # Plain text: cut off without the final chunk, unlike a success.
                assert isinstance(reply.error, httpx.RemoteProtocolError)
            await eventually(lambda: f"{reply.request_id} unknown_error_occurred" in callbacks(stack), 5, "callback")
            await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 2, "the permit to return")
            # The job is not silently re-run to a client that already got tokens.
            generator = stack.generator(gen_env)
            await asyncio.sleep(0.5)
            assert f"request {reply.request_id} started" not in generator.log()


async def test_sigterm_drains_running_streams_then_exits_cleanly(stack):
    env = synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="40", DRAIN_SECONDS="30")
    leaving = stack.generator(env)
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "4"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        running = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "finish me"}, sse=True))
        await eventually(lambda: "started" in leaving.log(), 5, "the generation to start")
        leaving.proc.send_signal(signal.SIGTERM)  # Kubernetes scale-in
        await eventually(lambda: stack.redis.zscore("chatstream:generators", leaving.worker_id) is None, 3, "unregistering")
        # A request sent during the drain is not taken by the draining pod...
        later = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "later"}, sse=True))
        reply = await running
        assert reply.sse_events()[-1][0] == "done"
        assert reply.sse_events()[-1][1]["usage"]["completion_tokens"] == 40
        assert leaving.proc.wait(10) == 0
        # ...but by the next one.
        stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="3"))
        later_reply = await asyncio.wait_for(later, 15)
    assert later_reply.sse_events()[-1][0] == "done"
    assert "request " + later_reply.request_id + " started" not in leaving.log()


async def test_request_deadline_ends_the_request_and_stops_generation(stack):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400"))
    api = stack.api({"REQUEST_TIMEOUT_SECONDS": "1.5"}, app="tests.apps.recording_app:app")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        started = time.monotonic()
        reply = await stream_chat(client, "/chat_stream", {"user_input": "too slow"}, sse=True)
        elapsed = time.monotonic() - started
    name, data = reply.sse_events()[-1]
    assert name == "error" and data["code"] == "request_timeout"
    assert 1.4 < elapsed < 3
    await eventually(lambda: f"request {reply.request_id} finished: cancelled" in generator.log(), 3, "generation to stop")
    await eventually(lambda: f"{reply.request_id} unknown_error_occurred" in callbacks(stack), 5, "callback")
    assert stack.redis.zcard(GENERATIONS.holders) == 0


async def test_redis_outage_fails_fast_and_the_service_recovers_without_restart(private_stack):
    stack = private_stack
    # Streams ride out an outage of REDIS_RETRY_SECONDS (a failover: test_failover.py);
    # this Redis stays down longer, and comes back empty.
    outage = {"REDIS_RETRY_SECONDS": "2"}
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400", **outage))
    api = stack.api(outage)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        open_stream = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "open"}, sse=True))
        await eventually(lambda: "started" in generator.log(), 5, "a stream to be open")
        stack.redis_server.stop()
        # The open stream ends with an error, not a hang.
        reply = await asyncio.wait_for(open_stream, 5)
        name, data = reply.sse_events()[-1]
        assert name == "error" and data["code"] == "redis_unavailable"
        # New requests are refused at once with a clear JSON error.
        started = time.monotonic()
        refused = await client.post("/chat_stream", json={"user_input": "while down"})
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503 and refused.json()["error"] == "redis_unavailable"
        openai_refused = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503 and openai_refused.status_code == 503
        # What a client reads names no host, port or library message: those are logged.
        for text in (json.dumps(data), refused.text, openai_refused.text, readiness.text):
            assert str(stack.redis_server.port) not in text and "Error" not in text and "refused" not in text, text
        await asyncio.sleep(1.0)
        stack.redis_server.start()  # Redis returns (empty: it kept no data)
        # Both processes are still the same ones, and serve again.
        await eventually(lambda: stack.redis.zcard("chatstream:generators") == 1, 10, "the generator to re-register")
        after = await stream_chat(client, "/chat_stream", {"user_input": "back again"}, sse=True)
    assert after.sse_events()[-1][0] == "done"
    assert api.alive() and generator.alive()


async def test_a_redis_that_stops_answering_ends_streams_with_an_error_not_a_hang(private_stack):
    """Redis frozen (SIGSTOP): its kernel still accepts connections and data, but no
    reply ever comes, as with a peer that hangs or a half-open connection. Every wait
    on Redis is bounded (read timeouts, the stream reader's own), so the open stream
    ends with a clear error, a new request is refused, and all serve again once Redis
    answers."""
    stack = private_stack
    quick = {"REDIS_RETRY_SECONDS": "2", "REDIS_SOCKET_TIMEOUT_SECONDS": "1"}
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="100", **quick))
    api = stack.api(quick)
    redis_proc = stack.redis_server.proc
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        open_stream = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "open"}, sse=True))
        await eventually(lambda: "started" in generator.log(), 5, "a stream to be open")
        await asyncio.sleep(0.3)
        redis_proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        # Liveness stays green throughout: a restart cannot fix Redis, and the reader,
        # retrying, is not wedged.
        liveness: list[int] = []

        async def probe_liveness() -> None:
            while True:
                liveness.append((await client.get("/healthz")).status_code)
                await asyncio.sleep(0.2)

        prober = asyncio.create_task(probe_liveness())
        try:
            reply = await asyncio.wait_for(open_stream, 15)
            ended_after = time.monotonic() - frozen_at
            prober.cancel()
            assert len(liveness) >= 5 and set(liveness) == {200}, liveness
            name, data = reply.sse_events()[-1]
            assert name == "error" and data["code"] == "redis_unavailable", reply.sse_events()[-3:]
            # Retries (2 s) after a read that timed out (block 1 s + 1 s), with a margin.
            assert ended_after < 8, ended_after
            started = time.monotonic()
            refused = await client.post("/chat_stream", json={"user_input": "while frozen"})
            assert refused.status_code == 503 and refused.json()["error"] == "redis_unavailable"
            assert time.monotonic() - started < 5, "refused within the read timeout, not hung"
        finally:
            redis_proc.send_signal(signal.SIGCONT)
        after = await asyncio.wait_for(stream_chat(client, "/chat_stream", {"user_input": "thawed"}, sse=True), 60)
    assert after.sse_events()[-1][0] == "done", after.sse_events()[-3:]
    assert api.alive() and generator.alive()
    print(f"stream ended {ended_after:.2f}s after Redis froze")


async def test_every_redis_connection_has_keepalive_and_a_user_timeout(redis_server, monkeypatch):
    """What lets an idle connection to a vanished node fail (no packet will ever
    come back): checked on the sockets themselves."""
    import socket

    from services.common.redis_client import connect
    from services.common.settings import CommonSettings

    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("REDIS_KEEPALIVE_SECONDS", "4")
    client = connect(CommonSettings())
    await client.ping()
    connection = await client.connection_pool.get_connection("PING")
    sock = connection._writer.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
    await client.connection_pool.release(connection)
    await client.aclose()
