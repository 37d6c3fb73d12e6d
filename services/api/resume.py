"""What lets any API pod serve a request it did not accept: who may read it, the
clients still reading it, and which pod reports its end.

* ``request_key``: a hash written when a request is accepted: a digest of who made
  it (its session, or its API key) and the exchange's fields the callback needs.
  A pod asked to resume the request checks the asker against it; anyone else gets
  404, as for a request that never existed.
* ``readers_key``: kept alive by every pod relaying the request to a client; when
  the last client leaves, it expires ``RESUME_GRACE_SECONDS`` later, and the
  generator, which checks it with every write, stops. A client that comes back
  within the grace finds its reply still being written.
* ``outcome_key``: ``SET NX`` by the pod that reports the request's end, so of all
  the pods that served its connections exactly one records the turn and fires the
  callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request

from services.api.bearer import bearer_token
from services.api.errors import ApiError
from services.common.contract import (
    CURSOR_PATTERN,
    EventType,
    StreamEvent,
    outcome_key,
    readers_key,
    request_key,
    stream_key,
)

logger = logging.getLogger(__name__)

#: How often a pod pushes forward the readers keys of the streams it relays.
READERS_REFRESH_SECONDS = 0.5

#: How long a readers key outlives its last refresh, on top of the grace: two
#: missed refreshes. A killed pod's generations stop this long after the grace.
READERS_TTL_MARGIN_SECONDS = 2 * READERS_REFRESH_SECONDS

#: Above the grace that leaving left, by more than clocks and round trips drift: the
#: readers key was pushed forward by an attach (which adds READERS_TTL_MARGIN_SECONDS).
REATTACH_TOLERANCE_MS = 500

_CURSOR = re.compile(CURSOR_PATTERN)
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def owner_of(request: Request, session_id: str) -> str:
    """Who made ``request``, as a digest: its API key when it sent one (programmatic
    clients keep no cookie), else its session."""
    token = bearer_token(request.scope)
    identity = f"key:{token}" if token else f"session:{session_id}"
    return hashlib.sha256(identity.encode()).hexdigest()


def parse_cursor(request: Request) -> str:
    """The ``Last-Event-ID`` header (or ``last_event_id`` query parameter) of a resume
    request: '' to replay from the start; :class:`ApiError` 400 when malformed."""
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or ""
    value = value.strip()
    if value and not _CURSOR.match(value):
        raise ApiError(400, "invalid_cursor", "Last-Event-ID must be the id of an event of this stream")
    return value


def parse_offset(request: Request) -> int:
    """The ``offset`` query parameter (bytes of a plain-text body already received)."""
    raw = request.query_params.get("offset", "0")
    if not raw.isdigit():
        raise ApiError(400, "invalid_offset", "offset must be a number of bytes (0 or more)")
    return int(raw)


def check_request_id(request_id: str) -> None:
    """404 for anything that cannot be a request id (it is never looked up)."""
    if not _REQUEST_ID.match(request_id):
        raise not_found()


def not_found() -> ApiError:
    """The one answer for an unknown, expired or someone else's request."""
    return ApiError(404, "not_found", "no such request (it may have expired)")


@dataclass(frozen=True)
class RequestRecord:
    """What a pod that did not accept a request knows of it."""

    owner: str
    session_id: str
    user_input: str
    regenerate: bool

    def fields(self) -> dict[str, str]:
        """The hash's fields."""
        return {
            "owner": self.owner,
            "session_id": self.session_id,
            "user_input": self.user_input,
            "regenerate": "1" if self.regenerate else "",
        }

    @classmethod
    async def load(cls, redis: Redis, request_id: str) -> RequestRecord | None:
        """The record, or None when the request is unknown or expired."""
        return cls._parse(await redis.hmget(request_key(request_id), _RECORD_FIELDS))

    @classmethod
    async def load_with_entries(cls, redis: Redis, request_id: str) -> tuple[RequestRecord | None, Entries]:
        """The record and every entry of its stream so far, in one round trip: a
        resumed client's first events are those already written, sent without
        waiting for a read of the stream."""
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hmget(request_key(request_id), _RECORD_FIELDS)
            pipe.xrange(stream_key(request_id), "-", "+")
            values, entries = await pipe.execute()
        record = cls._parse(values)
        return record, entries if record is not None else []

    @classmethod
    def _parse(cls, values: list[bytes | None]) -> RequestRecord | None:
        owner, session_id, user_input, regenerate = values
        if owner is None:
            return None
        return cls(owner.decode(), (session_id or b"").decode(), (user_input or b"").decode(), bool(regenerate))

    def is_owner(self, request: Request, session_id: str) -> bool:
        """Whether ``request`` comes from who made this one (constant time)."""
        return hmac.compare_digest(self.owner, owner_of(request, session_id))


_RECORD_FIELDS = ["owner", "session_id", "user_input", "regenerate"]


#: A stream's entries as redis-py reads them: (entry id, fields).
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    milliseconds, _, sequence = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True)
class Backlog:
    """A resumed stream as read when its client came back, split at the client's
    cursor ('' = before the first entry): the reply's text the client had (for the
    turn recorded at the end), and the entries it is sent first."""

    cursor: str
    prefix: str
    entries: Entries  # after the cursor
    seen_end: bool  # the client already had the stream's terminal event

    @classmethod
    def split(cls, entries: Entries, cursor: str) -> Backlog:
        if not cursor:
            return cls(cursor, "", entries, False)
        at = _entry_order(cursor)
        before = [fields for entry_id, fields in entries if _entry_order(entry_id) <= at]
        events = [StreamEvent.from_fields(fields) for fields in before]
        return cls(
            cursor=cursor,
            prefix="".join(e.text for e in events if e.type is EventType.TOKEN),
            entries=entries[len(before):],
            seen_end=any(e.is_terminal for e in events),
        )


async def claim_outcome(redis: Redis, request_id: str, message: str, ttl_seconds: int) -> bool:
    """True for the one pod (and connection) that reports the request's end."""
    return bool(await redis.set(outcome_key(request_id), message, nx=True, ex=ttl_seconds))


class Readers:
    """The readers keys of the streams this process relays, kept alive together (one
    pipelined call a second, however many streams)."""

    def __init__(self, redis: Redis, grace_seconds: float) -> None:
        self._redis = redis
        self.grace_seconds = grace_seconds
        #: While attached, a key outlives two missed refreshes; the grace comes on top,
        #: so a killed pod's clients still get the whole grace to come back.
        self._ttl_ms = int((grace_seconds + READERS_TTL_MARGIN_SECONDS) * 1000)
        self._attached: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def attach(self, request_id: str) -> None:
        """A client of this process reads the stream (it may have been left before)."""
        await self._redis.set(readers_key(request_id), b"1", px=self.noted(request_id))

    def noted(self, request_id: str) -> int:
        """Count a connection of this process as reading ``request_id`` and keep its
        key alive from now on; returns the PX the caller sets the key with."""
        self._attached[request_id] = self._attached.get(request_id, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh(), name="readers-refresh")
        return self._ttl_ms

    async def detach(self, request_id: str) -> None:
        """One client of this process left: the key expires after the grace unless
        another connection (here or on another pod) keeps it alive."""
        count = self._attached.get(request_id, 0) - 1
        if count > 0:
            self._attached[request_id] = count
            return
        self._attached.pop(request_id, None)
        try:
            await self._redis.pexpire(readers_key(request_id), max(1, int(self.grace_seconds * 1000)))
        except RedisError:
            logger.warning("detaching from %s failed; its readers key expires by itself", request_id, exc_info=True)

    async def anyone_reading(self, request_id: str) -> bool:
        """Whether some connection still reads (or re-attached to) the stream."""
        return bool(await self._redis.exists(readers_key(request_id)))

    async def reattached(self, request_id: str, detached_at: float) -> bool:
        """Whether a connection attached to the stream since this pod's last one left
        it at ``detached_at`` (monotonic): an attach or refresh pushes the key's expiry
        past what is left of the grace that leaving set."""
        left_ms = (self.grace_seconds - (time.monotonic() - detached_at)) * 1000
        return await self._redis.pttl(readers_key(request_id)) > left_ms + REATTACH_TOLERANCE_MS

    async def _refresh(self) -> None:
        while self._attached:
            await asyncio.sleep(READERS_REFRESH_SECONDS)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for request_id in list(self._attached):
                        pipe.pexpire(readers_key(request_id), self._ttl_ms)
                    await pipe.execute()
            except RedisError:
                logger.warning("refreshing the readers keys failed", exc_info=True)

    async def close(self) -> None:
        """Stop refreshing (the keys then expire by themselves)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
