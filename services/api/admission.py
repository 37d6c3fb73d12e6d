"""Admission: a request waits its turn for one of the cluster's generation permits.

A thin layer over :class:`services.common.semaphore.RedisSemaphore` that adds what
an HTTP request needs: the first attempt happens before the response starts (so
a full queue is a real 429 with ``Retry-After``), waiting reports the queue
position as it changes, ends at ``QUEUE_TIMEOUT_SECONDS``, keeps the lease alive
while the request lives, and releases exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from services.api.errors import ApiError
from services.common.pubsub import listen_forever
from services.common.contract import GENERATOR_SLOTS_KEY, GENERATORS_KEY, Lease, Quota
from services.common.semaphore import (
    GENERATIONS,
    AcquireResult,
    AcquireStatus,
    Capacity,
    RedisSemaphore,
    TenantShare,
)

logger = logging.getLogger(__name__)


#: How soon a renewal that failed (Redis unreachable) is tried again.
RENEW_RETRY_SECONDS = 0.25

class QueueTimeout(Exception):
    """The request waited longer than ``QUEUE_TIMEOUT_SECONDS``."""


class ReleaseNotifier:
    """One pub/sub subscription per process that wakes every local waiter when a
    permit is released anywhere in the cluster."""

    def __init__(self, redis: Redis, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def wait(self, timeout: float) -> None:
        """Return on the next release, or after ``timeout`` seconds."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen())
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _listen(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        await listen_forever(self._redis, self._channel, notify)

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class Ticket:
    """One request's place in admission: waiting, then holding a permit."""

    def __init__(
        self, admission: Admission, request_id: str, tenant: TenantShare, first: AcquireResult, quota: Quota | None
    ) -> None:
        self._admission = admission
        self.request_id = request_id
        self.tenant = tenant
        self.quota = quota  # the budget the job's tokens are charged to
        self.result = first
        self.entered_at = time.monotonic()
        self.acquired_at: float | None = time.monotonic() if first.status is AcquireStatus.ACQUIRED else None
        self._released = False
        self._handed_over = False
        self._keepalive: asyncio.Task[None] | None = None
        if first.status is AcquireStatus.ACQUIRED:
            self._start_keepalive()

    def _start_keepalive(self) -> None:
        # Renew at a third of the lease while the request lives. If renewal fails
        # for good, the generator's fenced writes stop and the client gets an error.
        self._keepalive = asyncio.create_task(self._renew_until_released())

    @property
    def lease(self) -> Lease:
        """The permit the job runs under (only after acquiring), with its length, so
        that the generator running the job can keep it alive."""
        return Lease(self.request_id, self.result.fencing_token, self._admission.semaphore.lease_seconds)

    @property
    def handed_over(self) -> bool:
        """Whether the generator now renews and releases the permit."""
        return self._handed_over

    def hand_over(self) -> None:
        """The generator took the permit over (its ``start`` entry said so): stop
        renewing it here, and never release it from here, so that the generation
        holds it for as long as it runs, whatever becomes of this pod."""
        self._handed_over = True
        if self._keepalive is not None:
            self._keepalive.cancel()

    async def wait(self) -> AsyncIterator[int]:
        """Yield the queue position (1 = next) each time it changes, until the permit
        is held. Raises :class:`QueueTimeout` past the deadline."""
        semaphore = self._admission.semaphore
        deadline = self.entered_at + self._admission.queue_timeout
        last_position = 0
        while self.result.status is AcquireStatus.WAITING:
            if self.result.position != last_position:
                last_position = self.result.position
                yield last_position
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout(f"waited {self._admission.queue_timeout:g}s for a free generator")
            await self._admission.notifier.wait(min(self._admission.poll_interval, remaining))
            self.result = await semaphore.acquire(self.request_id, self.tenant)
        if self._keepalive is None:
            self.acquired_at = time.monotonic()
            self._start_keepalive()

    async def _renew_until_released(self) -> None:
        semaphore = self._admission.semaphore
        interval = semaphore.lease_seconds / 3
        delay, failing = interval, False
        while True:
            await asyncio.sleep(delay)
            try:
                renewed = await semaphore.renew(self.request_id)
            except Exception:
                if not failing:
                    logger.warning("renewing the lease of %s failed; retrying", self.request_id, exc_info=True)
                failing = True
                # Soon, not a whole interval later: the lease outlives an outage (a
                # failover) of up to two thirds of it only if the first answer renews it.
                delay = min(interval, RENEW_RETRY_SECONDS)
                continue
            delay, failing = interval, False
            if not renewed:
                logger.error("request %s lost its generation permit", self.request_id)
                return

    async def release(self, *, force: bool = False) -> None:
        """Give the permit (or the queue place) back; safe to call more than once.
        Does nothing once the permit was handed over to the generator, unless
        ``force``: the generator is gone (its fenced writes fail once the permit is
        someone else's, so taking it back early is safe)."""
        if self._released or (self._handed_over and not force):
            return
        self._released = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        try:
            await self._admission.semaphore.release(self.request_id)
        except Exception:
            # The lease then expires by itself within LEASE_SECONDS.
            logger.exception("releasing the permit of %s failed", self.request_id)


class Admission:
    """The API pod's admission control for generations."""

    def __init__(
        self,
        redis: Redis,
        *,
        limit: int,
        max_queue_size: int,
        lease_seconds: float,
        queue_timeout: float,
        retry_after_seconds: int,
        follow_generators: bool = False,
        batch_every: int = 10,
    ) -> None:
        capacity = Capacity(GENERATORS_KEY, GENERATOR_SLOTS_KEY) if follow_generators else None
        self.semaphore = RedisSemaphore(
            redis, GENERATIONS, limit, lease_seconds, max_queue_size, capacity, batch_every=batch_every
        )
        self.notifier = ReleaseNotifier(redis, GENERATIONS.released_channel)
        self.queue_timeout = queue_timeout
        self.retry_after_seconds = retry_after_seconds
        # Waiters re-check at least this often (releases wake them sooner); it also
        # renews their waiting lease, so it must stay well under the lease.
        self.poll_interval = min(0.25, lease_seconds / 3)

    async def enter(self, request_id: str, tenant: TenantShare, quota: Quota | None = None) -> Ticket:
        """First attempt: take a permit or a place in the tenant's queue.

        Raises :class:`ApiError` 429 (with ``Retry-After``) when the queue, or the
        tenant's own (``max_queued``), is full.
        """
        result = await self.semaphore.acquire(request_id, tenant)
        retry = {"Retry-After": str(self.retry_after_seconds)}
        if result.status is AcquireStatus.REJECTED:
            raise ApiError(
                429,
                "too_many_requests",
                f"all generators are busy and {result.position} requests are already waiting; retry later",
                headers=retry,
            )
        if result.status is AcquireStatus.TENANT_REJECTED:
            raise ApiError(
                429,
                "tenant_queue_full",
                f"tenant {tenant.name!r} already has {tenant.max_queued} requests waiting (its max_queued); retry later",
                headers=retry,
            )
        return Ticket(self, request_id, tenant, result, quota)

    async def close(self) -> None:
        """Stop the release listener."""
        await self.notifier.close()
