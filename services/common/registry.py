"""Registration of live generator workers, timed by Redis's own clock.

Each generator renews its entry in a sorted set scored by its expiry (Redis
``TIME`` plus a TTL); an entry that is not renewed simply expires, so a killed
pod stops counting without anyone cleaning up after it.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.common.contract import GENERATORS_KEY

_REGISTER = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[2]), ARGV[1])
return 1
"""

_COUNT_LIVE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
return redis.call('ZCOUNT', KEYS[1], '(' .. t, '+inf')
"""


async def register_generator(redis: Redis, worker_id: str, ttl_seconds: float) -> None:
    """Add or renew ``worker_id`` for ``ttl_seconds`` from now (Redis time)."""
    await redis.eval(_REGISTER, 1, GENERATORS_KEY, worker_id, str(ttl_seconds))


async def unregister_generator(redis: Redis, worker_id: str) -> None:
    """Remove ``worker_id`` at a clean shutdown."""
    await redis.zrem(GENERATORS_KEY, worker_id)


async def count_live_generators(redis: Redis) -> int:
    """Number of generators whose registration has not expired."""
    return int(await redis.eval(_COUNT_LIVE, 1, GENERATORS_KEY))
