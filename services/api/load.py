"""The cluster's load, ``GET /load`` (ChatStream's get_load): for dashboards and the
chat page's busy indicator.

Read from Redis at request time, from the same sources as ``/metrics`` (the
admission semaphore, the arq queue, the generators' registrations), so every API
pod answers the same, cluster-wide numbers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from services.api.errors import ApiError
from services.common.contract import QUEUE_NAME, ErrorCode
from services.common.registry import LiveGenerator, live_generators
from services.common.semaphore import RedisSemaphore

logger = logging.getLogger(__name__)


def _describe(generator: LiveGenerator) -> dict[str, Any]:
    out: dict[str, Any] = {"worker_id": generator.worker_id, "slots": generator.slots}
    if generator.info is not None:
        out |= asdict(generator.info)
        out["context_length"] = generator.info.context_length or None  # 0 = unknown
    return out


async def permit_limit(redis: Redis, semaphore: RedisSemaphore) -> tuple[int, list[LiveGenerator]]:
    """The cluster-wide permit limit now (MAX_CONCURRENT_GENERATIONS, or with
    ADMISSION_FOLLOWS_GENERATORS the smaller of it and the live generators' slots, as the
    acquire script computes it), and the live generators it was computed from."""
    generators = await live_generators(redis)
    if semaphore.capacity is None:
        return semaphore.limit, generators
    return min(semaphore.limit, sum(g.slots for g in generators)), generators


async def load_report(redis: Redis, semaphore: RedisSemaphore) -> dict[str, Any]:
    """The load as a JSON-able dict; raises ``RedisError`` when Redis is down.

    ``busy``: a new request would wait for a permit now; ``queue.full``: it would be
    refused with 429 (both by the semaphore's own acquire rule). ``demand``: the
    requests in the system (holding a permit or waiting for one), what the chart's
    KEDA trigger scales the generators on."""
    in_use, waiting = await semaphore.counts()
    jobs = await redis.zcard(QUEUE_NAME)
    limit, generators = await permit_limit(redis, semaphore)
    slots = sum(g.slots for g in generators)
    # The acquire script grants a newcomer a permit while the queue ahead of it is
    # shorter than the free permits, and refuses it when the queue is also at its max.
    busy = in_use + waiting >= limit
    return {
        "busy": busy,
        "demand": in_use + waiting,
        "permits": {"in_use": in_use, "limit": limit},
        "queue": {"waiting": waiting, "max": semaphore.max_waiting, "full": busy and waiting >= semaphore.max_waiting},
        "jobs_queued": jobs,
        "slots": slots,
        "generators": [_describe(g) for g in generators],
    }


async def load_response(redis: Redis, semaphore: RedisSemaphore) -> JSONResponse:
    """``GET /load``: the report, or 503 ``redis_unavailable`` when Redis is down."""
    try:
        report = await load_report(redis, semaphore)
    except (RedisError, OSError):
        logger.warning("reading the load failed", exc_info=True)
        return ApiError.of(ErrorCode.REDIS_UNAVAILABLE, "Redis is unreachable").to_response()
    return JSONResponse(report)
