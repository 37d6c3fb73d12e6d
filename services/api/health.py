"""Liveness and readiness of an API pod."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from services.common.registry import count_live_generators

logger = logging.getLogger(__name__)


async def liveness() -> JSONResponse:
    """The process is up and its event loop answers."""
    return JSONResponse({"status": "ok"})


async def readiness(redis: Redis) -> JSONResponse:
    """Ready when Redis answers and at least one generator is registered and alive."""
    try:
        await redis.ping()
        generators = await count_live_generators(redis)
    except (RedisError, OSError):
        logger.warning("readiness: Redis is unreachable", exc_info=True)
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    if generators == 0:
        return JSONResponse({"status": "unavailable", "redis": "ok", "generators": 0}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok", "generators": generators})
