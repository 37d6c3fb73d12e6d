"""How a generator job turns an engine's deltas into stream entries: deltas produced
while a write is in flight go out together as one entry, and none is lost."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.common.contract import ChatMessage, EventType, GenerationJob, HistoryWindow, StreamEvent, stream_key
from services.generator.engine import FinishReason, Generation
from services.generator.job import JobRunner
from services.generator.sampling import ResolvedSampling
from services.generator.settings import GeneratorSettings


class PacedEngine:
    """Yields ``count`` numbered deltas, ``interval`` seconds apart (0: as fast as the
    event loop goes, far faster than a Redis round trip)."""

    model_id = "paced"
    keeps_prefixes = False

    def __init__(self, count: int, interval: float) -> None:
        self.count = count
        self.interval = interval

    def start(
        self,
        messages: list[ChatMessage],
        sampling: ResolvedSampling,
        cancel: threading.Event,
        history: HistoryWindow = HistoryWindow(),
        cache_salt: str = "",
    ) -> Generation:
        generation: Generation

        async def deltas() -> AsyncIterator[str]:
            for i in range(self.count):
                if cancel.is_set():
                    generation.finish_reason = FinishReason.CANCELLED
                    return
                await asyncio.sleep(self.interval)
                generation.completion_tokens += 1
                yield f"<{i}>"
            generation.finish_reason = FinishReason.LENGTH

        generation = Generation(deltas())
        return generation

    def close(self) -> None:
        """Nothing to release."""


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def run_job(redis: Redis, request_id: str, engine: PacedEngine) -> list[StreamEvent]:
    settings = GeneratorSettings(generator_backend="synthetic", worker_id="test-gen")
    runner = JobRunner(engine, redis, settings)
    outcome = await runner.run(GenerationJob(request_id=request_id, messages=[ChatMessage("user", "hi")]))
    assert outcome == "length"
    return [StreamEvent.from_fields(fields) for _, fields in await redis.xrange(stream_key(request_id))]


async def test_deltas_produced_during_a_write_are_written_together(redis: Redis) -> None:
    events = await run_job(redis, "burst", PacedEngine(300, 0))
    tokens = [e for e in events if e.type is EventType.TOKEN]
    assert "".join(e.text for e in tokens) == "".join(f"<{i}>" for i in range(300))
    assert sum(e.tokens for e in tokens) == 300
    assert len(tokens) < 300 / 3, f"{len(tokens)} entries for 300 deltas: nothing was coalesced"
    assert events[-1].type is EventType.DONE and events[-1].completion_tokens == 300


async def test_an_engine_slower_than_redis_gets_one_entry_per_delta(redis: Redis) -> None:
    # 20 ms between deltas, a write takes well under 1 ms: nothing waits to be coalesced.
    events = await run_job(redis, "paced", PacedEngine(15, 0.02))
    tokens = [e for e in events if e.type is EventType.TOKEN]
    assert [e.text for e in tokens] == [f"<{i}>" for i in range(15)]
    assert all(e.tokens == 1 for e in tokens)
