"""Registration of live generator workers, timed by Redis's own clock.

Each generator renews its entry in a sorted set scored by its expiry (Redis
``TIME`` plus a TTL), and its capacity (``GENERATOR_SLOTS``) in a hash beside it;
an entry that is not renewed simply expires, so a killed pod stops counting
without anyone cleaning up after it. The admission semaphore can size its limit
from the capacity of the live generators.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.common.contract import GENERATOR_SLOTS_KEY, GENERATORS_KEY
from services.common.lua import purge_expired, redis_now

# KEYS: generators, slots; ARGV: worker id, ttl, slots.
_REGISTER = (
    redis_now()
    + purge_expired("KEYS[1]", "KEYS[2]", "HDEL")
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
)

_COUNT_LIVE = redis_now() + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


async def register_generator(redis: Redis, worker_id: str, ttl_seconds: float, slots: int = 1) -> None:
    """Add or renew ``worker_id`` with capacity ``slots`` for ``ttl_seconds`` from now (Redis time)."""
    await redis.eval(_REGISTER, 2, GENERATORS_KEY, GENERATOR_SLOTS_KEY, worker_id, str(ttl_seconds), str(slots))


async def unregister_generator(redis: Redis, worker_id: str) -> None:
    """Remove ``worker_id`` at a clean shutdown or when it starts draining."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(GENERATORS_KEY, worker_id)
        pipe.hdel(GENERATOR_SLOTS_KEY, worker_id)
        await pipe.execute()


async def count_live_generators(redis: Redis) -> int:
    """Number of generators whose registration has not expired."""
    return int(await redis.eval(_COUNT_LIVE, 1, GENERATORS_KEY))
