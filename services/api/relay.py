"""Reading one request's Redis Stream as the generator writes it.

The service reads streams through :mod:`services.api.stream_reader`, which
multiplexes all of a process's streams over a few connections. ``read_events``
here is the simple design it replaced (one blocking ``XREAD`` per request), kept
as the reference the relay benchmark measures against; both raise
:class:`GeneratorLost` under the same rule.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from services.common.contract import EventType, StreamEvent, stream_key

#: Longest single blocking read; short enough to check the generator's silence often.
_BLOCK_MS = 1000


class GeneratorLost(Exception):
    """The generator that took the job stopped writing (crashed or was killed)."""


class JobLost(Exception):
    """The job left the queue without a generator starting it: a generator rejected
    it (say, one of another version during a rolling upgrade) or it expired."""


class EntryDecoder:
    """Turns a stream's entries, as read, into the events a client is sent: heartbeats
    are dropped, ``started`` is set by the ``start`` entry, ``finished`` by the terminal
    one (later entries are ignored), and with ``coalesce`` the tokens of one batch of
    entries become one ``token`` event."""

    def __init__(self, coalesce: bool, started: bool = False) -> None:
        """``started``: the reading begins after the ``start`` entry (a resumed stream)."""
        self.coalesce = coalesce
        self.started = started
        self.finished = False

    def decode(self, entries: list[tuple[Any, dict[Any, Any]]]) -> list[StreamEvent]:
        """The events of one batch of entries, in stream order, each with the cursor
        (entry id) of the last entry it includes."""
        events: list[StreamEvent] = []
        text: list[str] = []
        count = 0
        last_token_id: Any = b""
        for entry_id, fields in entries:
            event = StreamEvent.from_fields(fields)
            if event.type is EventType.TOKEN and self.coalesce:
                text.append(event.text)
                count += event.tokens
                last_token_id = entry_id
                continue
            if text:
                events.append(_tokens(text, count, last_token_id))
                text, count = [], 0
            if event.type is EventType.HEARTBEAT:
                continue
            if event.type is EventType.START:
                self.started = True
            events.append(replace(event, cursor=_cursor(entry_id)))
            if event.is_terminal:
                self.finished = True
                return events
        if text:
            events.append(_tokens(text, count, last_token_id))
        return events


def _cursor(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _tokens(texts: list[str], count: int, last_id: bytes | str) -> StreamEvent:
    """One ``token`` event for coalesced entries, ending at entry ``last_id``."""
    return StreamEvent(EventType.TOKEN, text="".join(texts), tokens=count, cursor=_cursor(last_id))


async def read_events(redis: Redis, request_id: str, silence_limit: float) -> AsyncIterator[StreamEvent]:
    """Yield the request's events (``start``, ``token``, then ``done`` or ``error``)
    as they arrive, with blocking reads; heartbeats are consumed here.

    Before a generator has started the job, waiting is unbounded (the caller owns
    the deadline). After it started, ``silence_limit`` seconds without any entry
    (generators write a heartbeat every second) raise :class:`GeneratorLost`.
    """
    key = stream_key(request_id)
    last_id = b"0-0"
    decoder = EntryDecoder(coalesce=False)
    last_seen = time.monotonic()
    while True:
        block_ms = _BLOCK_MS
        if decoder.started:
            # Wake up in time to declare a silent generator lost at the limit, not up
            # to one block later.
            remaining = silence_limit - (time.monotonic() - last_seen)
            block_ms = max(10, min(_BLOCK_MS, int(remaining * 1000) + 1))
        response = await redis.xread({key: last_id}, block=block_ms, count=512)
        now = time.monotonic()
        if not response:
            if decoder.started and now - last_seen > silence_limit:
                raise GeneratorLost(f"the generator wrote nothing for {now - last_seen:.1f}s")
            continue
        last_seen = now
        entries = response[0][1]
        last_id = entries[-1][0]
        for event in decoder.decode(entries):
            yield event
        if decoder.finished:
            return


async def delete_stream(redis: Redis, request_id: str) -> None:
    """Drop a finished request's stream at once instead of waiting for its TTL."""
    await redis.delete(stream_key(request_id))
