"""Writing a request's events to its Redis Stream, fenced by the request's lease."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.contract import (
    DOORBELL_FIELD,
    DOORBELL_MAXLEN,
    STREAM_MAXLEN,
    STREAM_TTL_SECONDS,
    EventType,
    Lease,
    StreamEvent,
    cancel_key,
    stream_key,
)
from services.common.contract import GENERATIONS
from services.common.semaphore import lease_check_lua

logger = logging.getLogger(__name__)

# Several fenced writes, of any number of requests, in one call.
# KEYS: holders, tokens, then per write: stream, cancel, readers, doorbell.
# ARGV: maxlen, then per write: entry number, holder ('' = unfenced), token, ring ('1'
# or ''), readers ('1': stop when the readers key is gone), field count, fields...
# Returns per write: 1 written (or there already), 0 lease lost, 2 cancelled by the
# API, 3 nobody reads, 4 the stream lacks earlier entries.
# Entry n has the id 0-n (see StreamPublisher), and is added only right after entry
# n - 1: a write retried after a lost reply whose first try did land is not doubled,
# and a stream that lost its last entries in a failover (replication is
# asynchronous; the client may have reconnected to the new primary without an error)
# is reported, and completed again by the publisher, instead of getting a gap.
# Checking the cancel and readers keys here, with every write, spares a separate
# check while tokens flow. NOMKSTREAM: once the API has deleted the stream (client
# gone), or its reader's doorbell is gone (API process gone), late writes must not
# recreate them as keys without a TTL.
_FENCED_XADDS = (
    """
local results = {}
local a = 2
for i = 1, (#KEYS - 2) / 4 do
  local stream, cancel, readers, doorbell = KEYS[4 * i - 1], KEYS[4 * i], KEYS[4 * i + 1], KEYS[4 * i + 2]
  local number, holder, token, ring, check_readers = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local n = tonumber(ARGV[a + 5])
  local first = a + 6
  a = first + n
  if redis.call('EXISTS', cancel) == 1 then
    results[i] = 2
  elseif check_readers == '1' and redis.call('EXISTS', readers) == 0 then
    results[i] = 3
  else
    local lease_ok = true
    if holder ~= '' then
"""
    + lease_check_lua("KEYS[1]", "KEYS[2]", "holder", "token")
    + f"""
    end
    if lease_ok then
      local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      local have = 0
      if #top > 0 then have = tonumber(string.match(top[1][1], '-(%d+)$')) end
      if have >= number then
        results[i] = 1
      elseif have < number - 1 then
        results[i] = 4
      else
        redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', ARGV[1], '0-' .. number, unpack(ARGV, first, a - 1))
        if ring == '1' then
          redis.call('XADD', doorbell, 'NOMKSTREAM', 'MAXLEN', '~', {DOORBELL_MAXLEN}, '*', '{DOORBELL_FIELD}', stream)
        end
        results[i] = 1
      end
    else
      results[i] = 0
    end
  end
end
return results
"""
)

#: Most writes sent in one script call (a Lua script blocks Redis while it runs).
MAX_WRITES_PER_CALL = 256


class FencedWriter:
    """Sends the fenced stream writes of every job of a process, several per call.

    A write waits only for the call in flight, if any: the writes queued meanwhile
    (other requests' tokens from the same decode step, or from concurrent jobs) go
    together in the next call. One round trip and one script run then carry many
    tokens, which is most of Redis's and the generator's cost per token when
    hundreds of streams are open; an idle writer sends a write at once.
    """

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_FENCED_XADDS)
        self._pending: list[tuple[list[str], list[str], asyncio.Future[int]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def write(
        self,
        stream: str,
        cancel: str,
        readers: str,
        doorbell: str,
        lease_args: list[str],
        number: int,
        fields: dict[str, str],
    ) -> int:
        """Append ``fields`` to ``stream`` as its entry ``number`` (id ``0-number``; and
        announce it on ``doorbell``, unless '') if the lease holds, ``cancel`` is unset,
        ``readers`` (unless '') exists and the stream has entry ``number - 1``; returns
        1 written (or there already), 0 lease lost, 2 cancelled, 3 nobody reads,
        4 earlier entries missing."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        args = [str(number), *lease_args, "1" if doorbell else "", "1" if readers else "", str(2 * len(fields))]
        for name, value in fields.items():
            args += [name, value]
        self._pending.append(([stream, cancel, readers or stream, doorbell or stream], args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_WRITES_PER_CALL]
            del self._pending[:MAX_WRITES_PER_CALL]
            keys = [GENERATIONS.holders, GENERATIONS.tokens]
            args: list[str | int] = [STREAM_MAXLEN]
            for write_keys, write_args, _ in batch:
                keys += write_keys
                args += write_args
            try:
                results = await self._script(keys=keys, args=args)
            except Exception as exc:  # every write of the call failed the same way
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results):
                if not future.done():  # its job may have been cancelled meanwhile
                    future.set_result(int(result))


# KEYS: cancel, holders, tokens, readers; ARGV: holder ('' = unfenced), token,
# readers ('1' to check it). Returns 'cancelled', 'abandoned', 'lease_lost' or ''.
_CHECK = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 'cancelled' end\n"
    "if ARGV[3] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then return 'abandoned' end\n"
    "if ARGV[1] == '' then return '' end\n"
    "local lease_ok\n"
    + lease_check_lua("KEYS[2]", "KEYS[3]", "ARGV[1]", "ARGV[2]")
    + "\nif lease_ok then return '' end\nreturn 'lease_lost'\n"
)


class LeaseLost(Exception):
    """The request's permit expired or passed to another holder: stop writing."""


#: A write that failed for want of Redis is retried after this, doubling up to the max.
_RETRY_PAUSE = 0.05
_RETRY_PAUSE_MAX = 0.5

#: FencedWriter's answer when the stream lacks entries before the one written.
BEHIND = 4

#: Errors that say Redis could not be reached, not that it refused the command.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class StreamPublisher:
    """Publishes the events of one request. Every write is fenced: it happens only
    while the request's lease is valid, checked atomically inside Redis.

    The publisher is its stream's only writer and numbers its entries itself
    (``0-1``, ``0-2``, ...), one write at a time. A write that fails for want of
    Redis (a dropped connection, a failover) is retried for ``retry_seconds``: the
    stream's top entry says which of its entries Redis has, and those after it are
    written again in order. So a retried write is never doubled, and entries that a
    failed-over primary acknowledged but never passed to its replica are written
    again: the stream stays whole, and the reader that had them sees nothing twice.
    """

    def __init__(
        self,
        redis: Redis,
        request_id: str,
        worker_id: str,
        lease: Lease | None,
        writer: FencedWriter | None = None,
        doorbell: str = "",
        readers: str = "",
        retry_seconds: float = 10.0,
    ) -> None:
        self._redis = redis
        self._writer = writer or FencedWriter(redis)
        self._doorbell = doorbell  # the reading API's (job.notify_key), or ''
        self._key = stream_key(request_id)
        self._cancel_key = cancel_key(request_id)
        self._readers = readers  # job.readers_key: stop once no client reads, or ''
        self.owns_lease = bool(lease and lease.seconds > 0)
        self._worker_id = worker_id
        self._lease_args = [lease.holder_id, str(lease.fencing_token)] if lease else ["", ""]
        self._check = redis.register_script(_CHECK)
        self._retry_seconds = retry_seconds
        #: Every entry so far, entry n (id 0-n) at index n - 1, and whether it is fenced.
        self._entries: list[tuple[dict[str, str], bool]] = []
        self._one_at_a_time = asyncio.Lock()
        self.last_write = 0.0
        self.last_checked = 0.0  # when Redis last confirmed: not cancelled, lease valid
        self.cancelled = False  # the API asked to stop, or nobody reads any more (seen by a write)
        self.abandoned = False  # the latter

    async def publish(self, event: StreamEvent) -> None:
        """Append one event. Raises :class:`LeaseLost` when the lease is no longer
        valid; when the API has asked to stop, writes nothing and sets ``cancelled``."""
        result = await self._append(event.to_fields(), fenced=True)
        if result == 0:
            raise LeaseLost(f"the lease of {self._key} is no longer valid")
        if result in (2, 3):
            self.cancelled = True
            self.abandoned = result == 3
            return
        self.last_write = self.last_checked = time.monotonic()

    async def publish_unfenced(self, event: StreamEvent) -> None:
        """Append a terminal error even without a lease: telling the client why its
        stream ends acts on no shared resource."""
        await self._append(event.to_fields(), fenced=False)

    async def start(self) -> None:
        """First entry: tells the API which worker took the job; sets the key's TTL."""
        await self._append(StreamEvent(EventType.START, worker=self._worker_id, owns_lease=self.owns_lease).to_fields(), fenced=False)
        self.last_write = time.monotonic()

    async def _append(self, fields: dict[str, str], fenced: bool) -> int:
        self._entries.append((fields, fenced))
        number = len(self._entries)
        async with self._one_at_a_time:
            try:
                result = await self._write(number)
                if result != BEHIND:
                    return result
                logger.warning("stream %s lacks entries before %d (lost in a failover?): writing them again", self._key, number)
                return await self._catch_up(number, pause=0.0)
            except UNREACHABLE:
                return await self._catch_up(number, pause=_RETRY_PAUSE)

    async def _catch_up(self, number: int, pause: float) -> int:
        """Write again every entry up to ``number`` that Redis lacks, retrying until
        Redis answers or ``retry_seconds`` have passed (then the error is raised)."""
        deadline = time.monotonic() + self._retry_seconds
        while True:
            await asyncio.sleep(pause)
            pause = max(pause, _RETRY_PAUSE)
            try:
                top = await self._redis.xrevrange(self._key, "+", "-", count=1)
                have = int(_decode(top[0][0]).partition("-")[2]) if top else 0
                result = 1
                for n in range(have + 1, number + 1):
                    result = await self._write(n)
                    if result != 1:
                        break
                if result != BEHIND:
                    return result
                # The stream lost entries again meanwhile: look again, within the deadline.
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self._key} could not be completed within {self._retry_seconds:g}s")
            except UNREACHABLE:
                if time.monotonic() >= deadline:
                    raise
            pause = min(pause * 2, _RETRY_PAUSE_MAX)

    async def _write(self, number: int) -> int:
        fields, fenced = self._entries[number - 1]
        entry_id = f"0-{number}"
        if fenced:
            return await self._writer.write(
                self._key, self._cancel_key, self._readers, self._doorbell, self._lease_args, number, fields
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            # The start entry creates the stream; a later unfenced one never recreates it.
            first = number == 1
            pipe.xadd(self._key, fields, id=entry_id, maxlen=STREAM_MAXLEN, approximate=True, nomkstream=not first)
            if first:
                pipe.expire(self._key, STREAM_TTL_SECONDS)
            self._ring(pipe)
            added, *_ = await pipe.execute(raise_on_error=False)
        if isinstance(added, Exception) and "equal or smaller" not in str(added):
            raise added
        return 1

    def _ring(self, pipe: Pipeline) -> None:
        if self._doorbell:
            pipe.xadd(
                self._doorbell, {DOORBELL_FIELD: self._key}, maxlen=DOORBELL_MAXLEN, approximate=True, nomkstream=True
            )

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
        """'cancelled' when the API asked to stop, 'abandoned' when no client reads any
        more, 'lease_lost' when the permit is gone, else ''."""
        result = await self._check(
            keys=[self._cancel_key, GENERATIONS.holders, GENERATIONS.tokens, self._readers or self._cancel_key],
            args=[*self._lease_args, "1" if self._readers else ""],
        )
        self.last_checked = time.monotonic()
        return result.decode() if isinstance(result, bytes) else str(result)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
