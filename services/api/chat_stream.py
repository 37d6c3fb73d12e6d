"""The reusable streaming-chat object a user mounts in their own FastAPI app.

    chat_stream = ChatStream()  # settings from the environment


    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

The request's journey: validate (``validation``) → session history
(``sessions``) → admit: wait for a cluster-wide permit (``admission``) → enqueue
for a generator (``enqueue``) → relay its Redis Stream (``relay``,
``response``) → release the permit, record the exchange and fire the callback
(``outcome``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from opentelemetry import trace
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from services.api.admission import Admission, QueueTimeout, Ticket
from services.api.enqueue import JobQueue
from services.api.errors import ApiError
from services.api.framing import ChatStreamFramer, Framer, PlainTextFramer, SseFramer
from services.api.outcome import Callback, CallbackMessage, invoke_callback
from services.api.relay import GeneratorLost, delete_stream, read_events
from services.api.response import Queued, RelayProgress, RelayResponse, StreamFailed
from services.api.sessions import SessionStore, Turn, turns_to_messages
from services.api.settings import ApiSettings, ResponseFormat
from services.api.validation import ChatStreamRequest, parse_chat_request
from services.common.contract import ChatMessage, EventType, GenerationJob, StreamEvent, new_request_id
from services.common.redis_client import arq_redis_from_url

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("services.api")

REQUEST_ID_HEADER = "x-request-id"


class ChatStream:
    """Streams model replies for ``/chat_stream``-style routes.

    Create it once per process (it holds the Redis connection pool; connections
    open lazily) and ``await close()`` at shutdown, e.g. in the app's lifespan.
    """

    def __init__(self, settings: ApiSettings | None = None, redis: ArqRedis | None = None) -> None:
        settings = settings or ApiSettings()
        self.settings = settings
        self.redis = redis or arq_redis_from_url(settings.redis_url)
        self.sessions = SessionStore(
            self.redis, settings.session_secret, settings.session_cookie, settings.session_ttl_seconds
        )
        self.queue = JobQueue(self.redis)
        self.admission = Admission(
            self.redis,
            limit=settings.max_concurrent_generations,
            max_queue_size=settings.max_queue_size,
            lease_seconds=settings.lease_seconds,
            queue_timeout=settings.queue_timeout_seconds,
            retry_after_seconds=settings.retry_after_seconds,
        )

    async def close(self) -> None:
        """Stop background listeners and close the Redis pool."""
        await self.admission.close()
        await self.redis.aclose()

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response | RelayResponse:
        """Answer one chat request with a streaming response.

        ``request_body``: pass the raw body when the route already read it
        (reading it again would hang). ``callback(request, message)``, sync or
        async, fires exactly once after the response ends for every accepted
        request, with a :class:`CallbackMessage`. Bad input is answered with a
        4xx JSON error and no callback; so is a full wait queue (429 with
        ``Retry-After``).
        """
        request_id = new_request_id()
        try:
            body = request_body if request_body is not None else await request.body()
            chat_request = parse_chat_request(body, self.settings.max_input_chars)
            session_id, new_session = self.sessions.session_id(request)
            try:
                history = await self.sessions.history(session_id, self.settings.history_max_turns + 1)
            except RedisError as exc:
                raise ApiError(503, "redis_unavailable", f"the session store is unreachable: {exc}") from None
            if chat_request.regenerate and not history:
                raise ApiError(409, "nothing_to_regenerate", "regenerate needs a previous reply in this session")
            try:
                ticket = await self.admission.enter(request_id)
            except RedisError as exc:
                raise ApiError(503, "redis_unavailable", f"admission control is unreachable: {exc}") from None
        except ApiError as error:
            return error.to_response()
        return self._stream(request, request_id, ticket, chat_request, session_id, new_session, history, callback)

    async def clear_context(self, request: Request) -> Response:
        """Forget the conversation of the request's session (``POST /clear_context``)."""
        session_id, new_session = self.sessions.session_id(request)
        try:
            if not new_session:
                await self.sessions.clear(session_id)
        except RedisError as exc:
            return ApiError(503, "redis_unavailable", f"the session store is unreachable: {exc}").to_response()
        return Response(status_code=204)

    def _framer(self, request: Request) -> tuple[Framer, bool]:
        if "text/event-stream" in request.headers.get("accept", ""):
            return SseFramer(), True
        if self.settings.response_format is ResponseFormat.CHATSTREAM:
            return ChatStreamFramer(), False
        return PlainTextFramer(), False

    def _stream(
        self,
        request: Request,
        request_id: str,
        ticket: Ticket,
        chat_request: ChatStreamRequest,
        session_id: str,
        new_session: bool,
        history: list[Turn],
        callback: Callback | None,
    ) -> RelayResponse:
        if chat_request.regenerate:
            user_input, context = history[-1].user, history[:-1]
        else:
            user_input, context = chat_request.user_input, history
        context = context[-self.settings.history_max_turns :] if self.settings.history_max_turns else []
        messages = [*turns_to_messages(context, self.settings.system_prompt), ChatMessage("user", user_input)]
        request.state.request_id = request_id
        span = trace.get_current_span()
        span.set_attribute("chat.request_id", request_id)
        span.set_attribute("chat.regenerate", chat_request.regenerate)

        async def events() -> AsyncIterator[StreamEvent | Queued]:
            try:
                async for position in ticket.wait():
                    yield Queued(position)
                span.set_attribute("chat.queue_wait_ms", (ticket.acquired_at - ticket.entered_at) * 1000)
                span.set_attribute("chat.fencing_token", ticket.lease.fencing_token)
                await self.queue.enqueue(GenerationJob(request_id=request_id, messages=messages, lease=ticket.lease))
            except QueueTimeout as exc:
                raise StreamFailed("queue_timeout", str(exc)) from None
            except RedisError as exc:
                raise StreamFailed("redis_unavailable", f"the job queue is unreachable: {exc}") from None
            parts: list[str] = []
            try:
                async for event in read_events(self.redis, request_id, self.settings.generator_silence_seconds):
                    if event.type is EventType.TOKEN:
                        parts.append(event.text)
                    elif event.type is EventType.DONE:
                        # Recorded before the client sees the end, so that a regenerate
                        # sent right after it finds this turn in the history.
                        await record_turn("".join(parts))
                    yield event
            except GeneratorLost as exc:
                raise StreamFailed("generator_lost", f"the generator stopped responding: {exc}") from None
            except RedisError as exc:
                raise StreamFailed("redis_unavailable", f"lost the connection to Redis: {exc}") from None

        async def record_turn(reply: str) -> None:
            turn = Turn(user_input, reply)
            try:
                if chat_request.regenerate:
                    await self.sessions.replace_last(session_id, turn)
                else:
                    await self.sessions.append(session_id, turn)
            except RedisError:
                logger.exception("recording the reply of %s in its session failed", request_id)

        async def finish(message: CallbackMessage, progress: RelayProgress) -> None:
            span.set_attribute("chat.callback_message", message.value)
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
                logger.exception("cleaning up request %s failed", request_id)
            await invoke_callback(callback, request, message)

        headers = [(REQUEST_ID_HEADER.encode(), request_id.encode())]
        if new_session:
            secure = request.url.scheme == "https"
            headers.append((b"set-cookie", self.sessions.set_cookie_header(session_id, secure).encode()))
        framer, sse = self._framer(request)
        if sse:
            headers.append((b"cache-control", b"no-cache"))
            headers.append((b"x-accel-buffering", b"no"))  # nginx: do not buffer the stream
        return RelayResponse(
            event_source=events,
            framer=framer,
            headers=headers,
            send_headers_early=sse,
            finish=finish,
            deadline_seconds=self.settings.request_timeout_seconds,
        )
