"""Registration of live generator workers, timed by Redis's own clock.

Each generator renews its entry in a sorted set scored by its expiry (Redis
``TIME`` plus a TTL), its capacity (``GENERATOR_SLOTS``) in a hash beside it, and
what it serves (:class:`GeneratorInfo`: model, sampling defaults, limits) in a
second hash; an entry that is not renewed simply expires, so a killed pod stops
counting without anyone cleaning up after it. The admission semaphore can size
its limit from the capacity of the live generators; the API reports and
validates against what they publish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from services.common.contract import GENERATOR_INFO_KEY, GENERATOR_SLOTS_KEY, GENERATORS_KEY, GeneratorInfo
from services.common.lua import purge_expired, redis_now

logger = logging.getLogger(__name__)

# KEYS: generators, slots, info; ARGV: worker id, ttl, slots, info JSON ('' = none).
_REGISTER = (
    redis_now()
    + purge_expired("KEYS[1]", "KEYS[2]", "HDEL", also=("KEYS[3]",))
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
end
return 1
"""
)

_COUNT_LIVE = redis_now() + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

# KEYS: generators, slots, info. Returns worker id, slots, info, ... of each live
# generator ('' where absent). Read-only: expired entries are skipped here and
# purged by the next registration, so readers need no write access.
_LIVE = redis_now() + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
return out
"""


@dataclass(frozen=True)
class LiveGenerator:
    """One registered generator whose registration has not expired."""

    worker_id: str
    slots: int
    #: ``None`` when it published none (a version before GeneratorInfo) or one
    #: this version cannot read.
    info: GeneratorInfo | None


async def register_generator(
    redis: Redis, worker_id: str, ttl_seconds: float, slots: int = 1, info: GeneratorInfo | None = None
) -> None:
    """Add or renew ``worker_id`` with capacity ``slots`` and its ``info`` for
    ``ttl_seconds`` from now (Redis time)."""
    await redis.eval(
        _REGISTER,
        3,
        GENERATORS_KEY,
        GENERATOR_SLOTS_KEY,
        GENERATOR_INFO_KEY,
        worker_id,
        str(ttl_seconds),
        str(slots),
        info.to_json() if info else "",
    )


async def unregister_generator(redis: Redis, worker_id: str) -> None:
    """Remove ``worker_id`` at a clean shutdown or when it starts draining."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(GENERATORS_KEY, worker_id)
        pipe.hdel(GENERATOR_SLOTS_KEY, worker_id)
        pipe.hdel(GENERATOR_INFO_KEY, worker_id)
        await pipe.execute()


async def count_live_generators(redis: Redis) -> int:
    """Number of generators whose registration has not expired."""
    return int(await redis.eval(_COUNT_LIVE, 1, GENERATORS_KEY))


async def live_generators(redis: Redis) -> list[LiveGenerator]:
    """The generators whose registration has not expired, with what they published."""
    flat = await redis.eval(_LIVE, 3, GENERATORS_KEY, GENERATOR_SLOTS_KEY, GENERATOR_INFO_KEY)
    out = []
    for raw_id, raw_slots, raw_info in zip(flat[::3], flat[1::3], flat[2::3]):
        worker_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        info = None
        if raw_info:
            try:
                info = GeneratorInfo.from_json(raw_info)
            except ValueError as exc:
                logger.warning("generator %s published info this version cannot read: %s", worker_id, exc)
        # A generator without a slots entry counts as one slot, as admission counts it.
        out.append(LiveGenerator(worker_id, int(raw_slots or 1), info))
    return out
