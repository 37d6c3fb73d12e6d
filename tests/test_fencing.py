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


async def test_writes_of_many_requests_share_calls_and_keep_their_own_fate(redis):
    from services.common.contract import EventType, StreamEvent, stream_key
    from services.generator.publisher import FencedWriter

    short = RedisSemaphore(redis, GENERATIONS, limit=100, lease_seconds=0.3, max_waiting=5)
    sem = RedisSemaphore(redis, GENERATIONS, limit=100, lease_seconds=30, max_waiting=5)
    writer = FencedWriter(redis)
    expired = await short.acquire("batch-expired")
    await asyncio.sleep(0.4)  # nobody renewed
    live = {f"batch-{i}": await sem.acquire(f"batch-{i}") for i in range(40)}
    publishers = {
        rid: StreamPublisher(redis, rid, "gen", Lease(rid, lease.fencing_token), writer) for rid, lease in live.items()
    }
    for publisher in publishers.values():
        await publisher.start()
    lost = StreamPublisher(redis, "batch-expired", "gen", Lease("batch-expired", expired.fencing_token), writer)
    await redis.set(cancel_key("batch-1"), 1, ex=10)
    await redis.config_resetstat()

    async def stream(rid: str, publisher: StreamPublisher) -> None:
        for n in range(10):
            await publisher.token(f"<{n}>")

    # One call carries writes of all three fates: the expired lease is refused, the
    # cancelled request is told so, the others are written.
    results = await asyncio.gather(
        lost.token("x"), publishers["batch-1"].token("y"), publishers["batch-2"].token("z"), return_exceptions=True
    )
    assert isinstance(results[0], LeaseLost) and results[1:] == [None, None]
    assert publishers["batch-1"].cancelled and not publishers["batch-2"].cancelled
    others = {rid: p for rid, p in publishers.items() if rid not in ("batch-1", "batch-2")}
    await asyncio.gather(*(stream(rid, p) for rid, p in others.items()))
    calls = int((await redis.info("commandstats"))["cmdstat_evalsha"]["calls"])
    assert calls <= 1 + 10 * len(others) / 4, f"{calls} script calls for {10 * len(others)} writes"
    for rid in others:
        events = [StreamEvent.from_fields(f) for _, f in await redis.xrange(stream_key(rid))]
        assert [e.text for e in events if e.type is EventType.TOKEN] == [f"<{n}>" for n in range(10)]
    assert [f.get(b"text") for _, f in await redis.xrange(stream_key("batch-2"))] == [None, b"z"]
    assert await redis.xlen(stream_key("batch-1")) == 1  # only its start entry
    assert not await redis.exists(stream_key("batch-expired"))
    for rid in live:
        await sem.release(rid)


async def test_a_write_that_finds_no_redis_is_retried_and_the_stream_made_whole_again(redis, redis_server):
    """A failover can lose entries the old primary acknowledged (replication is
    asynchronous) and drops the generator's connection: the next write reconnects,
    reads which entries the stream has, and writes the missing ones again, in order,
    under their own ids; nothing is doubled."""
    from services.common.contract import stream_key

    sem = RedisSemaphore(redis, GENERATIONS, limit=1, lease_seconds=30, max_waiting=5)
    lease = await sem.acquire("rewritten")
    generator = Redis.from_url(redis_server.url)  # the generator's own client
    publisher = StreamPublisher(generator, "rewritten", "gen", Lease("rewritten", lease.fencing_token), retry_seconds=5)
    await publisher.start()
    for n in range(5):
        await publisher.token(f"<{n}>")
    key = stream_key("rewritten")
    # The new primary's stream ends at 0-4: the last two acknowledged entries are lost...
    kept = await redis.xrange(key, "-", "0-4")
    await redis.delete(key)
    for entry_id, fields in kept:
        await redis.xadd(key, fields, id=entry_id)
    # ...and the generator's connections are gone.
    assert await redis.client_kill_filter(_type="normal", skipme=True) >= 1
    await publisher.token("<5>")
    entries = await redis.xrange(key)
    assert [entry_id.decode() for entry_id, _ in entries] == [f"0-{n}" for n in range(1, 8)]
    assert [f.get(b"text") for _, f in entries] == [None, *(f"<{n}>".encode() for n in range(6))]
    await generator.aclose()
    await sem.release("rewritten")
