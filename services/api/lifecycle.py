"""One request's life in an API pod, one method per stage.

A new request (``POST /chat_stream``, ``/v1/chat/completions``): wait for a permit
→ enqueue → relay its stream → end. A resumed one (``GET /chat_stream/{id}``, any
pod): relay its stream from a cursor → end. :class:`~services.api.response.RelayResponse`
drives either through two methods, ``events()`` and ``finish(message, progress)``.

Ending is where connections and the generation part ways. The generation owns its
permit once a generator has started it, so a client that leaves does not stop it
at once: with ``RESUME_GRACE_SECONDS`` the stream stays readable and the
generation goes on until the grace has passed with no client reading; a client
that resumes meanwhile (on any pod) gets the rest. Whichever connection sees the
end first claims the outcome (``resume.claim_outcome``), records the turn and
fires the callback: exactly once per request, across connections and pods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from redis.exceptions import RedisError
from starlette.requests import Request

from services.api import metrics
from services.api.admission import QueueTimeout, Ticket
from services.api.enqueue import Registration
from services.api.exchange import ChatExchange, Timings, Usage
from services.api.outcome import Callback, CallbackMessage, invoke_callback
from services.api.relay import GeneratorLost, JobLost
from services.api.response import Queued, RelayProgress, StreamFailed
from services.api.resume import Backlog, RequestRecord, claim_outcome
from services.api.stream_reader import Subscription
from services.common.contract import (
    ErrorCode,
    EventType,
    FinishReason,
    GenerationJob,
    STREAM_START,
    HistoryWindow,
    StreamEvent,
    readers_key,
    request_key,
)

if TYPE_CHECKING:
    from services.api.generation import GenerationRequest, GenerationService

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("services.api")

#: How long after the grace a connection whose client left checks for readers.
GRACE_MARGIN_SECONDS = 0.1
#: How often, meanwhile, it looks whether a client came back.
REATTACH_POLL_SECONDS = 0.5

#: Called with the whole reply once generation succeeded, before the client sees
#: the end of the response (e.g. to record the turn in the session).
OnReply = Callable[[str], Awaitable[None]]


class _Lifecycle:
    """What new and resumed requests share: relaying, ending, reporting."""

    def __init__(
        self,
        service: GenerationService,
        request: Request,
        request_id: str,
        *,
        on_reply: OnReply | None,
        callback: Callback | None,
    ) -> None:
        self.service = service
        self.request = request
        self.request_id = request_id
        self.on_reply = on_reply
        self.callback = callback
        self.accepted_at = time.monotonic()
        self.span = trace.get_current_span()
        # The stages get spans of their own, children of the server span, started and
        # ended explicitly: a span made "current" across the yields of an async
        # generator would leak into the code that consumes it.
        self.parent = otel_context.get_current()
        self.relay_span: trace.Span | None = None
        self.started = False  # a generator took the job (seen on this connection or before it)
        self.ending = False  # this connection saw the generation's end (done or error)
        self.claimed = False  # this connection reports the request's end
        self.resumable = False  # a client may come back for it (GET /chat_stream/{id})
        self.progress_error_code: str | None = None

    # ---------------------------------------------------------------- relaying

    async def relay(self, subscription: Subscription, prefix: str = "") -> AsyncIterator[StreamEvent]:
        """The stream's events as the client gets them; ``prefix``: the reply's text
        before the subscription's cursor (for the turn recorded at the end)."""
        service = self.service
        self.relay_span = span = tracer.start_span(
            "relay", context=self.parent, attributes={"chat.request_id": self.request_id}
        )
        parts: list[str] = [prefix] if prefix else []
        try:
            events = subscription.events(
                service.settings.generator_silence_seconds,
                job_pending=lambda: service.queue.is_pending(self.request_id),
            )
            async for event in events:
                if event.type is EventType.START:
                    self.started = True
                    span.set_attribute("chat.worker", event.worker)
                    self.on_start(event)
                elif event.type is EventType.TOKEN:
                    if not parts:
                        span.add_event("first_token")
                    parts.append(event.text)
                elif event.type is EventType.DONE:
                    self.ending = True
                    span.set_attribute("chat.finish_reason", event.finish_reason)
                    span.set_attribute("gen_ai.usage.input_tokens", event.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", event.completion_tokens)
                    # Before the client sees the end, so that whatever it sends next (a
                    # regenerate) finds the reply recorded; only by the connection that
                    # claims the end, so a resumed request is recorded once.
                    if await self.claim(CallbackMessage.SUCCESS) and self.on_reply is not None:
                        await self.on_reply("".join(parts))
                elif event.type is EventType.ERROR:
                    self.ending = True
                yield event
        except GeneratorLost as exc:
            raise StreamFailed(ErrorCode.GENERATOR_LOST, f"the generator stopped responding: {exc}") from None
        except JobLost:
            raise StreamFailed(
                ErrorCode.JOB_LOST, "no generator started the request (it was rejected or expired); try again"
            ) from None
        except RedisError:
            logger.warning("relaying %s failed", self.request_id, exc_info=True)
            raise StreamFailed(ErrorCode.REDIS_UNAVAILABLE, "lost the connection to Redis") from None
        finally:
            subscription.close()

    def on_start(self, event: StreamEvent) -> None:
        """A generator started the job."""

    @property
    def can_hand_off(self) -> bool:
        """A generator runs the request and its end was not seen: its client can
        resume it on another pod (and nothing this connection does is half done)."""
        return self.started and self.resumable and not self.ending

    async def claim(self, message: CallbackMessage) -> bool:
        """Claim the report of the request's end for this connection (once). A request
        nobody can resume has this one connection only: no Redis claim is needed."""
        if not self.resumable:
            self.claimed = True
        if not self.claimed:
            try:
                self.claimed = await claim_outcome(
                    self.service.redis, self.request_id, message.value, self.service.record_ttl_seconds
                )
            except RedisError:
                logger.warning("claiming the end of %s failed", self.request_id, exc_info=True)
        return self.claimed

    # ---------------------------------------------------------------- ending

    async def finish(self, message: CallbackMessage, progress: RelayProgress) -> None:
        """The response ended with ``message``: end the request, or leave it to the
        grace when the client left while the generation goes on."""
        self._close_spans(message, progress)
        metrics.REQUEST_DURATION.observe(time.monotonic() - self.accepted_at)
        if progress.error is not None:
            metrics.ERRORS.labels(code=progress.error.code).inc()
        if self.resumable:
            await self.service.readers.detach(self.request_id)
        left = message in (
            CallbackMessage.CLIENT_DISCONNECTED_WHILE_STREAMING,
            CallbackMessage.CLIENT_DISCONNECTED_BEFORE_STREAMING,
        )
        if left and self.started and self.resumable and self.service.readers.grace_seconds > 0:
            # The generation goes on; whoever reads on reports the end. If nobody
            # comes back within the grace, this connection does.
            if self.service.drain.draining:
                # Inside the response: the server waits for it before the process exits,
                # in a user's app without a lifespan too.
                await self._after_grace(message, progress)
            else:
                self.service.spawn(self._after_grace(message, progress))
            return
        await self.end(message, progress)

    async def _after_grace(self, message: CallbackMessage, progress: RelayProgress) -> None:
        readers = self.service.readers
        left_at = time.monotonic()
        deadline = left_at + readers.grace_seconds + GRACE_MARGIN_SECONDS
        try:
            # A client that comes back is seen within a poll, so that a draining pod,
            # which waits for this, exits as soon as its clients resumed elsewhere.
            while (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(REATTACH_POLL_SECONDS, remaining))
                if remaining > REATTACH_POLL_SECONDS and await readers.reattached(self.request_id, left_at):
                    return  # its connection reports the end
            # Just past the readers key's expiry (set to the grace when this client
            # left): a key still there means someone re-attached.
            if await readers.anyone_reading(self.request_id):
                return
        except RedisError:
            logger.warning("checking the readers of %s failed", self.request_id, exc_info=True)
        await self.end(message, progress)

    async def end(self, message: CallbackMessage, progress: RelayProgress) -> None:
        """Stop what must stop, keep the stream for late readers, report once."""
        self.progress_error_code = progress.error.code if progress.error is not None else None
        if progress.done is None:
            # Stop the generation (before its permit can go to someone else).
            await self.stop_generation()
        await self.release()
        try:
            # Readable for a while (a client that lost the last events gets them), then
            # gone; at once when nobody can come back for it.
            await self.service.retain_stream(self.request_id, self.resumable)
        except RedisError:
            logger.exception("shortening the life of the stream of %s failed; it expires by itself", self.request_id)
        if not await self.claim(message):
            logger.info("request %s: this connection ended (%s); another reports the end", self.request_id, message)
            return
        logger.info("request %s finished: %s", self.request_id, message.value)
        metrics.REQUESTS.labels(outcome=message.value).inc()
        metrics.CALLBACKS.labels(message=message.value).inc()
        self.request.state.chat = await self.exchange(message, progress)
        await invoke_callback(self.callback, self.request, message)

    async def stop_generation(self) -> None:
        """The client is gone for good: stop the generation wherever it is."""
        try:
            never_ran = await self.service.queue.withdraw(self.request_id)
            self.span.set_attribute("chat.withdrawn_before_start", never_ran)
        except RedisError:
            logger.exception("withdrawing request %s failed; its lease will expire", self.request_id)

    async def release(self) -> None:
        """Give back what this connection holds (a new request's permit)."""

    async def exchange(self, message: CallbackMessage, progress: RelayProgress) -> ChatExchange:
        """``request.state.chat`` for the callback."""
        raise NotImplementedError

    def _close_spans(self, message: CallbackMessage, progress: RelayProgress) -> None:
        self.span.set_attribute("chat.callback_message", message.value)
        span = self.relay_span
        if span is not None:
            span.set_attribute("chat.callback_message", message.value)
            span.set_attribute("chat.tokens_relayed", progress.tokens_sent)
            if progress.error is not None:
                span.set_status(Status(StatusCode.ERROR, progress.error.message))
            span.end()


def _usage_and_reason(message: CallbackMessage, progress: RelayProgress) -> tuple[Usage, str]:
    done = progress.done
    if done is not None:
        return Usage(done.prompt_tokens, done.completion_tokens), done.finish_reason
    # The generation never reported its end: count what the client was sent.
    reason = "error" if message is CallbackMessage.UNKNOWN_ERROR_OCCURRED else FinishReason.CANCELLED.value
    return Usage(None, progress.tokens_sent), reason


class NewRequest(_Lifecycle):
    """A request this pod accepted: it waits for a permit, is enqueued, and relayed."""

    def __init__(
        self,
        service: GenerationService,
        request: Request,
        generation: GenerationRequest,
        ticket: Ticket,
        *,
        record: RequestRecord | None,
        on_reply: OnReply | None,
        callback: Callback | None,
    ) -> None:
        super().__init__(service, request, generation.request_id, on_reply=on_reply, callback=callback)
        self.generation = generation
        self.ticket = ticket
        self.record = record
        self.resumable = record is not None

    async def events(self) -> AsyncIterator[StreamEvent | Queued]:
        """Wait for a permit, enqueue, relay."""
        # A request that must wait for its permit is made resumable first (it may be
        # resumed while queued); one granted at once registers with its job.
        registration = self.registration() if self.record is not None else None
        if registration is not None and self.ticket.acquired_at is None:
            await self.register(registration)
            registration = None
        async for position in self.wait_for_permit():
            yield Queued(position)
        subscription = await self.enqueue(registration)
        async for event in self.relay(subscription):
            yield event

    def registration(self) -> Registration:
        """What makes the request resumable: who may read it, and that someone reads it."""
        assert self.record is not None
        return Registration(
            record_key=request_key(self.request_id),
            fields=self.record.fields(),
            record_ttl_seconds=self.service.record_ttl_seconds,
            readers_key=readers_key(self.request_id),
            readers_ttl_ms=self.service.readers.noted(self.request_id),
        )

    async def register(self, registration: Registration) -> None:
        """Write ``registration`` (for a request that waits for its permit)."""
        try:
            async with self.service.redis.pipeline(transaction=False) as pipe:
                pipe.hset(registration.record_key, mapping=registration.fields)  # type: ignore[arg-type]
                pipe.expire(registration.record_key, registration.record_ttl_seconds)
                pipe.set(registration.readers_key, b"1", px=registration.readers_ttl_ms)
                await pipe.execute()
        except RedisError:
            logger.warning("registering %s failed", self.request_id, exc_info=True)
            raise StreamFailed(ErrorCode.REDIS_UNAVAILABLE, "the request store is unreachable") from None

    async def wait_for_permit(self) -> AsyncIterator[int]:
        """Queue positions while waiting; returns holding the permit."""
        ticket = self.ticket
        wait_span = tracer.start_span(
            "admission.wait", context=self.parent, attributes={"chat.queue_position": ticket.result.position}
        )
        try:
            async for position in ticket.wait():
                yield position
            wait = ticket.acquired_at - ticket.entered_at  # type: ignore[operator]
            metrics.QUEUE_WAIT.observe(wait)
            wait_span.set_attribute("chat.fencing_token", ticket.lease.fencing_token)
            self.span.set_attribute("chat.queue_wait_ms", wait * 1000)
        except QueueTimeout as exc:
            wait_span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise StreamFailed(ErrorCode.QUEUE_TIMEOUT, str(exc)) from None
        except RedisError:
            logger.warning("admission of %s failed", self.request_id, exc_info=True)
            raise StreamFailed(ErrorCode.REDIS_UNAVAILABLE, "admission control is unreachable") from None
        finally:
            wait_span.end()

    async def enqueue(self, registration: Registration | None) -> Subscription:
        """Subscribe to the stream, then enqueue the job (so the generator's very
        first entry already rings this process's reader), with ``registration``."""
        service, generation = self.service, self.generation
        try:
            subscription = await service.reader.subscribe(self.request_id)
            try:
                await service.queue.enqueue(
                    GenerationJob(
                        request_id=self.request_id,
                        messages=generation.messages,
                        sampling=generation.sampling,
                        lease=self.ticket.lease,
                        notify_key=subscription.notify_key,
                        history=generation.history or HistoryWindow(),
                        readers_key=readers_key(self.request_id) if self.record is not None else "",
                        quota=self.ticket.quota,
                        tenant=self.ticket.tenant.name,
                    ),
                    registration,
                )
            except BaseException:
                subscription.close()
                raise
        except RedisError:
            logger.warning("enqueueing %s failed", self.request_id, exc_info=True)
            raise StreamFailed(ErrorCode.REDIS_UNAVAILABLE, "the job queue is unreachable") from None
        return subscription

    def on_start(self, event: StreamEvent) -> None:
        if event.owns_lease:
            self.ticket.hand_over()

    async def release(self) -> None:
        # A generator declared lost renews nothing any more: free its permit now
        # rather than when its lease runs out.
        lost = self.progress_error_code == ErrorCode.GENERATOR_LOST
        await self.ticket.release(force=lost)

    async def exchange(self, message: CallbackMessage, progress: RelayProgress) -> ChatExchange:
        generation, ticket = self.generation, self.ticket
        usage, finish_reason = _usage_and_reason(message, progress)
        done = progress.done
        return ChatExchange(
            request_id=self.request_id,
            session_id=generation.session_id,
            user_input=generation.user_input,
            reply=progress.reply_sent,
            finish_reason=finish_reason,
            usage=usage,
            history=generation.prior_turns,
            history_turns_used=done.history_turns if done is not None and generation.history is not None else None,
            regenerate=generation.regenerate,
            timings=Timings(
                queue_wait=None if ticket.acquired_at is None else ticket.acquired_at - ticket.entered_at,
                time_to_first_token=None
                if progress.first_token_at is None
                else progress.first_token_at - self.accepted_at,
                total=time.monotonic() - self.accepted_at,
            ),
            error=progress.error.code if progress.error is not None else None,
        )


class ResumedRequest(_Lifecycle):
    """A client reading an accepted request's stream again, from a cursor, on any pod."""

    def __init__(
        self,
        service: GenerationService,
        request: Request,
        request_id: str,
        record: RequestRecord,
        backlog: Backlog,
        *,
        on_reply: OnReply | None,
        callback: Callback | None,
    ) -> None:
        super().__init__(service, request, request_id, on_reply=on_reply, callback=callback)
        self.record = record
        self.backlog = backlog
        self.started = bool(backlog.cursor)  # a cursor is an event after the generator's start
        self.resumable = True
        self.prefix = backlog.prefix  # the reply's text up to the cursor

    async def events(self) -> AsyncIterator[StreamEvent | Queued]:
        """Relay the backlog read with the request's record, then the entries after it."""
        service = self.service
        # The generator need only see the readers key within the grace, so the backlog
        # goes out while the attach is on its way: a resumed client's first event does
        # not wait for a round trip. Its failure ends the stream after that event.
        attaching: asyncio.Future[None] | None = asyncio.ensure_future(service.readers.attach(self.request_id))
        backlog = self.backlog
        subscription = service.reader.resume(
            self.request_id, backlog.cursor or STREAM_START, backlog=backlog.entries
        )
        try:
            async for event in self.relay(subscription, self.prefix):
                yield event
                if attaching is not None:
                    await self._attached(attaching)
                    attaching = None
            if attaching is not None:
                await self._attached(attaching)
        finally:
            if attaching is not None and not attaching.done():
                attaching.cancel()
            elif attaching is not None and not attaching.cancelled():
                attaching.exception()  # retrieved: the stream ended for another reason first

    async def _attached(self, attaching: asyncio.Future[None]) -> None:
        try:
            await attaching
        except RedisError:
            logger.warning("resuming %s failed", self.request_id, exc_info=True)
            raise StreamFailed(ErrorCode.REDIS_UNAVAILABLE, "lost the connection to Redis") from None

    async def exchange(self, message: CallbackMessage, progress: RelayProgress) -> ChatExchange:
        usage, finish_reason = _usage_and_reason(message, progress)
        done = progress.done
        record = self.record
        return ChatExchange(
            request_id=self.request_id,
            session_id=record.session_id or None,
            user_input=record.user_input,
            reply=self.prefix + progress.reply_sent,
            finish_reason=finish_reason,
            usage=usage,
            history=(),
            history_turns_used=done.history_turns if done is not None else None,
            regenerate=record.regenerate,
            timings=Timings(
                queue_wait=None,
                time_to_first_token=None
                if progress.first_token_at is None
                else progress.first_token_at - self.accepted_at,
                total=time.monotonic() - self.accepted_at,
            ),
            error=progress.error.code if progress.error is not None else None,
        )
