"""The multiplexing stream reader against a real Redis: many streams over a few
connections, nothing lost or reordered, prompt pick-up of new streams, errors
reaching every consumer."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.api import stream_reader
from services.api.relay import GeneratorLost
from services.api.stream_reader import StreamReader
from services.common.contract import EventType, StreamEvent, stream_key
from tests.support.processes import free_port


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    redis_server.client.flushall()
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def write(redis: Redis, request_id: str, event: StreamEvent) -> None:
    await redis.xadd(stream_key(request_id), event.to_fields())


async def collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in events]


def token_text(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if e.type is EventType.TOKEN)


async def test_many_interleaved_streams_arrive_complete_and_in_order(redis: Redis) -> None:
    reader = StreamReader(redis, connections=2)
    ids = [f"req{i}" for i in range(60)]
    tokens = 40
    consumers = [asyncio.create_task(collect(reader.read_events(rid, silence_limit=5))) for rid in ids]
    await asyncio.sleep(0.05)
    for rid in ids:
        await write(redis, rid, StreamEvent(EventType.START, worker="w"))
    rng = random.Random(7)
    pending = {rid: 0 for rid in ids}
    while pending:
        rid = rng.choice(list(pending))
        await write(redis, rid, StreamEvent(EventType.TOKEN, text=f"<{pending[rid]}>"))
        pending[rid] += 1
        if rng.random() < 0.05:
            await write(redis, rid, StreamEvent(EventType.HEARTBEAT))
        if pending[rid] == tokens:
            await write(redis, rid, StreamEvent(EventType.DONE, finish_reason="length", completion_tokens=tokens))
            del pending[rid]
        if rng.random() < 0.1:
            await asyncio.sleep(0)  # let the readers interleave with the writes
    results = await asyncio.wait_for(asyncio.gather(*consumers), 20)
    expected = "".join(f"<{i}>" for i in range(tokens))
    for events in results:
        assert events[0].type is EventType.START
        assert events[-1].type is EventType.DONE and events[-1].completion_tokens == tokens
        assert all(e.type is not EventType.HEARTBEAT for e in events)
        assert token_text(events) == expected
    assert reader.streams == 0
    await reader.close()


async def test_entries_written_before_the_read_began_are_not_lost(redis: Redis) -> None:
    reader = StreamReader(redis)
    await write(redis, "early", StreamEvent(EventType.START))
    await write(redis, "early", StreamEvent(EventType.TOKEN, text="a"))
    await write(redis, "early", StreamEvent(EventType.DONE, finish_reason="stop"))
    events = await asyncio.wait_for(collect(reader.read_events("early", silence_limit=5)), 5)
    assert [e.type for e in events] == [EventType.START, EventType.TOKEN, EventType.DONE]
    await reader.close()


async def test_tokens_read_together_come_as_one_event(redis: Redis) -> None:
    reader = StreamReader(redis)
    await write(redis, "burst", StreamEvent(EventType.START))
    for word in ["one", " two", " three"]:
        await write(redis, "burst", StreamEvent(EventType.TOKEN, text=word))
    await write(redis, "burst", StreamEvent(EventType.DONE, finish_reason="stop"))
    events = await asyncio.wait_for(collect(reader.read_events("burst", silence_limit=5)), 5)
    assert [(e.type, e.text) for e in events[:2]] == [(EventType.START, ""), (EventType.TOKEN, "one two three")]
    assert events[2].type is EventType.DONE
    await reader.close()


async def test_stream_added_while_a_read_is_blocked_is_picked_up_promptly(redis: Redis) -> None:
    # A 30 s block: only the wake-up can make the new stream's first entry arrive in time.
    reader = StreamReader(redis, block_ms=30_000)
    first = reader.read_events("first", silence_limit=60)
    first_task = asyncio.create_task(anext(first))
    await asyncio.sleep(0.2)  # the reader is now blocked on "first" alone
    second = reader.read_events("second", silence_limit=60)
    second_task = asyncio.create_task(anext(second))
    await asyncio.sleep(0.05)
    sent = time.monotonic()
    await write(redis, "second", StreamEvent(EventType.START))
    event = await asyncio.wait_for(second_task, 5)
    assert event.type is EventType.START
    assert time.monotonic() - sent < 0.1
    first_task.cancel()
    await second.aclose()
    await reader.close()


async def test_a_stream_that_is_left_is_no_longer_read(redis: Redis) -> None:
    reader = StreamReader(redis, block_ms=200)
    events = reader.read_events("left", silence_limit=5)
    await write(redis, "left", StreamEvent(EventType.START))
    assert (await asyncio.wait_for(anext(events), 5)).type is EventType.START
    assert reader.streams == 1
    await events.aclose()  # the client went away
    assert reader.streams == 0
    await write(redis, "left", StreamEvent(EventType.TOKEN, text="late"))  # dropped, harms nobody
    await write(redis, "next", StreamEvent(EventType.START))
    await write(redis, "next", StreamEvent(EventType.DONE, finish_reason="stop"))
    assert len(await asyncio.wait_for(collect(reader.read_events("next", silence_limit=5)), 5)) == 2
    await reader.close()


async def test_many_streams_share_a_bounded_number_of_connections(redis: Redis, redis_server) -> None:
    reader = StreamReader(redis, connections=2)
    consumers = [asyncio.create_task(collect(reader.read_events(f"s{i}", silence_limit=5))) for i in range(200)]
    await asyncio.sleep(0.3)
    clients = redis_server.client.client_list()
    assert sum(1 for c in clients if c["cmd"] == "xread") <= 2
    assert len(clients) <= 2 + 3  # the readers, a wake-up, this check
    for i in range(200):
        await write(redis, f"s{i}", StreamEvent(EventType.DONE, finish_reason="stop"))
    await asyncio.wait_for(asyncio.gather(*consumers), 10)
    await reader.close()


async def test_silence_after_start_raises_generator_lost_and_heartbeats_keep_it_alive(redis: Redis) -> None:
    reader = StreamReader(redis)
    events = reader.read_events("quiet", silence_limit=0.5)
    await write(redis, "quiet", StreamEvent(EventType.START))
    assert (await anext(events)).type is EventType.START
    for _ in range(4):  # 1.2 s of heartbeats only: alive, and nothing is yielded
        await asyncio.sleep(0.3)
        await write(redis, "quiet", StreamEvent(EventType.HEARTBEAT))
    waited = time.monotonic()
    with pytest.raises(GeneratorLost):
        await anext(events)
    assert 0.3 < time.monotonic() - waited < 1.0
    await reader.close()


async def test_no_silence_limit_before_the_generator_started(redis: Redis) -> None:
    reader = StreamReader(redis)
    events = reader.read_events("queued", silence_limit=0.2)
    task = asyncio.create_task(anext(events))
    await asyncio.sleep(0.6)
    assert not task.done()
    await write(redis, "queued", StreamEvent(EventType.START))
    assert (await asyncio.wait_for(task, 5)).type is EventType.START
    await events.aclose()
    await reader.close()


async def test_a_failed_read_raises_in_every_consumer(redis: Redis) -> None:
    reader = StreamReader(redis)
    consumers = [asyncio.create_task(collect(reader.read_events(f"e{i}", silence_limit=5))) for i in range(5)]
    await asyncio.sleep(0.1)
    # A key of the wrong type makes the shared XREAD fail as a whole.
    await redis.set(stream_key("poison"), "not a stream")
    poisoned = asyncio.create_task(collect(reader.read_events("poison", silence_limit=5)))
    results = await asyncio.wait_for(asyncio.gather(*consumers, poisoned, return_exceptions=True), 5)
    assert all(isinstance(r, ResponseError) for r in results), results
    assert reader.streams == 0
    # The reader recovers for later streams.
    await write(redis, "after", StreamEvent(EventType.DONE, finish_reason="stop"))
    assert len(await asyncio.wait_for(collect(reader.read_events("after", silence_limit=5)), 5)) == 1
    await reader.close()


async def test_unreachable_redis_raises_a_connection_error_in_every_consumer_after_retrying() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    reader = StreamReader(dead, retry_seconds=1.0)
    started = time.monotonic()
    consumers = [asyncio.create_task(collect(reader.read_events(f"d{i}", silence_limit=5))) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*consumers, return_exceptions=True), 5)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert time.monotonic() - started >= 1.0, "it retried for retry_seconds first"
    await reader.close()
    await dead.aclose()


async def test_a_dropped_connection_costs_no_stream_anything(redis: Redis, redis_server) -> None:
    """The server closes every client connection mid-stream (CLIENT KILL, as a Redis
    restart or a proxy reset would): the reader reconnects and each stream goes on
    from its last delivered entry, complete, in order, without a duplicate."""
    reader = StreamReader(redis)
    ids = [f"k{i}" for i in range(8)]
    for request_id in ids:
        await write(redis, request_id, StreamEvent(EventType.START, worker="w"))
    consumers = [asyncio.create_task(collect(reader.read_events(request_id, silence_limit=5))) for request_id in ids]
    killer = Redis.from_url(redis_server.url)
    for n in range(40):
        for request_id in ids:
            await write(redis, request_id, StreamEvent(EventType.TOKEN, text=f"{n} "))
        if n in (10, 25):
            assert await killer.client_kill_filter(_type="normal", skipme=True) >= 1
        await asyncio.sleep(0.01)
    for request_id in ids:
        await write(redis, request_id, StreamEvent(EventType.DONE, finish_reason="stop"))
    results = await asyncio.wait_for(asyncio.gather(*consumers), 10)
    expected = "".join(f"{n} " for n in range(40))
    assert [token_text(events) for events in results] == [expected] * len(ids)
    assert all(events[-1].type is EventType.DONE for events in results)
    await killer.aclose()
    await reader.close()


async def test_module_level_read_events_is_a_drop_in_for_the_relay(redis: Redis) -> None:
    await write(redis, "dropin", StreamEvent(EventType.START))
    await write(redis, "dropin", StreamEvent(EventType.TOKEN, text="hi"))
    await write(redis, "dropin", StreamEvent(EventType.ERROR, code="generation_failed", message="boom"))
    events = await asyncio.wait_for(collect(stream_reader.read_events(redis, "dropin", 5)), 5)
    assert [e.type for e in events] == [EventType.START, EventType.TOKEN, EventType.ERROR]
    assert stream_reader.shared_reader(redis) is stream_reader.shared_reader(redis)
    await stream_reader.shared_reader(redis).close()


async def _tokens_per_read(redis: Redis, streams: int, rounds: int, max_read_pause: float) -> float:
    """Tokens relayed per XREAD while ``streams`` streams each get ``rounds`` tokens,
    written one XADD at a time, as generators do; checks every token arrived in order."""
    reader = StreamReader(redis, max_read_pause=max_read_pause)
    ids = [f"paced{streams}-{max_read_pause}-{i}" for i in range(streams)]
    consumers = [asyncio.create_task(collect(reader.read_events(rid, silence_limit=10))) for rid in ids]
    writer = Redis(connection_pool=redis.connection_pool)
    for rid in ids:
        await write(writer, rid, StreamEvent(EventType.START, worker="w"))
    await asyncio.sleep(0.05)
    await redis.config_resetstat()
    for n in range(rounds):
        for rid in ids:
            await write(writer, rid, StreamEvent(EventType.TOKEN, text=f"<{n}>"))
    reads = int((await redis.info("commandstats")).get("cmdstat_xread", {}).get("calls", 0))
    for rid in ids:
        await write(writer, rid, StreamEvent(EventType.DONE, finish_reason="length", completion_tokens=rounds))
    results = await asyncio.wait_for(asyncio.gather(*consumers), 30)
    expected = "".join(f"<{n}>" for n in range(rounds))
    for events in results:
        assert token_text(events) == expected
        assert sum(e.tokens for e in events if e.type is EventType.TOKEN) == rounds
    await reader.close()
    return streams * rounds / max(reads, 1)


async def test_reads_are_paced_only_when_many_streams_are_open(redis: Redis) -> None:
    # 200 streams: each read is followed by a 2 ms pause, so tokens written meanwhile
    # (by a writer as fast as one loopback round trip per XADD) come in one read.
    unpaced = await _tokens_per_read(redis, streams=200, rounds=5, max_read_pause=0)
    paced = await _tokens_per_read(redis, streams=200, rounds=5, max_read_pause=0.01)
    assert paced >= 3 * unpaced, (paced, unpaced)
    # 10 streams: pausing would only add latency; a generous cap changes nothing.
    few = await _tokens_per_read(redis, streams=10, rounds=20, max_read_pause=0.05)
    assert few < paced / 3, (few, paced)


async def test_doorbell_reads_cover_only_the_streams_that_changed(redis: Redis) -> None:
    from services.generator.publisher import FencedWriter, StreamPublisher

    reader = StreamReader(redis, sweep_interval=60)  # only the first read covers everything
    idle = [await reader.subscribe(f"idle{i}") for i in range(200)]
    active = {f"active{i}": await reader.subscribe(f"active{i}") for i in range(10)}
    writer = FencedWriter(redis)
    publishers = {
        rid: StreamPublisher(redis, rid, "gen", None, writer, sub.notify_key) for rid, sub in active.items()
    }
    consumers = [asyncio.create_task(collect(sub.events(silence_limit=5))) for sub in active.values()]
    await asyncio.sleep(0.05)
    await redis.config_set("slowlog-log-slower-than", 0)
    await redis.config_set("slowlog-max-len", 10_000)
    await redis.slowlog_reset()
    try:
        for publisher in publishers.values():
            await publisher.start()
        for n in range(20):
            for publisher in publishers.values():
                await publisher.token(f"<{n}>")
            await asyncio.sleep(0.005)
        for publisher in publishers.values():
            await publisher.publish(StreamEvent(EventType.DONE, finish_reason="length", completion_tokens=20))
        results = await asyncio.wait_for(asyncio.gather(*consumers), 10)
        log = await redis.slowlog_get(10_000)
    finally:
        await redis.config_set("slowlog-log-slower-than", 10_000)
    expected = "".join(f"<{n}>" for n in range(20))
    for events in results:
        assert events[0].type is EventType.START and events[-1].type is EventType.DONE
        assert token_text(events) == expected
    reads = [entry["command"] for entry in log if entry["command"].startswith(b"XREAD")]
    assert len(reads) >= 10
    # Redis logs at most 32 arguments, then "... (N more arguments)": a read of the
    # 200 idle streams would show that.
    assert not [cmd for cmd in reads if b"more arguments" in cmd], "a read covered the idle streams"
    # XREAD COUNT n BLOCK ms STREAMS, then keys and ids of the doorbell and the streams.
    streams_per_read = [(len(cmd.split()) - 6) // 2 - 1 for cmd in reads]
    assert max(streams_per_read) <= 10
    for sub in idle:
        sub.close()
    await reader.close()


async def test_a_stream_whose_writer_never_rings_is_still_read_by_the_sweep(redis: Redis) -> None:
    reader = StreamReader(redis, sweep_interval=0.2)
    subscription = await reader.subscribe("silent-writer")
    consumer = asyncio.create_task(collect(subscription.events(silence_limit=5)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    # An older generator: writes the stream but knows nothing of the doorbell.
    await write(redis, "silent-writer", StreamEvent(EventType.START, worker="old"))
    await write(redis, "silent-writer", StreamEvent(EventType.TOKEN, text="late"))
    await write(redis, "silent-writer", StreamEvent(EventType.DONE, finish_reason="stop", completion_tokens=1))
    events = await asyncio.wait_for(consumer, 5)
    assert time.monotonic() - started < 1.5
    assert token_text(events) == "late" and events[-1].type is EventType.DONE
    subscription.close()
    await reader.close()


async def test_the_one_read_per_stream_baseline_decodes_entries_the_same_way(redis: Redis) -> None:
    from services.api import relay

    for event in [
        StreamEvent(EventType.START, worker="w"),
        StreamEvent(EventType.HEARTBEAT),
        StreamEvent(EventType.TOKEN, text="a"),
        StreamEvent(EventType.TOKEN, text="bc", tokens=2),
        StreamEvent(EventType.DONE, finish_reason="stop", completion_tokens=3),
        StreamEvent(EventType.TOKEN, text="after the end"),
    ]:
        await write(redis, "baseline", event)
    events = await asyncio.wait_for(collect(relay.read_events(redis, "baseline", 5)), 5)
    assert [(e.type, e.text, e.tokens) for e in events] == [
        (EventType.START, "", 1),
        (EventType.TOKEN, "a", 1),
        (EventType.TOKEN, "bc", 2),
        (EventType.DONE, "", 1),
    ]
