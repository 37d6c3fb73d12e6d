"""The reusable streaming-chat object a user mounts in their own FastAPI app.

    chat_stream = ChatStream()  # settings from the environment


    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

The request's journey: validate (``validation``) → session history
(``sessions``) and generation settings (``generation_params``) → then the path
shared by every endpoint (``generation``): admit
(``admission``) → enqueue (``enqueue``) → relay (``relay``, ``response``) →
record the exchange, release the permit and fire the callback (``outcome``).
"""

from __future__ import annotations

import logging

from arq.connections import ArqRedis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.api import metrics
from services.api.errors import ApiError
from services.api.framing import (
    CHATSTREAM_CONTEXT_CLEARED,
    ChatStreamFramer,
    Framer,
    OffsetFramer,
    PlainTextFramer,
    SseFramer,
)
from services.api.generation import REQUEST_ID_HEADER, GenerationRequest, GenerationService
from services.api.generation_params import GenerationParams
from services.api.load import load_response
from services.api.lifecycle import OnReply
from services.api.origin import check_same_origin
from services.api.outcome import Callback
from services.api.response import RelayResponse
from services.api.resume import Backlog, RequestRecord, check_request_id, not_found, owner_of, parse_cursor, parse_offset
from services.api.sessions import SessionStore, Turn, turns_to_messages
from services.api.settings import ApiSettings, ResponseFormat
from services.api.validation import check_body_size, parse_chat_request, read_body
from services.common.contract import ChatMessage, ErrorCode, HistoryWindow, new_request_id
from services.common.redis_client import connect_arq, connect_url

logger = logging.getLogger(__name__)


class ChatStream:
    """Streams model replies for ``/chat_stream``-style routes.

    Create it once per process (it holds the Redis connection pool; connections
    open lazily) and ``await close()`` at shutdown, e.g. in the app's lifespan.
    """

    def __init__(self, settings: ApiSettings | None = None, redis: ArqRedis | None = None) -> None:
        settings = settings or ApiSettings()
        self.settings = settings
        self.redis = redis or connect_arq(settings)
        # Sessions may live in a Redis of their own (SESSION_REDIS_URL): filling it
        # with conversations can then never evict or refuse what admission and the
        # streams need.
        session_redis = self.redis
        if settings.sessions_redis_url != settings.redis_url:
            session_redis = connect_url(settings.sessions_redis_url, settings)
        self.sessions = SessionStore(
            session_redis,
            settings.session_secret_list,
            settings.session_cookie,
            settings.session_ttl_seconds,
            max_bytes=settings.history_max_bytes,
            always_secure=settings.cookie_always_secure,
        )
        self.generation = GenerationService(settings, self.redis)
        self.generation_params = GenerationParams(
            self.sessions,
            self.redis,
            ttl_seconds=settings.session_ttl_seconds,
            allowed_origins=settings.allowed_origins,
            max_body_bytes=settings.max_body_bytes,
        )

    async def close(self) -> None:
        """Stop background listeners and close the Redis pools."""
        await self.generation.close()
        if self.sessions.redis is not self.redis:
            await self.sessions.redis.aclose()
        await self.redis.aclose()

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response | RelayResponse:
        """Answer one chat request with a streaming response.

        ``request_body``: pass the raw body when the route already read it
        (reading it again would hang). ``callback(request, message)``, sync or
        async, fires exactly once after the response ends for every accepted
        request, with a :class:`CallbackMessage`; ``request.state.chat`` then holds
        the finished exchange (:class:`~services.api.exchange.ChatExchange`: the
        reply as sent, usage, history, timings). Bad input is answered with a 4xx
        JSON error and no callback; so is a full wait queue (429 with
        ``Retry-After``).
        """
        try:
            check_same_origin(request, self.settings.allowed_origins)
            if request_body is None:
                body = await read_body(request, self.settings.max_body_bytes)
            else:
                body = request_body
                check_body_size(body, self.settings.max_body_bytes)
            chat_request = parse_chat_request(body, self.settings.max_input_chars)
            session_id, _ = self.sessions.session_id(request)
            try:
                history = await self.sessions.history(session_id, self.settings.history_max_turns + 1)
            except RedisError:
                # Clients get a code and a generic message; the details (hosts, ports,
                # library messages) go to the log only.
                logger.warning("reading the session failed", exc_info=True)
                raise ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "the session store is unreachable") from None
            if chat_request.regenerate and not history:
                raise ApiError(409, "nothing_to_regenerate", "regenerate needs a previous reply in this session")
            sampling = await self.generation_params.sampling(session_id)
            request_id = new_request_id()
            ticket = await self.generation.admit(request_id, request)
        except ApiError as error:
            metrics.count_refused(error.status)
            return self._framer(request)[0].http_error(error)

        if chat_request.regenerate:
            user_input, context = history[-1].user, history[:-1]
        else:
            user_input, context = chat_request.user_input, history
        context = context[-self.settings.history_max_turns :] if self.settings.history_max_turns else []
        messages = [*turns_to_messages(context, self.settings.system_prompt), ChatMessage("user", user_input)]

        # Re-signed with every reply: the signature's timestamp is what expires an
        # idle (or stolen and unused) cookie on the server.
        headers = [(b"set-cookie", self.sessions.set_cookie_header(session_id, request).encode())]
        framer, sse = self._framer(request)
        headers += self._stream_headers(framer, sse, request_id)
        record = RequestRecord(owner_of(request, session_id), session_id, user_input, chat_request.regenerate)
        return self.generation.respond(
            request,
            GenerationRequest(
                request_id,
                messages,
                sampling,
                history=HistoryWindow(turns=len(context), max_tokens=self.settings.history_max_tokens),
                session_id=session_id,
                user_input=user_input,
                prior_turns=tuple(context),
                regenerate=chat_request.regenerate,
            ),
            ticket,
            framer=framer,
            send_headers_early=sse,
            headers=headers,
            record=record,
            on_reply=self._turn_recorder(record, request_id),
            callback=callback,
        )

    async def handle_resume_request(
        self, request: Request, request_id: str, callback: Callback | None = None
    ) -> Response | RelayResponse:
        """Continue the reply of an accepted request on any pod (``GET
        /chat_stream/{request_id}``): with ``Accept: text/event-stream``, the events
        after ``Last-Event-ID`` (all of them without it); as plain text, the body
        after its first ``?offset=`` bytes. Only the requester (the same session
        cookie, or the same API key) may: anyone else gets 404, as for a request
        that never existed or has expired. ``callback`` fires if this connection
        is the one that sees the request's end (exactly once per request)."""
        try:
            self.generation.check_accepting()  # a draining pod sends its client elsewhere
            check_request_id(request_id)
            cursor = parse_cursor(request)
            offset = parse_offset(request)
            session_id, _ = self.sessions.session_id(request)
            try:
                record, entries = await RequestRecord.load_with_entries(self.redis, request_id)
                if record is None or not record.is_owner(request, session_id):
                    raise not_found()
                if not entries and not await self.generation.awaits_generator(request_id):
                    raise not_found()  # its retention is over
            except RedisError:
                logger.warning("reading the record of %s failed", request_id, exc_info=True)
                raise ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "the request store is unreachable") from None
        except ApiError as error:
            return self._framer(request)[0].http_error(error)
        framer, sse = self._framer(request)
        if not sse:
            cursor = ""  # a plain body is resumed by its byte offset
            if offset and isinstance(framer, PlainTextFramer):
                framer = OffsetFramer(framer, offset)
        backlog = Backlog.split(entries, cursor)
        if backlog.seen_end:
            # The client has every event: 204 is what tells an EventSource to stop
            # reconnecting (nothing is relayed, so no callback fires here).
            return Response(status_code=204, headers={REQUEST_ID_HEADER: request_id})
        return self.generation.resume(
            request,
            request_id,
            record,
            backlog,
            framer=framer,
            headers=self._stream_headers(framer, sse, request_id),
            on_reply=self._turn_recorder(record, request_id),
            callback=callback,
        )

    async def handle_cancel_request(self, request: Request, request_id: str) -> Response:
        """Stop a request's generation now (``DELETE /chat_stream/{request_id}``): what
        the chat page's Stop button sends, since a started generation otherwise goes
        on for ``RESUME_GRACE_SECONDS`` after its client left, in case it comes back.
        Only its requester may (404 for anyone else, as for an unknown request); 204,
        also for a request that has ended already. The connection relaying it, if any,
        ends with the generation and reports it (``cancelled``)."""
        try:
            check_request_id(request_id)
            session_id, _ = self.sessions.session_id(request)
            try:
                record = await RequestRecord.load(self.redis, request_id)
                if record is None or not record.is_owner(request, session_id):
                    raise not_found()
                await self.generation.queue.withdraw(request_id)
            except RedisError:
                logger.warning("cancelling %s failed", request_id, exc_info=True)
                raise ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "the request store is unreachable") from None
        except ApiError as error:
            return error.to_response()
        return Response(status_code=204, headers={REQUEST_ID_HEADER: request_id})

    @staticmethod
    def _stream_headers(framer: Framer, sse: bool, request_id: str) -> list[tuple[bytes, bytes]]:
        headers = list(framer.headers(request_id))
        if sse:
            headers.append((b"cache-control", b"no-cache"))
            headers.append((b"x-accel-buffering", b"no"))  # nginx: do not buffer the stream
        return headers

    def _turn_recorder(self, record: RequestRecord, request_id: str) -> OnReply:
        """Records the finished exchange in its session (once: see ``lifecycle``)."""

        async def record_turn(reply: str) -> None:
            turn = Turn(record.user_input, reply)
            try:
                if record.regenerate:
                    await self.sessions.replace_last(record.session_id, turn)
                else:
                    await self.sessions.append(record.session_id, turn)
            except RedisError:
                logger.exception("recording the reply of %s in its session failed", request_id)

        return record_turn

    async def clear_context(self, request: Request) -> Response:
        """Forget the conversation of the request's session (``POST /clear_context``).
        Like the chat route, it refuses other sites (403) and bodies not declared JSON (415)."""
        session_id, new_session = self.sessions.session_id(request)
        try:
            check_same_origin(request, self.settings.allowed_origins)
            if not new_session:
                await self.sessions.clear(session_id)
        except ApiError as error:
            return error.to_response()
        except RedisError:
            logger.warning("clearing the session failed", exc_info=True)
            return ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "the session store is unreachable").to_response()
        if self.settings.response_format is ResponseFormat.CHATSTREAM:
            # ChatStream 0.3's answer: its web UI only reads it as text, but a client
            # that parses it as JSON would fail on an empty 204.
            return JSONResponse(CHATSTREAM_CONTEXT_CLEARED)
        return Response(status_code=204)

    async def get_generation_params(self, request: Request) -> Response:
        """The session's generation settings, the generators' defaults and limits, and
        what its next request would use (``GET /generation_params``)."""
        return await self.generation_params.get(request)

    async def set_generation_params(self, request: Request) -> Response:
        """Change the session's generation settings (``POST /generation_params``); its
        ``/chat_stream`` requests use them. Refuses other sites and non-JSON bodies
        like the chat route, and bad values with 422 naming them."""
        return await self.generation_params.set(request)

    @property
    def accepting(self) -> bool:
        """False once this process drains (SIGTERM, or :meth:`drain`): a readiness probe
        of the user's app should then fail."""
        return not self.generation.drain.draining

    def drain(self) -> None:
        """Start draining as SIGTERM does (see ``services.api.drain``): for servers
        that stop otherwise, or a preStop hook that asks first."""
        self.generation.drain.start("asked")

    def watch_for_shutdown(self) -> None:
        """Start draining on SIGTERM (call it in the app's lifespan startup; otherwise
        the first request does it)."""
        self.generation.drain.install()

    async def get_load(self, request: Request) -> Response:
        """The cluster's permits, queue, jobs and generators (``GET /load``)."""
        return await load_response(self.redis, self.generation.admission.semaphore)

    def _framer(self, request: Request) -> tuple[Framer, bool]:
        if "text/event-stream" in request.headers.get("accept", ""):
            return SseFramer(), True
        if self.settings.response_format is ResponseFormat.CHATSTREAM:
            return ChatStreamFramer(), False
        return PlainTextFramer(), False
