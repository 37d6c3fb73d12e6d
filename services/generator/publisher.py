"""Writing a request's events to its Redis Stream, fenced by the request's lease."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from services.common.contract import (
    STREAM_MAXLEN,
    STREAM_TTL_SECONDS,
    EventType,
    Lease,
    StreamEvent,
    cancel_key,
    stream_key,
)
from services.common.semaphore import GENERATIONS, lease_check_lua

# KEYS: stream, holders, tokens, cancel; ARGV: holder ('' = unfenced), token, maxlen,
# then field/value pairs. Returns 1 written, 0 lease lost, 2 cancelled by the API.
# Checking the cancel key here, with every write, spares a separate check while
# tokens flow. NOMKSTREAM: once the API has deleted the stream (client gone), late
# writes must not recreate it as a key without a TTL.
_FENCED_XADD = (
    "if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end\n"
    "local lease_ok = true\n"
    "if ARGV[1] ~= '' then\n"
    + lease_check_lua("KEYS[2]", "KEYS[3]", "ARGV[1]", "ARGV[2]")
    + """
end
if not lease_ok then return 0 end
redis.call('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""
)

# KEYS: cancel, holders, tokens; ARGV: holder ('' = unfenced), token.
# Returns 'cancelled', 'lease_lost' or ''.
_CHECK = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 'cancelled' end\n"
    "if ARGV[1] == '' then return '' end\n"
    "local lease_ok\n"
    + lease_check_lua("KEYS[2]", "KEYS[3]", "ARGV[1]", "ARGV[2]")
    + "\nif lease_ok then return '' end\nreturn 'lease_lost'\n"
)


class LeaseLost(Exception):
    """The request's permit expired or passed to another holder: stop writing."""


class StreamPublisher:
    """Publishes the events of one request. Every write is fenced: it happens only
    while the request's lease is valid, checked atomically inside Redis."""

    def __init__(self, redis: Redis, request_id: str, worker_id: str, lease: Lease | None) -> None:
        self._redis = redis
        self._key = stream_key(request_id)
        self._cancel_key = cancel_key(request_id)
        self._worker_id = worker_id
        self._lease_args = [lease.holder_id, str(lease.fencing_token)] if lease else ["", ""]
        self._xadd = redis.register_script(_FENCED_XADD)
        self._check = redis.register_script(_CHECK)
        self.last_write = 0.0
        self.last_checked = 0.0  # when Redis last confirmed: not cancelled, lease valid
        self.cancelled = False  # the API asked to stop (seen by a write)

    async def publish(self, event: StreamEvent) -> None:
        """Append one event. Raises :class:`LeaseLost` when the lease is no longer
        valid; when the API has asked to stop, writes nothing and sets ``cancelled``."""
        args = [*self._lease_args, STREAM_MAXLEN]
        for name, value in event.to_fields().items():
            args += [name, value]
        result = await self._xadd(
            keys=[self._key, GENERATIONS.holders, GENERATIONS.tokens, self._cancel_key], args=args
        )
        if result == 0:
            raise LeaseLost(f"the lease of {self._key} is no longer valid")
        if result == 2:
            self.cancelled = True
            return
        self.last_write = self.last_checked = time.monotonic()

    async def publish_unfenced(self, event: StreamEvent) -> None:
        """Append a terminal error even without a lease: telling the client why its
        stream ends acts on no shared resource."""
        await self._redis.xadd(self._key, event.to_fields(), maxlen=STREAM_MAXLEN, approximate=True, nomkstream=True)

    async def start(self) -> None:
        """First entry: tells the API which worker took the job; sets the key's TTL."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(
                self._key,
                StreamEvent(EventType.START, worker=self._worker_id).to_fields(),
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            pipe.expire(self._key, STREAM_TTL_SECONDS)
            await pipe.execute()
        self.last_write = time.monotonic()

    async def token(self, text: str) -> None:
        """A decoded text delta."""
        await self.publish(StreamEvent(EventType.TOKEN, text=text))

    async def tokens(self, texts: list[str]) -> None:
        """Several decoded deltas as one entry (one write, one chunk for the client)."""
        await self.publish(StreamEvent(EventType.TOKEN, text="".join(texts), tokens=len(texts)))

    async def heartbeat(self) -> None:
        """Proof of life while no token is produced."""
        await self.publish(StreamEvent(EventType.HEARTBEAT))

    async def touch(self) -> None:
        """Push the key's expiry forward during a long generation."""
        await self._redis.expire(self._key, STREAM_TTL_SECONDS)

    async def should_stop(self) -> str:
        """'cancelled' when the API asked to stop, 'lease_lost' when the permit is gone,
        else ''."""
        result = await self._check(
            keys=[self._cancel_key, GENERATIONS.holders, GENERATIONS.tokens], args=self._lease_args
        )
        self.last_checked = time.monotonic()
        return result.decode() if isinstance(result, bytes) else str(result)
