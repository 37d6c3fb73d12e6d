"""The path every generation request takes through the API pod, whatever its
front door (``/chat_stream``, the OpenAI-compatible routes, the web page):

admit (``admission``) → enqueue for a generator (``enqueue``) → relay its Redis
Stream (``relay``, ``response``) → release the permit, clean up, fire the
callback (``outcome``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from arq.connections import ArqRedis
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from redis.exceptions import RedisError
from starlette.requests import Request

from services.api import metrics
from services.api.admission import Admission, QueueTimeout, Ticket
from services.api.enqueue import JobQueue
from services.api.errors import ApiError
from services.api.exchange import ChatExchange, History, Timings, Usage
from services.api.framing import Framer
from services.api.outcome import Callback, CallbackMessage, invoke_callback
from services.api.relay import GeneratorLost, JobLost, delete_stream
from services.api.response import Queued, RelayProgress, RelayResponse, StreamFailed
from services.api.settings import ApiSettings
from services.api.stream_reader import StreamReader, Subscription
from services.common.logs import request_id_var
from services.common.contract import (
    ChatMessage,
    EventType,
    FinishReason,
    GenerationJob,
    HistoryWindow,
    SamplingParams,
    StreamEvent,
)

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("services.api")

REQUEST_ID_HEADER = "x-request-id"

#: Called with the whole reply once generation succeeded, before the client sees
#: the end of the response (e.g. to record the turn in the session).
OnReply = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, and for whom.

    ``history`` says which of ``messages`` the generator may drop to fit the
    context (``None``: the client owns the conversation, nothing is dropped); the
    fields after it describe the request to the callback (``request.state.chat``,
    see :mod:`services.api.exchange`)."""

    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    history: HistoryWindow | None = None
    session_id: str | None = None
    user_input: str = ""
    prior_turns: History = ()
    regenerate: bool = False


class GenerationService:
    """Admission, enqueueing and relaying, shared by every endpoint of a process."""

    def __init__(self, settings: ApiSettings, redis: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = JobQueue(redis)
        # One multiplexed reader for all the streams this process relays: a few Redis
        # connections however many clients are connected.
        self.reader = StreamReader(redis, max_read_pause=settings.relay_max_read_pause_ms / 1000)
        self.admission = Admission(
            redis,
            limit=settings.max_concurrent_generations,
            max_queue_size=settings.max_queue_size,
            lease_seconds=settings.lease_seconds,
            queue_timeout=settings.queue_timeout_seconds,
            retry_after_seconds=settings.retry_after_seconds,
            follow_generators=settings.admission_follows_generators,
        )

    async def close(self) -> None:
        """Stop background listeners and readers."""
        await self.admission.close()
        await self.reader.close()

    async def admit(self, request_id: str) -> Ticket:
        """First admission attempt, before any response starts: raises
        :class:`ApiError` 429 when the wait queue is full, 503 when Redis is down."""
        try:
            return await self.admission.enter(request_id)
        except RedisError:
            # Clients get a code and a generic message; the details go to the log only.
            logger.warning("admission of %s failed", request_id, exc_info=True)
            raise ApiError(503, "redis_unavailable", "admission control is unreachable") from None

    def respond(
        self,
        request: Request,
        generation: GenerationRequest,
        ticket: Ticket,
        *,
        framer: Framer,
        send_headers_early: bool,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_reply: OnReply | None = None,
        callback: Callback | None = None,
    ) -> RelayResponse:
        """The streaming response for an admitted ``generation``.

        ``callback(request, message)`` fires exactly once, after the response ended.
        """
        request_id = generation.request_id
        request.state.request_id = request_id
        request_id_var.set(request_id)
        span = trace.get_current_span()
        span.set_attribute("chat.request_id", request_id)
        # The stages below get spans of their own, children of the server span. They
        # are started and ended explicitly: a span made "current" across the yields
        # of an async generator would leak into the code that consumes it.
        parent = otel_context.get_current()
        relay_span: trace.Span | None = None

        async def events() -> AsyncIterator[StreamEvent | Queued]:
            nonlocal relay_span
            subscription: Subscription | None = None
            try:
                wait_span = tracer.start_span(
                    "admission.wait", context=parent, attributes={"chat.queue_position": ticket.result.position}
                )
                try:
                    async for position in ticket.wait():
                        yield Queued(position)
                    wait = ticket.acquired_at - ticket.entered_at
                    metrics.QUEUE_WAIT.observe(wait)
                    wait_span.set_attribute("chat.fencing_token", ticket.lease.fencing_token)
                    span.set_attribute("chat.queue_wait_ms", wait * 1000)
                    # Subscribed before the job exists, so that the generator's very first
                    # entry already rings this process's reader.
                    subscription = await self.reader.subscribe(request_id)
                    await self.queue.enqueue(
                        GenerationJob(
                            request_id=request_id,
                            messages=generation.messages,
                            sampling=generation.sampling,
                            lease=ticket.lease,
                            notify_key=subscription.notify_key,
                            history=generation.history or HistoryWindow(),
                        )
                    )
                except QueueTimeout as exc:
                    wait_span.set_status(Status(StatusCode.ERROR, str(exc)))
                    raise StreamFailed("queue_timeout", str(exc)) from None
                except RedisError:
                    logger.warning("enqueueing %s failed", request_id, exc_info=True)
                    raise StreamFailed("redis_unavailable", "the job queue is unreachable") from None
                finally:
                    wait_span.end()
                relay_span = tracer.start_span("relay", context=parent, attributes={"chat.request_id": request_id})
                parts: list[str] = []
                try:
                    events = subscription.events(
                        self.settings.generator_silence_seconds, job_pending=lambda: self.queue.is_pending(request_id)
                    )
                    async for event in events:
                        if event.type is EventType.START:
                            relay_span.set_attribute("chat.worker", event.worker)
                        elif event.type is EventType.TOKEN:
                            if not parts:
                                relay_span.add_event("first_token")
                            parts.append(event.text)
                        elif event.type is EventType.DONE:
                            relay_span.set_attribute("chat.finish_reason", event.finish_reason)
                            relay_span.set_attribute("gen_ai.usage.input_tokens", event.prompt_tokens)
                            relay_span.set_attribute("gen_ai.usage.output_tokens", event.completion_tokens)
                            if on_reply is not None:
                                # Before the client sees the end, so that whatever it sends
                                # next (say, a regenerate) finds the reply already recorded.
                                await on_reply("".join(parts))
                        yield event
                except GeneratorLost as exc:
                    raise StreamFailed("generator_lost", f"the generator stopped responding: {exc}") from None
                except JobLost:
                    raise StreamFailed(
                        "job_lost", "no generator started the request (it was rejected or expired); try again"
                    ) from None
                except RedisError:
                    logger.warning("relaying %s failed", request_id, exc_info=True)
                    raise StreamFailed("redis_unavailable", "lost the connection to Redis") from None
            finally:
                if subscription is not None:
                    subscription.close()

        async def finish(message: CallbackMessage, progress: RelayProgress) -> None:
            span.set_attribute("chat.callback_message", message.value)
            if relay_span is not None:
                relay_span.set_attribute("chat.callback_message", message.value)
                relay_span.set_attribute("chat.tokens_relayed", progress.tokens_sent)
                if progress.error is not None:
                    relay_span.set_status(Status(StatusCode.ERROR, progress.error.message))
                relay_span.end()
            metrics.REQUEST_DURATION.observe(time.monotonic() - response.accepted_at)
            metrics.REQUESTS.labels(outcome=message.value).inc()
            metrics.CALLBACKS.labels(message=message.value).inc()
            if progress.error is not None:
                metrics.ERRORS.labels(code=progress.error.code).inc()
            try:
                if progress.done is None:
                    # Stop the generation before its permit goes to someone else.
                    never_ran = await self.queue.withdraw(request_id)
                    span.set_attribute("chat.withdrawn_before_start", never_ran)
            except RedisError:
                logger.exception("withdrawing request %s failed; its lease will expire", request_id)
            await ticket.release()
            try:
                await delete_stream(self.redis, request_id)
            except RedisError:
                logger.exception("deleting the stream of %s failed; it expires by itself", request_id)
            logger.info("request %s finished: %s", request_id, message.value)
            request.state.chat = _exchange(generation, message, progress, ticket, response.accepted_at)
            await invoke_callback(callback, request, message)

        response = RelayResponse(
            event_source=events,
            framer=framer,
            headers=[(REQUEST_ID_HEADER.encode(), request_id.encode()), *(headers or [])],
            send_headers_early=send_headers_early,
            finish=finish,
            deadline_seconds=self.settings.request_timeout_seconds,
        )
        return response


def _exchange(
    generation: GenerationRequest,
    message: CallbackMessage,
    progress: RelayProgress,
    ticket: Ticket,
    accepted_at: float,
) -> ChatExchange:
    """What the callback is told about a request that ended with ``message``."""
    done = progress.done
    if done is not None:
        finish_reason = done.finish_reason
        usage = Usage(done.prompt_tokens, done.completion_tokens)
    else:
        # The generation never reported its end: count what the client was sent.
        finish_reason = "error" if message is CallbackMessage.UNKNOWN_ERROR_OCCURRED else FinishReason.CANCELLED.value
        usage = Usage(None, progress.tokens_sent)
    now = time.monotonic()
    return ChatExchange(
        request_id=generation.request_id,
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
            time_to_first_token=None if progress.first_token_at is None else progress.first_token_at - accepted_at,
            total=now - accepted_at,
        ),
        error=progress.error.code if progress.error is not None else None,
    )
