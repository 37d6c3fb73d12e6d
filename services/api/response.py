"""The ASGI response that relays one generation to one client.

It runs two things at once: the relay (Redis Stream → framing → ``send``) and a
listener for the client's ``http.disconnect``. Whichever ends first decides the
request's outcome, so a client that leaves while its job is still queued is
noticed at once, not at the next write. Then, exactly once: stop the
generation if it is still running, clean up Redis, record the exchange in the
session, and fire the user's callback.

Two more things end a connection early, both leaving a resumable reply to its
grace (the client may come back for the rest, on any pod): a client that takes
nothing for ``SEND_TIMEOUT_SECONDS`` while bytes wait for it (uvicorn's ``send``
waits while the socket's buffers are full, so that is the most the API ever
holds for it), and a pod that drains (``services.api.drain``), which ends the
stream at an event boundary with the framer's ``handoff`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.api import metrics
from services.api.drain import Drain
from services.api.framing import Framer
from services.api.outcome import CallbackMessage
from services.common.contract import ErrorCode, EventType, StreamEvent, http_status_for

logger = logging.getLogger(__name__)

#: How often a draining pod looks whether a queued stream's generation started (it is
#: handed off only then: a request still waiting for a permit would be withdrawn).
HANDOFF_POLL_SECONDS = 0.05


class SendTimeout(OSError):
    """The client took nothing for the send timeout: counted as gone."""


class ClientGone(OSError):
    """The connection was lost before the reply's last bytes were handed over."""


class _SendWatch:
    """The relay's ``send``, watched for a client that takes nothing: each send notes
    when it began, and :meth:`stalled` returns once one has lasted ``timeout``
    seconds (checked every quarter of it). One timer per connection, not one per
    send: arming and cancelling a timer around every token was a measurable share
    of the relay's CPU."""

    def __init__(self, send: Send, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._since: float | None = None

    async def send(self, message: Message) -> None:
        self._since = time.monotonic()
        try:
            await self._send(message)
        finally:
            self._since = None

    async def stalled(self) -> None:
        """Returns when a send has waited ``timeout`` seconds for the client."""
        while True:
            await asyncio.sleep(self._timeout / 4)
            since = self._since
            if since is not None and time.monotonic() - since >= self._timeout:
                return


@dataclass(frozen=True)
class Queued:
    """The request is waiting for a permit at ``position`` (1 = next)."""

    position: int


class StreamFailed(Exception):
    """The generation ended with an error the client must be told about."""

    def __init__(self, code: str, message: str, cursor: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cursor = cursor  # the generator's error entry, when it is one


@dataclass
class RelayProgress:
    """What has reached the client so far."""

    headers_sent: bool = False
    tokens_sent: int = 0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    done: StreamEvent | None = None
    error: StreamFailed | None = None
    #: Text deltas whose bytes were handed to the server, and those framed but not yet
    #: sent (a buffering framer sends them all with ``done``).
    text_sent: list[str] = field(default_factory=list)
    text_pending: list[str] = field(default_factory=list)

    @property
    def reply_sent(self) -> str:
        """Exactly the reply text the client was sent."""
        return "".join(self.text_sent)

    def mark_sent(self) -> None:
        """The bytes of every pending delta went out."""
        self.text_sent += self.text_pending
        self.text_pending.clear()


class Lifecycle(Protocol):
    """What a response relays: one request's events, and what to do once it is over
    (``services.api.lifecycle``)."""

    def events(self) -> AsyncIterator[StreamEvent | Queued]:
        """The events to send, started inside the response."""
        ...

    async def finish(self, message: CallbackMessage, progress: RelayProgress) -> None:
        """Called once when the response is over."""
        ...

    @property
    def can_hand_off(self) -> bool:
        """Whether its client may now resume elsewhere while the generation goes on:
        a generator started it and its end has not been seen yet."""
        ...


class RelayResponse(Response):
    """Streams the events of ``lifecycle.events()`` to the client in ``framer``'s format.

    ``events()`` is called inside the response, so the work it starts
    (admission, enqueueing) happens only for a client that is still there, and
    its waiting is interrupted by a disconnect. ``headers`` go out with the first
    bytes: at once for SSE, with the first token for plain text, so that an error
    before the first token can still be a proper HTTP error.
    """

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        framer: Framer,
        headers: list[tuple[bytes, bytes]],
        send_headers_early: bool,
        deadline_seconds: float,
        send_timeout_seconds: float,
        drain: Drain | None = None,
    ) -> None:
        super().__init__(media_type=framer.media_type)
        self._deadline_seconds = deadline_seconds
        self._send_timeout = send_timeout_seconds
        self._drain = drain if framer.handoff() is not None else None
        self.accepted_at = time.monotonic()
        self._lifecycle = lifecycle
        self._framer = framer
        self._headers = headers
        self._send_headers_early = send_headers_early

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        progress = RelayProgress()
        sends = _SendWatch(send, self._send_timeout)
        # The sends after the relay (an error, a hand-off) are few: each gets a timer.
        send = self._timed(send)
        disconnect = asyncio.create_task(_wait_for_disconnect(receive))
        relay = asyncio.create_task(self._relay(sends.send, progress, disconnect))
        stalled = asyncio.create_task(sends.stalled())
        watchers = [disconnect, stalled]
        handoff = None
        if self._drain is not None:
            handoff = asyncio.create_task(self._wait_for_handoff())
            watchers.append(handoff)
        try:
            await asyncio.wait({relay, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            relay.cancel()
            for watcher in watchers:
                watcher.cancel()
            raise
        finally:
            if not relay.done():
                relay.cancel()
            for watcher in watchers:
                watcher.cancel()
            with contextlib.suppress(BaseException):
                await relay
            for watcher in watchers:
                with contextlib.suppress(BaseException):
                    await watcher
        handed_off = handoff is not None and not handoff.cancelled() and relay.cancelled()
        if handed_off:
            await self._hand_off(send)
        message = self._outcome(relay, progress)
        abort = not stalled.cancelled() and relay.cancelled()
        if abort:
            metrics.SEND_TIMEOUTS.inc()
            logger.info("the client took nothing for %gs; disconnecting it", self._send_timeout)
        if message is CallbackMessage.UNKNOWN_ERROR_OCCURRED and progress.error is not None:
            abort = not await self._report_error(send, progress)
        await self._lifecycle.finish(message, progress)
        if abort:
            # Plain-text formats have no in-band error: end the connection without the
            # final chunk, which clients report as an incomplete body (curl exit 18).
            raise ResponseAborted(progress.error.message if progress.error else "aborted")

    def _timed(self, send: Send) -> Send:
        """``send`` that gives up (:class:`SendTimeout`) when the client takes nothing."""
        timeout = self._send_timeout

        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise SendTimeout(f"the client took nothing for {timeout:g}s") from None

        return timed_send

    async def _wait_for_handoff(self) -> None:
        """Returns when this pod drains and the stream can move to another pod."""
        assert self._drain is not None
        await self._drain.wait()
        while not self._lifecycle.can_hand_off:
            await asyncio.sleep(HANDOFF_POLL_SECONDS)

    async def _hand_off(self, send: Send) -> None:
        """End the stream with the framer's ``handoff`` event: its client resumes on
        another pod after the last event it got."""
        metrics.STREAMS_HANDED_OFF.inc()
        try:
            await send({"type": "http.response.body", "body": self._framer.handoff() or b"", "more_body": False})
        except OSError:
            pass  # the client is gone already; it resumes (or not) all the same

    @staticmethod
    def _outcome(relay: asyncio.Task[None], progress: RelayProgress) -> CallbackMessage:
        exc = None if relay.cancelled() else relay.exception()
        if relay.cancelled() or isinstance(exc, OSError):
            return (
                CallbackMessage.CLIENT_DISCONNECTED_WHILE_STREAMING
                if progress.tokens_sent
                else CallbackMessage.CLIENT_DISCONNECTED_BEFORE_STREAMING
            )
        if exc is None:
            return CallbackMessage.SUCCESS
        if isinstance(exc, StreamFailed):
            progress.error = exc
        else:
            logger.error("relaying a stream failed", exc_info=exc)
            progress.error = StreamFailed(ErrorCode.INTERNAL_ERROR, "relaying the reply failed")
        return CallbackMessage.UNKNOWN_ERROR_OCCURRED

    async def _start(self, send: Send, progress: RelayProgress) -> None:
        if not progress.headers_sent:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", self._framer.media_type.encode()), *self._headers],
                }
            )
            progress.headers_sent = True

    async def _relay(self, send: Send, progress: RelayProgress, disconnect: asyncio.Task[None]) -> None:
        """Relay under the request's deadline (queue wait and generation together)."""
        try:
            async with asyncio.timeout(self._deadline_seconds):
                await self._relay_events(send, progress, disconnect)
        except TimeoutError:
            raise StreamFailed(
                ErrorCode.REQUEST_TIMEOUT, f"the request did not finish within {self._deadline_seconds:g}s"
            ) from None

    async def _relay_events(self, send: Send, progress: RelayProgress, disconnect: asyncio.Task[None]) -> None:
        if self._send_headers_early:
            await self._start(send, progress)
            opening = self._framer.opening()
            if opening:
                await send({"type": "http.response.body", "body": opening, "more_body": True})
        async for event in self._lifecycle.events():
            if isinstance(event, Queued):
                body = self._framer.queued(event.position)
                if body:
                    await self._start(send, progress)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            elif event.type is EventType.TOKEN:
                body = self._framer.token(event)
                progress.text_pending.append(event.text)
                if body:  # a buffering framer (a non-streaming reply) sends nothing yet
                    await self._start(send, progress)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    progress.mark_sent()
                now = time.monotonic()
                if progress.tokens_sent == 0:
                    progress.first_token_at = now
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - self.accepted_at)
                else:
                    metrics.INTER_TOKEN_LATENCY.observe(now - progress.last_token_at)
                metrics.TOKENS_RELAYED.inc(event.tokens)
                progress.last_token_at = now
                progress.tokens_sent += event.tokens
            elif event.type is EventType.DONE:
                progress.done = event
                # uvicorn drops the sends after a lost connection without a word, so a
                # pod that lagged behind its sockets could relay a whole reply into a
                # closed one and call it a success. Let a lost connection that is
                # already known be noticed first (one loop turn), and let it win.
                await asyncio.sleep(0)
                if disconnect.done():
                    raise ClientGone("the connection was lost before the reply ended")
                await self._start(send, progress)
                body = self._framer.done(event)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                progress.mark_sent()
                return
            elif event.type is EventType.ERROR:
                raise StreamFailed(
                    event.code or ErrorCode.GENERATION_FAILED, event.message or "generation failed", cursor=event.cursor
                )
        raise StreamFailed(ErrorCode.GENERATOR_LOST, "the stream ended without a result")

    async def _report_error(self, send: Send, progress: RelayProgress) -> bool:
        """Tell the client about ``progress.error``; False when the response must be aborted."""
        error = progress.error
        assert error is not None
        try:
            if not progress.headers_sent:
                status = http_status_for(error.code)
                body, content_type = self._framer.error_response(status, error.code, error.message)
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()),
                            *self._headers,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return True
            body = self._framer.error(error.code, error.message, error.cursor)
            if body is None:
                return False
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return True
        except OSError:
            return True  # the client is gone too; nothing left to tell


class ResponseAborted(Exception):
    """Raised to make the server drop a response it cannot complete."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
