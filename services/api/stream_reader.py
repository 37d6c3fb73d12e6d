"""Relaying many requests' Redis Streams over a few Redis connections.

``relay.read_events`` issues one blocking ``XREAD`` per request, so every open
stream holds a Redis connection and costs one round trip per token. Here a few
reader tasks per API process (``connections``) each issue one ``XREAD BLOCK``
for all the streams they own and hand what comes back to per-request
subscriptions: 1,000 streams cost a handful of connections, and one read carries
the entries of every stream that has something new.

Which streams a read covers: each reader task has a doorbell stream
(``contract.reader_wake_key``). A request subscribed with :meth:`StreamReader.subscribe`
before its job is enqueued gives the job that doorbell as ``notify_key``, and the
generator announces every entry it writes there, atomically with the entry. A
read then covers the doorbell plus only the streams announced since the last
read, so its cost follows the streams that changed, not the streams open; once
per ``sweep_interval`` a read covers every stream, which bounds the delay of a
ring that was lost (a generator that does not ring, a doorbell trimmed while the
reader was far behind). Streams read with :meth:`StreamReader.read_events` (no
doorbell) are covered by every read, and adding one to a blocked read appends a
wake-up entry to the doorbell, so the read returns at once and the next one
includes it. Removing a stream needs nothing: its entries are simply dropped.

Tokens that arrive in the same read are coalesced into one ``token`` event (one
HTTP chunk) whose text is their concatenation.

    reader = StreamReader(redis)
    subscription = await reader.subscribe(request_id)
    enqueue(job with notify_key=subscription.notify_key)
    async for event in subscription.events(silence_limit):
        ...
    subscription.close()
    await reader.close()

``read_events(redis, request_id, silence_limit)`` (module level) has the
signature and semantics of ``relay.read_events`` and shares one reader per
Redis client, so a caller can switch by changing an import.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.api.relay import EntryDecoder, GeneratorLost, JobLost
from services.common.contract import (
    DOORBELL_FIELD,
    DOORBELL_MAXLEN,
    STREAM_START,
    StreamEvent,
    reader_wake_key,
    stream_key,
)
from services.common.watchdog import Progress, Stall, stalls

logger = logging.getLogger(__name__)

#: Longest single blocking read. A read ends early when any stream it covers gets
#: an entry, the doorbell included, so this only bounds how long an idle reader
#: lingers before it notices it is idle.
DEFAULT_BLOCK_MS = 1000

#: Most entries taken from one stream in one read (a reader that far behind catches
#: up over several reads, in order).
DEFAULT_COUNT = 512

#: How often a read covers every open stream, whether announced or not.
DEFAULT_SWEEP_INTERVAL = 1.0

#: How often a request whose job has not started yet checks that the job still
#: exists. At least the sweep interval, so that the second of two looks comes after
#: a read that covered the stream.
JOB_CHECK_SECONDS = 1.0

#: Lifetime of a doorbell after the reader last refreshed it, so a killed process
#: leaves nothing behind (generators never recreate a missing doorbell).
_DOORBELL_TTL_SECONDS = 60

#: Pause after a read that brought entries, per open stream (1 ms per 100 streams),
#: capped by the reader's ``max_read_pause``. Each read and each HTTP chunk costs a
#: round of system calls and task switches; with hundreds of streams at a few tokens
#: each per read that was most of the relay's cost (a profile at 300 streams, before
#: doorbells: a third of the API's CPU went to writing and parsing reads). Pausing
#: lets tokens accumulate, so one read carries many and each stream's tokens that
#: arrived meanwhile go out as one chunk; with few streams there is no pause at all.
READ_PAUSE_PER_STREAM = 10e-6

#: How long a reader retries a read that failed for want of a connection (dropped,
#: reset, Redis restarting or failing over) before it fails its streams. Each retry
#: reads every stream from its last delivered entry, so nothing is lost or repeated;
#: a stream whose generator falls silent meanwhile still ends by its silence limit.
DEFAULT_RETRY_SECONDS = 10.0

#: How late the reply to a blocking read may be when the client has no socket timeout.
DEFAULT_READ_TIMEOUT = 5.0

#: First pause before a retry; it doubles up to _RETRY_PAUSE_MAX.
_RETRY_PAUSE = 0.05
_RETRY_PAUSE_MAX = 0.5

#: Pauses shorter than this are not taken: event loop timers are not finer.
_MIN_READ_PAUSE = 0.001

_DOORBELL_FIELD = DOORBELL_FIELD.encode()

#: A stream's entries as read: (entry id, fields).
Entries = Sequence[tuple[Any, dict[Any, Any]]]


class _Subscription:
    """One request's place in a reader: entries read for it but not yet consumed."""

    __slots__ = ("key", "packed_key", "last_id", "packed_id", "batches", "waiter", "error", "rung", "started")

    def __init__(self, key: bytes, rung: bool, after: bytes = b"0-0") -> None:
        self.key = key
        self.packed_key = _bulk(key)
        self.last_id: bytes = after
        self.packed_id = _bulk(self.last_id)
        # Read from a cursor, the stream has started: a cursor comes from an event after `start`.
        self.started = after != b"0-0"
        self.batches: list[list[tuple[Any, dict[Any, Any]]]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.rung = rung  # its writer announces entries on the doorbell

    def advance(self, last_id: bytes) -> None:
        """Remember the last entry read, for the next read."""
        self.last_id = last_id
        self.packed_id = _bulk(last_id)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def push(self, entries: list[tuple[Any, dict[Any, Any]]]) -> None:
        self.batches.append(entries)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    async def take(self, timeout: float | None) -> list[tuple[Any, dict[Any, Any]]]:
        """Every entry read so far, in stream order; waits up to ``timeout`` seconds
        (None: forever) for at least one. Returns [] on timeout."""
        if not self.batches and self.error is None:
            loop = asyncio.get_running_loop()
            self.waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        if self.batches:
            batches, self.batches = self.batches, []
            return batches[0] if len(batches) == 1 else [entry for batch in batches for entry in batch]
        if self.error is not None:
            raise _copy_error(self.error) from self.error
        return []


def _copy_error(error: BaseException) -> BaseException:
    """A fresh exception of the same type for each consumer: one instance raised in
    many tasks would collect all their tracebacks."""
    try:
        return type(error)(*error.args)
    except Exception:
        return RedisError(str(error))


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Shard:
    """One reader task, its doorbell and the streams it owns; one Redis connection."""

    def __init__(self, reader: StreamReader, index: int) -> None:
        self._reader = reader
        self.coalesce = reader.coalesce
        self.subs: dict[bytes, _Subscription] = {}
        self._unrung: dict[bytes, _Subscription] = {}  # covered by every read
        self._announced: set[bytes] = set()  # rung streams to cover in the next read
        self.wake_key = reader_wake_key(f"{reader.id}:{index}").encode()
        self._wake_last_id = b"0-0"  # the doorbell is this reader's alone: all of it counts
        self._doorbell_fresh_until = 0.0
        self._next_sweep = 0.0
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None  # this shard's own, so a read skips the pool's checks
        self._reading = False  # a read's key list is built and the read not yet answered
        self._wake_sent = False
        #: While reads fail for want of a connection: the latest failure.
        self.connection_error: BaseException | None = None
        #: When the reader last got its connection back after failing (monotonic).
        self.recovered_at = 0.0
        #: Moves with every read answered or failed, while the shard has streams: the
        #: pod's liveness check fails when it stops (a read that never returns).
        self.progress = Progress(f"stream reader {self.wake_key.decode()}")

    async def ensure_doorbell(self) -> None:
        """Create the doorbell or push its expiry forward (generators only append to
        an existing one); a round trip only every third of its lifetime."""
        now = time.monotonic()
        if now < self._doorbell_fresh_until:
            return
        async with self._reader.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=DOORBELL_MAXLEN, approximate=True)
            pipe.expire(self.wake_key, _DOORBELL_TTL_SECONDS)
            await pipe.execute()
        self._doorbell_fresh_until = now + _DOORBELL_TTL_SECONDS / 3

    def add(self, sub: _Subscription) -> None:
        self.subs[sub.key] = sub
        if not sub.rung:
            self._unrung[sub.key] = sub
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"stream-reader {self.wake_key.decode()}")
        elif not sub.rung and self._reading and not self._wake_sent:
            # A rung stream announces its first entry itself; this one must be added
            # to the blocked read's key list.
            self._wake_sent = True
            self._reader._spawn(self._wake())

    def remove(self, sub: _Subscription) -> None:
        if self.subs.get(sub.key) is sub:
            del self.subs[sub.key]
            self._unrung.pop(sub.key, None)
            self._announced.discard(sub.key)

    async def _wake(self) -> None:
        try:
            self._doorbell_fresh_until = 0.0  # the wake-up entry refreshes it too
            await self.ensure_doorbell()
        except RedisError:
            # The blocked read still returns within its block; the new stream waits that long.
            logger.warning("waking stream reader %s failed", self.wake_key.decode(), exc_info=True)

    async def _read(self, subs: list[_Subscription]) -> Any:
        """One ``XREAD BLOCK`` over the doorbell and ``subs``.

        The command is assembled from RESP pieces each subscription keeps encoded:
        with hundreds of streams, having redis-py encode every key and id again on
        every read was the reader's largest cost (a profile at 400 streams).
        """
        reader = self._reader
        prefix = [b"XREAD", b"COUNT", b"%d" % reader.count, b"BLOCK", b"%d" % reader.block_ms, b"STREAMS"]
        packed = b"".join(
            [
                b"*%d\r\n" % (len(prefix) + 2 + 2 * len(subs)),
                *map(_bulk, prefix),
                _bulk(self.wake_key),
                *(sub.packed_key for sub in subs),
                _bulk(self._wake_last_id),
                *(sub.packed_id for sub in subs),
            ]
        )
        if self._connection is None:
            pool = reader.redis.connection_pool
            # Its read timeout knows of BLOCK: a reply overdue by more than the client's
            # socket timeout means the connection is dead (half-open: nothing else would
            # ever say so), and the read is retried on a new one.
            timeout = reader.block_ms / 1000 + reader.read_timeout
            self._connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": timeout})
        connection = self._connection
        try:
            # Connects on first use and after a failure.
            await connection.send_packed_command(packed)
            return await connection.read_response()
        except BaseException:
            # A reply may still be on its way (cancelled, timed out): never reuse it.
            await connection.disconnect()
            raise

    def _streams_to_read(self) -> list[_Subscription]:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._reader.sweep_interval
            self._announced.clear()
            return list(self.subs.values())
        subs = list(self._unrung.values())
        subs += [self.subs[key] for key in self._announced if key in self.subs and key not in self._unrung]
        self._announced.clear()
        return subs

    async def _run(self) -> None:
        try:
            with self.progress.working():
                await self._read_while_subscribed()
        except Exception as exc:
            logger.exception("stream reader %s failed", self.wake_key.decode())
            self.fail_all(RedisError(f"the stream reader failed: {exc!r}"), list(self.subs.values()))
        finally:
            self._reading = False

    async def _read_while_subscribed(self) -> None:
        reader = self._reader
        failing_since: float | None = None
        pause = _RETRY_PAUSE
        while self.subs:
            self.progress.moved()
            subs = self._streams_to_read()
            self._reading = True
            try:
                await self.ensure_doorbell()
                reply = await self._read(subs)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # The connection is gone, not the command wrong: read again (on a new
                # connection) from each stream's last delivered entry.
                self._doorbell_fresh_until = 0.0
                self._next_sweep = 0.0  # rings may have been missed: cover every stream
                now = time.monotonic()
                self.connection_error = exc
                if failing_since is None:
                    failing_since = now
                    logger.warning("stream reader %s lost its connection (%s); retrying", self.wake_key.decode(), exc)
                if now - failing_since >= reader.retry_seconds:
                    self.fail_all(exc, list(self.subs.values()))
                    failing_since, pause, self.connection_error = None, _RETRY_PAUSE, None
                    continue
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_PAUSE_MAX)
                continue
            except RedisError as exc:
                # A command error: every consumer sees it, as with one read per
                # stream; streams added later start a fresh read.
                self.fail_all(exc, list(self.subs.values()))
                self._doorbell_fresh_until = 0.0
                continue
            finally:
                self._reading = False
                self._wake_sent = False
            if failing_since is not None:
                logger.info("stream reader %s reconnected", self.wake_key.decode())
                failing_since, pause, self.connection_error = None, _RETRY_PAUSE, None
                self.recovered_at = time.monotonic()
            if reply and self._dispatch(reply):
                pause = min(reader.max_read_pause, len(self.subs) * READ_PAUSE_PER_STREAM)
                if pause >= _MIN_READ_PAUSE:
                    await asyncio.sleep(pause)

    def fail_all(self, error: BaseException, subs: list[_Subscription]) -> None:
        """Raise ``error`` in each of ``subs`` and stop reading their streams."""
        for sub in subs:
            sub.fail(error)
            self.remove(sub)

    def _dispatch(self, reply: Any) -> bool:
        """Hand each stream's entries to its subscription and note the streams the
        doorbell announced; False when nothing was delivered."""
        items = reply.items() if isinstance(reply, dict) else reply  # RESP3 answers a map
        delivered = False
        for key, entries in items:
            if isinstance(key, str):
                key = key.encode()
            if not entries:
                continue
            if key == self.wake_key:
                self._wake_last_id = _as_bytes(entries[-1][0])
                if len(entries) >= self._reader.count:
                    self._next_sweep = 0.0  # rings may have been trimmed: read everything
                for _entry_id, fields in entries:
                    announced = _as_map(fields).get(_DOORBELL_FIELD)
                    if announced is not None:
                        self._announced.add(_as_bytes(announced))
                continue
            sub = self.subs.get(key)
            if sub is None:
                continue  # removed while the read was in flight
            sub.advance(_as_bytes(entries[-1][0]))
            # The raw reply carries each entry's fields as a flat [field, value, ...] list.
            sub.push([(entry_id, _as_map(fields)) for entry_id, fields in entries])
            delivered = True
            # The next read covers it again, announced or not: a stream that just had
            # something is the likeliest to have more, and its next entry then comes
            # with the read that its ring wakes, not one read later.
            self._announced.add(key)
        return delivered

    async def close(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            if self._connection is not None:
                # The cancelled task was seen still waiting in its XREAD until the BLOCK
                # ran out (close() took the whole block); closing the socket ends the
                # read at once, whatever the read was doing.
                await self._connection.disconnect(nowait=True)
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.fail_all(RedisError("the stream reader was closed"), list(self.subs.values()))
        if self._connection is not None:
            await self._connection.disconnect()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _as_map(fields: Any) -> dict[Any, Any]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2]))


def _bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Subscription:
    """One request's stream, read by a :class:`StreamReader`; ``close()`` when done."""

    def __init__(self, shard: _Shard, sub: _Subscription) -> None:
        self._shard = shard
        self._sub = sub
        #: The doorbell the request's generator must announce its entries on
        #: (``GenerationJob.notify_key``); '' when the stream is read without one.
        self.notify_key = shard.wake_key.decode() if sub.rung else ""

    def close(self) -> None:
        """Stop reading the stream (entries not consumed yet are dropped)."""
        self._shard.remove(self._sub)

    async def events(
        self, silence_limit: float, job_pending: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield the request's events (``start``, ``token``, then ``done`` or ``error``)
        as they arrive; heartbeats are consumed here, and tokens read together come
        as one ``token`` event.

        Before a generator has started the job, waiting is bounded only by the caller's
        deadline, unless ``job_pending`` is given: it is asked every
        ``JOB_CHECK_SECONDS`` whether the job still waits or runs, and twice "no" in a
        row with nothing read raises :class:`~services.api.relay.JobLost` (the second
        look lets the entries of a job that just finished arrive). After it started,
        ``silence_limit`` seconds without any entry raise
        :class:`~services.api.relay.GeneratorLost`. A failed read raises its
        ``RedisError`` in every stream it covered.
        """
        sub = self._sub
        decoder = EntryDecoder(self._shard.coalesce, started=sub.started)
        last_seen = time.monotonic()
        job_missing = False
        shard = self._shard
        while True:
            if decoder.started:
                # Silence counts only while the reader can read: during a failover or a
                # reconnect the generator may well be writing (or retrying its writes),
                # and the reader fails its streams itself after its retry_seconds.
                quiet = time.monotonic() - max(last_seen, shard.recovered_at)
                timeout: float | None = silence_limit if shard.connection_error else max(0.0, silence_limit - quiet)
            else:
                timeout = JOB_CHECK_SECONDS if job_pending is not None else None
            entries = await sub.take(timeout)
            now = time.monotonic()
            if not entries:
                quiet = now - max(last_seen, shard.recovered_at)
                if decoder.started and quiet >= silence_limit and shard.connection_error is None:
                    raise GeneratorLost(f"the generator wrote nothing for {quiet:.1f}s")
                if not decoder.started and job_pending is not None:
                    if await job_pending():
                        job_missing = False
                    elif job_missing:
                        raise JobLost("the job left the queue without being started by a generator")
                    else:
                        job_missing = True
                continue
            last_seen = now
            for event in decoder.decode(entries):
                yield event
            if decoder.finished:
                return


class StreamReader:
    """Reads the streams of many requests over ``connections`` blocking reads.

    ``redis``: the client whose settings the reads use (each reader task holds one
    connection of its own) and whose pool maintains the doorbells. ``max_read_pause``:
    the longest pause between reads under load (see ``READ_PAUSE_PER_STREAM``), that
    is the most latency pacing may add to a token; 0 reads again at once.
    ``sweep_interval``: how often a read covers every stream, announced or not.
    Create one per process and ``await close()`` at shutdown; reader tasks also stop
    by themselves when they have no streams.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        connections: int = 1,
        block_ms: int = DEFAULT_BLOCK_MS,
        count: int = DEFAULT_COUNT,
        max_read_pause: float = 0.01,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        coalesce: bool = True,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.redis = redis
        self.id = secrets.token_hex(8)
        self.block_ms = block_ms
        self.count = count
        self.max_read_pause = max_read_pause
        self.sweep_interval = sweep_interval
        self.coalesce = coalesce
        self.retry_seconds = retry_seconds
        #: How late a blocking read's reply may be (its client's socket timeout).
        self.read_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout") or DEFAULT_READ_TIMEOUT
        self._shards = [_Shard(self, i) for i in range(connections)]
        self._background: set[asyncio.Task[None]] = set()

    @property
    def streams(self) -> int:
        """Streams being read right now."""
        return sum(len(shard.subs) for shard in self._shards)

    def stalls(self, limit: float) -> list[Stall]:
        """Reader tasks that have had streams but no read answered or failed for over
        ``limit`` seconds: wedged (every read has a timeout, so this is a bug or a
        broken event loop), for the pod's liveness check."""
        return stalls((shard.progress for shard in self._shards), limit)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _shard(self) -> _Shard:
        return min(self._shards, key=lambda s: len(s.subs))

    @staticmethod
    def _add(
        shard: _Shard, request_id: str, rung: bool, after: str = STREAM_START, backlog: Entries = ()
    ) -> Subscription:
        sub = _Subscription(stream_key(request_id).encode(), rung, after.encode())
        if backlog:
            sub.advance(_as_bytes(backlog[-1][0]))
            sub.push(list(backlog))
        shard.add(sub)
        return Subscription(shard, sub)

    async def subscribe(self, request_id: str) -> Subscription:
        """Start reading ``request_id``'s stream, before its job is enqueued: the job
        must carry ``notify_key`` so its generator announces each entry. Raises
        ``RedisError`` when the doorbell cannot be set up."""
        shard = self._shard()
        await shard.ensure_doorbell()
        return self._add(shard, request_id, rung=True)

    def resume(self, request_id: str, after: str = STREAM_START, backlog: Entries = ()) -> Subscription:
        """Read ``request_id``'s stream from the entry after cursor ``after`` (a stream
        another process, or an earlier connection, subscribed to). ``backlog``: the
        entries after ``after`` the caller has read already, consumed first and not
        read again. Its generator rings another reader's doorbell, if any: every read
        covers it."""
        return self._add(self._shard(), request_id, rung=False, after=after, backlog=backlog)

    async def read_events(self, request_id: str, silence_limit: float) -> AsyncIterator[StreamEvent]:
        """The events of a stream whose writer does not announce its entries (no
        doorbell): every read covers it. Same events and errors as
        :meth:`Subscription.events`."""
        subscription = self._add(self._shard(), request_id, rung=False)
        try:
            async for event in subscription.events(silence_limit):
                yield event
        finally:
            subscription.close()

    async def close(self) -> None:
        """Stop the reader tasks and remove the doorbells."""
        for shard in self._shards:
            await shard.close()
        for task in list(self._background):
            task.cancel()
        try:
            await self.redis.delete(*(shard.wake_key for shard in self._shards))
        except RedisError:
            logger.warning("removing the stream reader's doorbells failed", exc_info=True)


#: The shared reader of each Redis client, for the module-level ``read_events``.
_SHARED: weakref.WeakKeyDictionary[Redis, StreamReader] = weakref.WeakKeyDictionary()


def shared_reader(redis: Redis) -> StreamReader:
    """The process-wide reader that uses ``redis``'s pool (created on first use)."""
    reader = _SHARED.get(redis)
    if reader is None:
        reader = _SHARED[redis] = StreamReader(redis)
    return reader


def read_events(redis: Redis, request_id: str, silence_limit: float) -> AsyncIterator[StreamEvent]:
    """Drop-in replacement for ``relay.read_events``: the same events and errors,
    read by the shared multiplexing reader of ``redis``."""
    return shared_reader(redis).read_events(request_id, silence_limit)
