"""Liveness and readiness of an API pod."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from services.common.registry import count_live_generators
from services.common.watchdog import Stall

logger = logging.getLogger(__name__)


async def liveness(stalled: list[Stall]) -> JSONResponse:
    """The process is up, its event loop answers and none of its loops is wedged
    (``stalled``: :meth:`StreamReader.stalls`). Redis being unreachable does not
    count: restarting the pod cannot fix Redis, and the reader retries by itself."""
    if stalled:
        logger.error("liveness: %s; failing /healthz so that the pod is restarted", "; ".join(map(str, stalled)))
        return JSONResponse(
            {"status": "stalled", "stalled": [{"loop": s.loop, "seconds": s.seconds} for s in stalled]}, status_code=503
        )
    return JSONResponse({"status": "ok"})


async def accepting(accepting: bool) -> JSONResponse:
    """The pod's readiness probe: 503 from the moment it drains (SIGTERM), so that it
    leaves the Service at once. It deliberately ignores Redis and the generators (see
    the chart's values.yaml)."""
    if not accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readiness(redis: Redis, accepting: bool = True) -> JSONResponse:
    """Ready when this pod is not draining, Redis answers and at least one generator is
    registered and alive."""
    if not accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await redis.ping()
        generators = await count_live_generators(redis)
    except (RedisError, OSError):
        logger.warning("readiness: Redis is unreachable", exc_info=True)
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    if generators == 0:
        return JSONResponse({"status": "unavailable", "redis": "ok", "generators": 0}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok", "generators": generators})
