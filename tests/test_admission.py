"""Cluster-wide admission through real API and generator processes."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from datetime import datetime

import httpx
from redis.asyncio import Redis

from services.common.contract import QUEUE_NAME
from services.common.semaphore import GENERATIONS, RedisSemaphore
from tests.apps.recording_app import CALLBACKS_KEY
from tests.conftest import synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.processes import eventually

_LOG_LINE = re.compile(r"^(\S+ \S+) INFO services\.generator\.job: request (\w+) (started|finished)", re.M)


def generation_intervals(*generators) -> dict[str, list[float]]:
    """request id → [start, end], from the generators' own log timestamps."""
    intervals: dict[str, list[float]] = {}
    for generator in generators:
        for stamp, request_id, what in _LOG_LINE.findall(generator.log()):
            t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            intervals.setdefault(request_id, [0.0, 0.0])[0 if what == "started" else 1] = t
    return intervals


def max_overlap(intervals: list[list[float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


async def semaphore_counts(stack) -> tuple[int, int]:
    client = Redis.from_url(stack.redis_server.url)
    try:
        return await RedisSemaphore(client, GENERATIONS, 1, 1, 0).counts()
    finally:
        await client.aclose()


async def test_twelve_requests_two_permits_two_apis_two_generators(stack):
    env = {"MAX_CONCURRENT_GENERATIONS": "2"}
    gen_env = synthetic_generator_env(tokens_per_second=50, MAX_NEW_TOKENS="15")
    generators = [stack.generator(gen_env), stack.generator(gen_env)]
    apis = [stack.api(env), stack.api(env)]
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = []
        for i in range(12):
            api = apis[i % 2]
            tasks.append(asyncio.create_task(stream_chat(client, api.base_url + "/chat_stream", {"user_input": f"r{i}"}, sse=True)))
            await asyncio.sleep(0.04)  # a known arrival order
        replies = await asyncio.gather(*tasks)
    assert [r.status for r in replies] == [200] * 12
    for i, reply in enumerate(replies):
        events = reply.sse_events()
        assert events[-1][0] == "done"
        assert "".join(d["text"] for n, d in events if n == "token").startswith(f"r{i}")
    waited = [r for r in replies if any(n == "queued" for n, _ in r.sse_events())]
    assert len(waited) >= 6, "most requests had to wait and were told their position"
    positions = [d["position"] for n, d in waited[-1].sse_events() if n == "queued"]
    # Its place only ever moved forward, to within the permits of the front: two
    # permits that free within one poll admit positions 1 and 2 at once.
    assert positions == sorted(positions, reverse=True) and positions[-1] <= 2, positions
    intervals = generation_intervals(*generators)
    order = [r.request_id for r in replies]
    assert set(intervals) == set(order)
    assert max_overlap(list(intervals.values())) <= 2
    started = sorted(order, key=lambda rid: intervals[rid][0])
    # Arrival order, up to a swap of two admitted together (two permits freed in one poll:
    # two generators then pick their jobs up in either order).
    assert all(abs(started.index(rid) - i) <= 1 for i, rid in enumerate(order)), ("generations must start in arrival order", started, order)
    assert await semaphore_counts(stack) == (0, 0)


async def test_full_queue_is_429_with_retry_after_and_queue_timeout_is_503(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="100"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT_SECONDS": "1.5", "RETRY_AFTER_SECONDS": "7"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        busy = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "busy"}))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 1, 5, "the permit to be taken")
        waiter = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "waits"}))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 1, 5, "a waiter")
        started = time.monotonic()
        rejected = await client.post("/chat_stream", json={"user_input": "one too many"})
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "7"
        assert rejected.json()["error"] == "too_many_requests"
        assert time.monotonic() - started < 1.0
        timed_out = await waiter
        assert timed_out.status == 503
        assert httpx.Response(200, content=timed_out.body).json()["error"] == "queue_timeout"
        await busy
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 5, "the permit to return")


async def test_disconnect_while_waiting_for_a_permit_leaves_the_queue_and_never_runs(stack):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="40"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1"}, app="tests.apps.recording_app:app")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        busy = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "busy"}))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 1, 5, "the permit to be taken")
        waiter = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "gives up"}, sse=True))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 1, 5, "a waiter")
        waiting_id = stack.redis.zrange(GENERATIONS.waiters, 0, -1)[0].decode()
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 0, 1, "the waiter to leave at once")
        await busy
    await eventually(lambda: any(e.decode() == f"{waiting_id} client_disconnected_before_streaming" for e in stack.redis.lrange(CALLBACKS_KEY, 0, -1)), 5, "the callback")
    assert stack.redis.zcard(QUEUE_NAME) == 0
    await asyncio.sleep(0.5)
    assert waiting_id not in generator.log()


async def test_killed_api_pod_returns_its_permit_and_its_queue_place(stack):
    lease = 1.5
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="400"))
    env = {"MAX_CONCURRENT_GENERATIONS": "1", "LEASE_SECONDS": str(lease), "RESUME_GRACE_SECONDS": "0"}
    doomed, survivor = stack.api(env), stack.api(env)
    async with httpx.AsyncClient(timeout=30) as client:
        holding = asyncio.create_task(stream_chat(client, doomed.base_url + "/chat_stream", {"user_input": "held"}))
        await eventually(lambda: "started" in generator.log(), 5, "the generation to start")
        waiting = asyncio.create_task(stream_chat(client, doomed.base_url + "/chat_stream", {"user_input": "waiting"}))
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 1, 5, "a waiter")
        doomed.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(holding, waiting, return_exceptions=True)
        while (await semaphore_counts(stack)) != (0, 0):
            assert time.monotonic() - killed_at < lease + 1, "the permit and the queue place must expire within the lease"
            await asyncio.sleep(0.05)
        # The generation owned its permit: it stopped because nobody reads it any more
        # (no grace here), and gave the permit back itself.
        await eventually(lambda: "stopping: abandoned" in generator.log(), 3, "the generator to stop")
        reply = await stream_chat(client, survivor.base_url + "/chat_stream", {"user_input": "after the crash"})
    assert reply.status == 200 and reply.text.startswith("after the crash")


async def test_permits_follow_the_slots_of_live_generators(stack):
    # Requests of ~1.6 s each (8 tokens at 5/s): the queue outlasts the second
    # generator's start-up, so the moment its slots count is not a race.
    gen_env = synthetic_generator_env(tokens_per_second=5, MAX_NEW_TOKENS="200", GENERATOR_SLOTS="2")
    stack.generator(gen_env)
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "10", "ADMISSION_FOLLOWS_GENERATORS": "true"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        tasks = [
            asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": f"x{i}"}, stop_after_chunks=8))
            for i in range(6)
        ]
        await eventually(lambda: stack.redis.zcard(GENERATIONS.waiters) == 4, 5, "four to wait")
        assert stack.redis.zcard(GENERATIONS.holders) == 2, "one generator with 2 slots: 2 permits"
        stack.generator(gen_env)  # scale out: two more slots
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) >= 4, 10, "permits to follow")
        replies = await asyncio.gather(*tasks)
    assert all(r.status == 200 and len(r.chunks) == 8 for r in replies)
