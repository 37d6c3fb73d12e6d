"""Writing a request's events to its Redis Stream."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from services.common.contract import (
    STREAM_MAXLEN,
    STREAM_TTL_SECONDS,
    EventType,
    StreamEvent,
    stream_key,
)


class StreamPublisher:
    """Publishes the events of one request; remembers when it last wrote, so the
    job can send heartbeats only when the stream has been quiet."""

    def __init__(self, redis: Redis, request_id: str, worker_id: str) -> None:
        self._redis = redis
        self._key = stream_key(request_id)
        self._worker_id = worker_id
        self.last_write = 0.0

    async def publish(self, event: StreamEvent) -> None:
        """Append one event (one XADD; the key's TTL is kept alive by :meth:`touch`)."""
        # NOMKSTREAM: once the API has deleted the stream (client gone), late writes
        # must not recreate it as a key without a TTL.
        await self._redis.xadd(
            self._key, event.to_fields(), maxlen=STREAM_MAXLEN, approximate=True, nomkstream=True
        )
        self.last_write = time.monotonic()

    async def start(self) -> None:
        """First entry: tells the API which worker took the job; sets the key's TTL."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._key, StreamEvent(EventType.START, worker=self._worker_id).to_fields(), maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(self._key, STREAM_TTL_SECONDS)
            await pipe.execute()
        self.last_write = time.monotonic()

    async def token(self, text: str) -> None:
        """A decoded text delta."""
        await self.publish(StreamEvent(EventType.TOKEN, text=text))

    async def heartbeat(self) -> None:
        """Proof of life while no token is produced."""
        await self.publish(StreamEvent(EventType.HEARTBEAT))

    async def touch(self) -> None:
        """Push the key's expiry forward during a long generation."""
        await self._redis.expire(self._key, STREAM_TTL_SECONDS)
