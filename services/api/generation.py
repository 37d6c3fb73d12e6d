"""The path every generation request takes through the API pod, whatever its
front door (``/chat_stream``, the OpenAI-compatible routes, the web page):

admit (``admission``) → then one request's life (``lifecycle``): wait for the
permit, enqueue for a generator (``enqueue``), relay its Redis Stream (``relay``,
``response``), end it and fire the callback (``outcome``); or, on any pod, the
rest of an accepted request's stream (``resume``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from opentelemetry import trace
from redis.exceptions import RedisError
from starlette.requests import Request

from services.api import metrics
from services.api.admission import Admission, Ticket
from services.api.bearer import bearer_token
from services.api.drain import Drain
from services.api.enqueue import JobQueue
from services.api.errors import ApiError
from services.api.exchange import History
from services.api.framing import Framer
from services.api.lifecycle import GRACE_MARGIN_SECONDS, NewRequest, OnReply, ResumedRequest
from services.api.outcome import Callback
from services.api.relay import delete_stream
from services.api.response import RelayResponse
from services.api.resume import Backlog, Readers, RequestRecord
from services.api.settings import ApiSettings
from services.api.stream_reader import StreamReader
from services.api.tenants import Tenant, Tenants
from services.common.quota import TokenBudgets
from services.common.contract import ChatMessage, ErrorCode, HistoryWindow, Quota, SamplingParams, quota_key, stream_key
from services.common.logs import request_id_var

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


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
        self.reader = StreamReader(
            redis, max_read_pause=settings.relay_max_read_pause_ms / 1000, retry_seconds=settings.redis_retry_seconds
        )
        self.admission = Admission(
            redis,
            limit=settings.max_concurrent_generations,
            max_queue_size=settings.max_queue_size,
            lease_seconds=settings.lease_seconds,
            queue_timeout=settings.queue_timeout_seconds,
            retry_after_seconds=settings.retry_after_seconds,
            follow_generators=settings.admission_follows_generators,
            batch_every=settings.batch_every_grants,
        )
        self.tenants = Tenants(settings.tenants_file or None)
        self.budgets = TokenBudgets(redis)
        self.readers = Readers(redis, settings.resume_grace_seconds)
        self.drain = Drain()
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stop background listeners and readers. A draining pod first waits out the
        grace of the streams it handed off (it reports the end of those nobody resumed)."""
        if self.drain.draining and self._background:
            timeout = self.readers.grace_seconds + GRACE_MARGIN_SECONDS + 1
            logger.info("waiting up to %.1fs for the grace of %d handed-off streams", timeout, len(self._background))
            await asyncio.wait(list(self._background), timeout=timeout)
        for task in list(self._background):
            task.cancel()
        await self.readers.close()
        await self.admission.close()
        await self.reader.close()

    def tenant_of(self, request: Request) -> Tenant:
        """The tenant a request belongs to, by its API key."""
        return self.tenants.for_token(bearer_token(request.scope))

    async def admit(self, request_id: str, request: Request) -> Ticket:
        """First admission attempt, before any response starts, in the tenant of
        ``request``: raises :class:`ApiError` 429 when the wait queue (or the
        tenant's) is full, 503 when Redis is down or this pod is shutting down."""
        self.check_accepting()
        tenant = self.tenant_of(request)
        trace.get_current_span().set_attribute("chat.tenant", tenant.name)
        quota = Quota(quota_key(tenant.name), tenant.tokens_per_minute) if tenant.tokens_per_minute else None
        try:
            if quota is not None:
                await self._check_quota(tenant, quota)
            return await self.admission.enter(request_id, tenant.share, quota)
        except ApiError as error:
            if error.status == 429:
                reason = "queue_full" if error.code == "too_many_requests" else error.code
                metrics.TENANT_REJECTIONS.labels(tenant=tenant.name, reason=reason).inc()
            raise
        except RedisError:
            # Clients get a code and a generic message; the details go to the log only.
            logger.warning("admission of %s failed", request_id, exc_info=True)
            raise ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "admission control is unreachable") from None

    async def _check_quota(self, tenant: Tenant, quota: Quota) -> None:
        """:class:`ApiError` 429 ``tenant_quota_exceeded`` while the tenant has spent its
        tokens per minute, with the exact second it may start again."""
        wait = await self.budgets.retry_after(quota.key)
        if wait > 0:
            seconds = math.ceil(wait)
            raise ApiError(
                429,
                "tenant_quota_exceeded",
                f"tenant {tenant.name!r} has used its {quota.tokens_per_minute} tokens per minute; retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    def check_accepting(self) -> None:
        """:class:`ApiError` 503 ``shutting_down`` once this pod drains. ``Connection:
        close`` makes a keep-alive client reconnect, through the Service, to another pod."""
        self.drain.install()  # the first request of a user's app installs the SIGTERM hook
        if self.drain.draining:
            raise ApiError(
                503,
                "shutting_down",
                "this API server is shutting down; retry (another one takes the request)",
                headers={"retry-after": "1", "connection": "close"},
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background (a grace timer), kept until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def record_ttl_seconds(self) -> int:
        """Lifetime of a request's record and outcome: longer than it can live."""
        settings = self.settings
        return int(
            settings.request_timeout_seconds + settings.resume_grace_seconds + settings.resume_retention_seconds + 60
        )

    async def awaits_generator(self, request_id: str) -> bool:
        """Whether a request whose stream has no entries may still get them: its job
        waits in the queue, or has just been taken (the generator has yet to write)."""
        return await self.queue.is_pending(request_id) or bool(await self.redis.exists(stream_key(request_id)))

    async def retain_stream(self, request_id: str, resumable: bool) -> None:
        """Keep a finished resumable request's stream for RESUME_RETENTION_SECONDS,
        then drop it; drop any other at once."""
        retention = int(self.settings.resume_retention_seconds)
        if retention <= 0 or not resumable:
            await delete_stream(self.redis, request_id)
        else:
            await self.redis.expire(stream_key(request_id), retention)

    def _response(
        self,
        request: Request,
        lifecycle: NewRequest | ResumedRequest,
        framer: Framer,
        send_headers_early: bool,
        headers: list[tuple[bytes, bytes]] | None,
    ) -> RelayResponse:
        request_id = lifecycle.request_id
        request.state.request_id = request_id
        request_id_var.set(request_id)
        lifecycle.span.set_attribute("chat.request_id", request_id)
        # A draining pod hands a stream to another only if its client can resume it there
        # while the generation goes on (the grace).
        hand_off = lifecycle.resumable and self.readers.grace_seconds > 0
        response = RelayResponse(
            lifecycle=lifecycle,
            framer=framer,
            headers=[(REQUEST_ID_HEADER.encode(), request_id.encode()), *(headers or [])],
            send_headers_early=send_headers_early,
            deadline_seconds=self.settings.request_timeout_seconds,
            send_timeout_seconds=self.settings.send_timeout_seconds,
            drain=self.drain if hand_off else None,
        )
        lifecycle.accepted_at = response.accepted_at
        return response

    def respond(
        self,
        request: Request,
        generation: GenerationRequest,
        ticket: Ticket,
        *,
        framer: Framer,
        send_headers_early: bool,
        headers: list[tuple[bytes, bytes]] | None = None,
        record: RequestRecord | None = None,
        on_reply: OnReply | None = None,
        callback: Callback | None = None,
    ) -> RelayResponse:
        """The streaming response for an admitted ``generation``; with ``record`` it
        can be resumed (``resume``) on any pod.

        ``callback(request, message)`` fires exactly once, after the request ended.
        """
        lifecycle = NewRequest(
            self, request, generation, ticket, record=record, on_reply=on_reply, callback=callback
        )
        return self._response(request, lifecycle, framer, send_headers_early, headers)

    def resume(
        self,
        request: Request,
        request_id: str,
        record: RequestRecord,
        backlog: Backlog,
        *,
        framer: Framer,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_reply: OnReply | None = None,
        callback: Callback | None = None,
    ) -> RelayResponse:
        """The rest of a request's stream: ``backlog``'s entries, then those to come."""
        lifecycle = ResumedRequest(
            self, request, request_id, record, backlog, on_reply=on_reply, callback=callback
        )
        return self._response(request, lifecycle, framer, True, headers)
