"""The watchdog: a pod whose essential loop is wedged says so to Kubernetes.

A wedged loop leaves a process that still answers HTTP and Redis, so only the loop's
own progress tells. Provoked for real: a generator whose engine hangs mid-reply (the
synthetic backend's stall drill, deaf to cancellation like a hung GPU), and a stream
reader whose read never returns (Redis frozen with SIGSTOP under a read timeout far
longer than the watchdog's limit).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
from redis.asyncio import Redis

from services.api.health import liveness
from services.api.stream_reader import StreamReader
from services.common.contract import GENERATORS_KEY
from services.common.semaphore import GENERATIONS
from services.common.watchdog import Progress, stalls
from tests.conftest import synthetic_generator_env
from tests.support.client import scrape, stream_chat
from tests.support.processes import REPO, eventually

#: The smallest limit the settings accept with a 0.5 s socket timeout: four commands
#: of 2 s connect + 0.5 s read, plus the 0.5 s idle poll.
STALL_SECONDS = 11.0


def test_progress_counts_only_while_busy_and_resets_when_it_moves():
    progress = Progress("loop")
    assert progress.stalled_for(time.monotonic() + 100) == 0, "an idle loop is never stalled"
    with progress.working():
        start = time.monotonic()
        assert 9.9 < progress.stalled_for(start + 10) <= 10.1
        progress.moved()
        assert progress.stalled_for(time.monotonic()) < 0.1
        with progress.working():  # nested work does not restart the clock
            assert progress.stalled_for(start + 10) > 9.8
        assert progress.busy
    assert not progress.busy and stalls([progress], 1) == []
    always = Progress("poll", always_busy=True)
    assert always.busy and stalls([always], 0) == [], "limit 0: the watchdog is off"


async def test_a_generator_whose_engine_hangs_ends_its_streams_withdraws_and_fails_its_probe(stack):
    env = synthetic_generator_env(
        tokens_per_second=20,
        MAX_NEW_TOKENS="50",
        SYNTHETIC_STALL_AFTER_TOKENS="3",
        GENERATOR_STALL_SECONDS=f"{STALL_SECONDS:g}",
        REDIS_SOCKET_TIMEOUT_SECONDS="0.5",
        REGISTRATION_TTL_SECONDS="3",
    )
    stuck = stack.generator(env)
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "2"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        started = time.monotonic()
        reply = await stream_chat(client, "/chat_stream", {"user_input": "hang"}, sse=True)
        ended_after = time.monotonic() - started
        events = reply.sse_events()
        assert [name for name, _ in events if name == "token"] and events[-1][0] == "error", events
        assert events[-1][1]["code"] == "generator_stalled", events[-1]
        # 3 tokens (0.15 s), then the limit, then at most one registration turn (1 s).
        assert STALL_SECONDS < ended_after < STALL_SECONDS + 3, ended_after

        # The permit came back, the registration is gone and stays gone, and the
        # probe (liveness mode, as Kubernetes runs it) fails. (The generator releases the
        # permit right after writing the error entry, so the client can read the error a
        # moment before the release lands: CI saw the permit still held at this line once.)
        await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 1, "the permit back")
        await eventually(lambda: stack.redis.zscore(GENERATORS_KEY, stuck.worker_id) is None, 3, "the registration withdrawn")
        await asyncio.sleep(1.5)
        assert stack.redis.zscore(GENERATORS_KEY, stuck.worker_id) is None
        probe = subprocess.run(
            [sys.executable, "-m", "services.generator.probe", "--liveness"],
            env={**os.environ, **stack.env(env), "WORKER_ID": stuck.worker_id},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode == 1, (probe.returncode, probe.stderr)
        stuck_metrics = scrape(f"http://127.0.0.1:{stuck.metrics_port}/metrics")
        assert stuck_metrics["chatstream_generator_stalled"] == 1
        assert stuck_metrics['chatstream_generator_jobs_total{outcome="error:generator_stalled"}'] == 1

        # The stuck generator takes no more jobs: a healthy one serves the next request.
        healthy = stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="5"))
        after = await stream_chat(client, "/chat_stream", {"user_input": "next"}, sse=True)
        assert after.sse_events()[-1][0] == "done", after.sse_events()[-3:]
        assert scrape(f"http://127.0.0.1:{healthy.metrics_port}/metrics")['chatstream_generator_jobs_total{outcome="length"}'] == 1
        stuck_jobs = {k: v for k, v in scrape(f"http://127.0.0.1:{stuck.metrics_port}/metrics").items() if k.startswith("chatstream_generator_jobs_total{")}
        assert stuck_jobs == {'chatstream_generator_jobs_total{outcome="error:generator_stalled"}': 1}, stuck_jobs
    assert stuck.alive(), "the pod is restarted by Kubernetes (its probe), not by itself"
    print(f"generator_stalled {ended_after:.2f}s after the request (limit {STALL_SECONDS:g}s)")


async def test_a_stream_read_that_never_returns_fails_liveness(private_stack):
    """A read whose reply never comes (Redis frozen; a read timeout of 30 s, longer than
    any the API's settings allow with this limit) is a wedged reader: /healthz's check
    reports it; once the reply comes, the reader is healthy again."""
    server = private_stack.redis_server
    redis = Redis.from_url(server.url, socket_timeout=30)
    reader = StreamReader(redis)
    subscription = reader.resume("wedged")
    consumer = asyncio.create_task(_drain(subscription))
    try:
        await asyncio.sleep(2.5)  # reads return every block (1 s): moving
        assert reader.stalls(2.0) == []
        server.proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            await eventually(lambda: reader.stalls(2.0) != [], 5, "the reader to count as stalled")
            assert time.monotonic() - frozen_at < 2.0 + 1.0 + 0.5
            answer = await liveness(reader.stalls(2.0))
            body = json.loads(answer.body)
            assert answer.status_code == 503 and body["status"] == "stalled", body
            assert body["stalled"][0]["loop"].startswith("stream reader ") and body["stalled"][0]["seconds"] >= 2.0
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: reader.stalls(2.0) == [], 5, "the reader to move again once Redis answers")
        assert (await liveness(reader.stalls(2.0))).status_code == 200
    finally:
        consumer.cancel()
        subscription.close()
        await reader.close()
        await redis.aclose()


async def _drain(subscription) -> None:
    async for _ in subscription.events(3600):
        pass
