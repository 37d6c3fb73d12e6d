"""The generator claims the jobs a poll found in one Lua call, by arq's rule: a job
is claimed by setting its in-progress key, only if no worker holds that key and the
job is still queued and due."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from services.common.contract import GENERATORS_KEY, affinity_key
from services.common.semaphore import GENERATIONS
from services.generator.worker import _CLAIM_JOBS
from tests.support.processes import eventually


def claim_keys(queue: str, ids: list[str]) -> list[str]:
    keys = [queue, GENERATIONS.holders, GENERATORS_KEY]
    for job_id in ids:
        keys += [in_progress_key_prefix + job_id, job_key_prefix + job_id, affinity_key(job_id)]
    return keys


def claim_args(now: int, ttl_ms: int, free: int, ids: list[str], worker: str = "me", wait_ms: int = 20) -> list:
    return [now, ttl_ms, free, worker, wait_ms, *ids]


async def test_only_due_queued_unclaimed_jobs_are_claimed_once(redis_server) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = "claims-test:queue"
    now = timestamp_ms()
    await redis.delete(queue, *(in_progress_key_prefix + j for j in ("due", "taken", "later", "gone")))
    await redis.zadd(queue, {"due": now - 10, "taken": now - 10, "later": now + 60_000})
    await redis.set(in_progress_key_prefix + "taken", "1")
    await redis.zadd(GENERATIONS.holders, {"taken": time.time() + 60})  # its request's permit is live
    claim = redis.register_script(_CLAIM_JOBS)
    ids = ["due", "taken", "later", "gone"]
    keys = claim_keys(queue, ids)

    claimed, orphaned, _ = await claim(keys=keys, args=claim_args(now, 5000, 10, ids))
    assert claimed[::2] == [b"due"] and int(float(claimed[1])) == now - 10 and orphaned == []
    assert 0 < await redis.pttl(in_progress_key_prefix + "due") <= 5000
    # A second worker polling the same ids gets nothing: the first holds "due".
    assert await claim(keys=keys, args=claim_args(now, 5000, 10, ids)) == [[], [], -1]
    assert await redis.zscore(queue, "taken") is not None, "a job that runs under a live permit stays"
    await redis.zrem(GENERATIONS.holders, "taken")
    await redis.aclose()


async def test_a_job_whose_worker_died_and_whose_request_is_gone_is_removed(redis_server) -> None:
    """Its in-progress key outlives the dead worker (a failover can also lose arq's
    clean-up): without a live permit for its request nobody waits for it."""
    redis = Redis.from_url(redis_server.url)
    queue = "claims-test:queue3"
    now = timestamp_ms()
    ids = ["orphan", "expired-permit", "next"]
    await redis.delete(queue, *(in_progress_key_prefix + j for j in ids), *(job_key_prefix + j for j in ids))
    await redis.zadd(queue, {job: now - 100 + i for i, job in enumerate(ids)})
    for job in ids:
        await redis.set(job_key_prefix + job, "{}")
    for dead in ids[:2]:  # claimed 110 s ago (in-progress TTL 610 s)
        await redis.set(in_progress_key_prefix + dead, "1", px=500_000)
    await redis.zadd(GENERATIONS.holders, {"expired-permit": time.time() - 1})
    claim = redis.register_script(_CLAIM_JOBS)
    claimed, orphaned, _ = await claim(keys=claim_keys(queue, ids), args=claim_args(now, 610_000, 1, ids))
    assert claimed[::2] == [b"next"] and sorted(orphaned) == [b"expired-permit", b"orphan"]
    assert await redis.zrange(queue, 0, -1) == [b"next"]
    for dead in ids[:2]:
        assert not await redis.exists(job_key_prefix + dead, in_progress_key_prefix + dead)
    await redis.zrem(GENERATIONS.holders, "expired-permit")
    await redis.aclose()


async def test_claims_stop_at_the_free_slots_past_the_jobs_already_running(redis_server) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = "claims-test:queue2"
    now = timestamp_ms()
    ids = [f"job{i}" for i in range(6)]
    await redis.delete(queue, *(in_progress_key_prefix + j for j in ids))
    await redis.zadd(queue, {job: now - 100 + i for i, job in enumerate(ids)})
    for running in ids[:2]:  # the oldest two run already (a running job stays queued)
        await redis.set(in_progress_key_prefix + running, "1")
        await redis.zadd(GENERATIONS.holders, {running: time.time() + 60})
    claim = redis.register_script(_CLAIM_JOBS)
    claimed, _, _ = await claim(keys=claim_keys(queue, ids), args=claim_args(now, 5000, 3, ids))
    assert claimed[::2] == [b"job2", b"job3", b"job4"]
    await redis.zrem(GENERATIONS.holders, *ids[:2])
    assert not await redis.exists(in_progress_key_prefix + "job5")
    await redis.aclose()


async def test_a_busy_generator_takes_new_jobs_while_its_first_ones_run(stack) -> None:
    """Jobs enqueued while others run start at once, not when a running one ends (the
    queue lists running jobs first; offering only as many ids as free slots offered
    just those)."""
    import asyncio

    import httpx

    from tests.conftest import synthetic_generator_env
    from tests.support.client import stream_chat

    stack.generator(synthetic_generator_env(tokens_per_second=10, MAX_NEW_TOKENS="60", GENERATOR_SLOTS="4"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "4"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        first = [asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "a b"})) for _ in range(2)]
        await eventually(lambda: len(stack.redis.keys(in_progress_key_prefix + "*")) == 2, 10, "two jobs to run")
        later = [
            asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "c d"}, stop_after_chunks=1))
            for _ in range(2)
        ]
        # 60 tokens at 10/s: the first two run for 6 s; the later two start within a second.
        replies = await asyncio.wait_for(asyncio.gather(*later), 3)
        assert all(r.status == 200 and r.chunks for r in replies)
        assert not any(task.done() for task in first), "the first jobs ended: the check proves nothing"
        for task in first:
            task.cancel()


async def test_a_dead_workers_job_at_the_head_of_the_queue_holds_back_no_request(stack) -> None:
    """Seen after a failover: a one-slot generator skipped every later job until the
    dead worker's in-progress key expired (610 s). Now the request behind it starts
    at once and the orphan is removed, with a log line and a metric."""
    import httpx

    from arq.utils import timestamp_ms as now_ms
    from services.common.contract import QUEUE_NAME
    from tests.conftest import synthetic_generator_env
    from tests.support.client import scrape, stream_chat

    generator = stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="5", GENERATOR_SLOTS="1"))
    stack.redis.zadd(QUEUE_NAME, {"orphaned-job": now_ms() - 60_000})
    stack.redis.set(job_key_prefix + "orphaned-job", "{}")
    stack.redis.set(in_progress_key_prefix + "orphaned-job", "1", px=500_000)  # claimed 110 s ago
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await asyncio.wait_for(stream_chat(client, "/chat_stream", {"user_input": "behind it"}, sse=True), 5)
    assert reply.sse_events()[-1][0] == "done"
    assert stack.redis.zscore(QUEUE_NAME, "orphaned-job") is None
    assert not stack.redis.exists(job_key_prefix + "orphaned-job")
    assert "removed job orphaned-job from the queue" in generator.log()
    assert scrape(generator.metrics_url)["chatstream_generator_jobs_orphaned_total"] == 1
