"""The generator's writes are fenced by the request's lease, atomically in Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.common.contract import Lease, cancel_key
from services.common.semaphore import GENERATIONS, RedisSemaphore
from services.generator.publisher import LeaseLost, StreamPublisher


@pytest.fixture
async def redis(redis_server):
    client = Redis.from_url(redis_server.url)
    await client.delete(*GENERATIONS.all)
    yield client
    await client.aclose()


async def test_a_write_after_the_lease_expired_is_refused_and_leaves_no_trace(redis):
    sem = RedisSemaphore(redis, GENERATIONS, limit=1, lease_seconds=0.3, max_waiting=5)
    first = await sem.acquire("fenced-1")
    publisher = StreamPublisher(redis, "fenced-1", "gen", Lease("fenced-1", first.fencing_token))
    await publisher.start()
    await publisher.token("before")
    await asyncio.sleep(0.4)  # nobody renewed: the permit is gone
    with pytest.raises(LeaseLost):
        await publisher.token("after")
    # Even once another request holds the same id's permit, the old token is refused.
    second = await sem.acquire("fenced-1")
    assert second.fencing_token > first.fencing_token
    with pytest.raises(LeaseLost):
        await publisher.token("stale")
    texts = [f.get(b"text") for _, f in await redis.xrange("chatstream:stream:fenced-1")]
    assert texts == [None, b"before"]
    assert await publisher.should_stop() == "lease_lost"
    await sem.release("fenced-1")


async def test_a_write_after_the_api_cancelled_is_dropped_and_reported(redis):
    sem = RedisSemaphore(redis, GENERATIONS, limit=1, lease_seconds=5, max_waiting=5)
    lease = await sem.acquire("fenced-2")
    publisher = StreamPublisher(redis, "fenced-2", "gen", Lease("fenced-2", lease.fencing_token))
    await publisher.start()
    await publisher.token("kept")
    await redis.set(cancel_key("fenced-2"), 1, ex=10)
    await publisher.token("dropped")
    assert publisher.cancelled
    texts = [f.get(b"text") for _, f in await redis.xrange("chatstream:stream:fenced-2")]
    assert texts == [None, b"kept"]
    await sem.release("fenced-2")
