"""The generator claims the jobs a poll found in one Lua call, by arq's rule: a job
is claimed by setting its in-progress key, only if no worker holds that key and the
job is still queued and due."""

from __future__ import annotations

from redis.asyncio import Redis

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from services.generator.worker import _CLAIM_JOBS
from tests.support.processes import eventually


async def test_only_due_queued_unclaimed_jobs_are_claimed_once(redis_server) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = "claims-test:queue"
    now = timestamp_ms()
    await redis.delete(queue, *(in_progress_key_prefix + j for j in ("due", "taken", "later", "gone")))
    await redis.zadd(queue, {"due": now - 10, "taken": now - 10, "later": now + 60_000})
    await redis.set(in_progress_key_prefix + "taken", "1")
    claim = redis.register_script(_CLAIM_JOBS)
    ids = ["due", "taken", "later", "gone"]
    keys = [queue, *(in_progress_key_prefix + j for j in ids)]

    claimed = await claim(keys=keys, args=[now, 5000, 10, *ids])
    assert claimed[::2] == [b"due"] and int(float(claimed[1])) == now - 10
    assert 0 < await redis.pttl(in_progress_key_prefix + "due") <= 5000
    # A second worker polling the same ids gets nothing: the first holds "due".
    assert await claim(keys=keys, args=[now, 5000, 10, *ids]) == []
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
    claim = redis.register_script(_CLAIM_JOBS)
    keys = [queue, *(in_progress_key_prefix + j for j in ids)]
    claimed = await claim(keys=keys, args=[now, 5000, 3, *ids])
    assert claimed[::2] == [b"job2", b"job3", b"job4"]
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
