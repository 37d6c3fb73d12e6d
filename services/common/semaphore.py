"""A distributed counting semaphore with leases and a bounded FIFO wait queue, in Redis.

Many API pods share one limit on concurrent generations. Every operation is one
Lua script, so it is atomic, and every script reads the time from Redis
(``TIME``), never from a client's clock. Holders live in a sorted set scored
by lease expiry and waiters in another; expired entries are purged by every
acquire, so a crashed process can never leak a permit or a queue place: its
lease simply runs out. Each acquire returns a fencing token (a counter that only
grows); the generator checks it before every write, so a holder whose lease
expired during a long pause can no longer act as if it held the permit.

Keys (all under one name, see :class:`SemaphoreKeys`):

* ``holders``  ZSET holder id → lease expiry (Redis time, seconds)
* ``tokens``   HASH holder id → fencing token
* ``fence``    counter of fencing tokens
* ``queue``    ZSET waiter id → arrival number (FIFO order)
* ``waiters``  ZSET waiter id → waiting-lease expiry
* ``seq``      counter of arrival numbers
* channel ``released``: published on every release, so waiters retry at once
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from services.common.contract import KEY_PREFIX
from services.common.lua import purge_expired, redis_now

_PURGE = (
    redis_now()
    + purge_expired("KEYS[1]", "KEYS[2]", "HDEL")  # expired holders and their fencing tokens
    + purge_expired("KEYS[5]", "KEYS[4]", "ZREM")  # waiters that stopped polling leave the queue
)

# KEYS: holders, tokens, fence, queue, waiters, seq, capacity members, capacity values
# ARGV: id, limit, lease seconds, max waiting, '1' to cap the limit by the capacity
# Returns {status, position or 0, fencing token or 0}; status 1 acquired, 2 waiting, 3 rejected.
_ACQUIRE = _PURGE + """
local id, limit, lease, max_waiting = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] == '1' then
  local capacity = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '(' .. now, '+inf')) do
    capacity = capacity + tonumber(redis.call('HGET', KEYS[8], member) or '1')
  end
  if capacity < limit then limit = capacity end
end
local held = redis.call('ZSCORE', KEYS[1], id)
if held then
  return {1, 0, tonumber(redis.call('HGET', KEYS[2], id))}
end
local free = limit - redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[4], id)
if not rank then
  local queued = redis.call('ZCARD', KEYS[4])
  if queued >= free and queued >= max_waiting then
    return {3, queued, 0}
  end
  redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[6]), id)
  rank = queued
end
if rank < free then
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('ZADD', KEYS[1], now + lease, id)
  local token = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[2], id, token)
  return {1, 0, token}
end
redis.call('ZADD', KEYS[5], now + lease, id)
return {2, rank - free + 1, 0}
"""

# KEYS: holders, tokens; ARGV: id, lease seconds. Returns 1 renewed, 0 lease lost.
_RENEW = redis_now() + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not expiry) or tonumber(expiry) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: holders, tokens, queue, waiters; ARGV: id, channel. Returns 1 if it held a permit.
_RELEASE = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local waited = redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if held + waited > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[1])
end
return held
"""


def lease_check_lua(holders: str, tokens: str, holder: str, token: str) -> str:
    """A Lua fragment that assigns ``lease_ok``: whether ``holder`` (a Lua expression)
    holds a live permit with fencing token ``token``, given the Lua expressions of
    the holders and tokens keys. Scripts that must act only under a valid lease
    (the generator's fenced writes) embed it; they declare ``local lease_ok``
    themselves, so the fragment may sit inside a block and still set it."""
    return redis_now("lease_now") + f"""
local lease_expiry = redis.call('ZSCORE', {holders}, {holder})
lease_ok = lease_expiry and tonumber(lease_expiry) > lease_now
  and redis.call('HGET', {tokens}, {holder}) == {token}
"""


# KEYS: holders, tokens; ARGV: id, token. Returns 1 while the lease is live and the token current.
_VALID = "local lease_ok\n" + lease_check_lua("KEYS[1]", "KEYS[2]", "ARGV[1]", "ARGV[2]") + """
if lease_ok then return 1 end
return 0
"""

# KEYS: holders, tokens, fence, queue, waiters, seq; returns {holders in use, waiting}.
_COUNTS = _PURGE + """
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])}
"""


@dataclass(frozen=True)
class SemaphoreKeys:
    """The Redis keys of one named semaphore (the generator needs ``holders`` and
    ``tokens`` to check fencing tokens)."""

    name: str

    def _key(self, part: str) -> str:
        return f"{KEY_PREFIX}:sem:{self.name}:{part}"

    @property
    def holders(self) -> str:
        return self._key("holders")

    @property
    def tokens(self) -> str:
        return self._key("tokens")

    @property
    def fence(self) -> str:
        return self._key("fence")

    @property
    def queue(self) -> str:
        return self._key("queue")

    @property
    def waiters(self) -> str:
        return self._key("waiters")

    @property
    def seq(self) -> str:
        return self._key("seq")

    @property
    def released_channel(self) -> str:
        return self._key("released")

    @property
    def all(self) -> list[str]:
        return [self.holders, self.tokens, self.fence, self.queue, self.waiters, self.seq]


#: The semaphore that caps concurrent generations across the cluster.
GENERATIONS = SemaphoreKeys("generations")


class AcquireStatus(Enum):
    """Outcome of one acquire attempt."""

    ACQUIRED = 1
    WAITING = 2
    REJECTED = 3


@dataclass(frozen=True)
class AcquireResult:
    """``position`` (1 = next) while waiting; ``fencing_token`` once acquired."""

    status: AcquireStatus
    position: int = 0
    fencing_token: int = 0


@dataclass(frozen=True)
class Capacity:
    """Where to read a dynamic cap on the limit: a sorted set of members scored by
    their expiry (Redis time) and a hash of each member's capacity (1 if absent).
    The generators' registrations (``services.common.registry``) have this shape."""

    members: str
    values: str


class RedisSemaphore:
    """Client side of the semaphore. One instance per process is enough.

    With ``capacity``, the effective limit is the smaller of ``limit`` and the total
    capacity of the live members, so permits follow the fleet as it scales.
    """

    def __init__(
        self,
        redis: Redis,
        keys: SemaphoreKeys,
        limit: int,
        lease_seconds: float,
        max_waiting: int,
        capacity: Capacity | None = None,
    ) -> None:
        self.keys = keys
        self.capacity = capacity
        self.limit = limit
        self.lease_seconds = lease_seconds
        self.max_waiting = max_waiting
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._valid = redis.register_script(_VALID)
        self._counts = redis.register_script(_COUNTS)

    async def acquire(self, holder_id: str) -> AcquireResult:
        """Take a permit, or join (or stay in) the wait queue, or be rejected when the
        queue is full. Calling it again while waiting renews the waiting lease and
        acquires when the caller has reached the front and a permit is free."""
        capacity_keys = [self.capacity.members, self.capacity.values] if self.capacity else [self.keys.holders] * 2
        status, position, token = await self._acquire(
            keys=[*self.keys.all, *capacity_keys],
            args=[holder_id, self.limit, self.lease_seconds, self.max_waiting, "1" if self.capacity else "0"],
        )
        return AcquireResult(AcquireStatus(int(status)), int(position), int(token))

    async def renew(self, holder_id: str) -> bool:
        """Extend a held permit's lease; False when it had already expired (lost)."""
        return bool(await self._renew(keys=[self.keys.holders, self.keys.tokens], args=[holder_id, self.lease_seconds]))

    async def release(self, holder_id: str) -> bool:
        """Give back a permit or a queue place; True when a permit was held."""
        return bool(
            await self._release(
                keys=[self.keys.holders, self.keys.tokens, self.keys.queue, self.keys.waiters],
                args=[holder_id, self.keys.released_channel],
            )
        )

    async def counts(self) -> tuple[int, int]:
        """(permits in use, requests waiting), after purging expired entries."""
        in_use, waiting = await self._counts(keys=self.keys.all)
        return int(in_use), int(waiting)


async def lease_is_valid(redis: Redis, keys: SemaphoreKeys, holder_id: str, fencing_token: int) -> bool:
    """True while ``holder_id`` holds a live permit with this fencing token."""
    return bool(await redis.eval(_VALID, 2, keys.holders, keys.tokens, holder_id, str(fencing_token)))


# The lease's own holder keeping it (a generator that took the permit over): both
# act only while the fencing token is still the holder's, so a generation whose
# lease was lost can neither revive nor free a permit that is someone else's now.
# KEYS: holders, tokens; ARGV: id, token, lease seconds. Returns 1 renewed, 0 lost.
_RENEW_FENCED = "local lease_ok\n" + lease_check_lua("KEYS[1]", "KEYS[2]", "ARGV[1]", "ARGV[2]") + """
if not lease_ok then return 0 end
redis.call('ZADD', KEYS[1], 'XX', lease_now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: holders, tokens; ARGV: id, token, channel. Returns 1 released, 0 not held.
_RELEASE_FENCED = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""


class FencedLease:
    """A permit kept by the generation that runs under it: renewed and released
    with its fencing token (see :class:`~services.common.contract.Lease`)."""

    def __init__(self, redis: Redis, holder_id: str, fencing_token: int, seconds: float, keys: SemaphoreKeys = GENERATIONS) -> None:
        self._keys = keys
        self._args = [holder_id, str(fencing_token)]
        self.seconds = seconds
        self._renew = redis.register_script(_RENEW_FENCED)
        self._release = redis.register_script(_RELEASE_FENCED)

    async def renew(self) -> bool:
        """Extend the lease by its length; False when it is lost."""
        return bool(await self._renew(keys=[self._keys.holders, self._keys.tokens], args=[*self._args, self.seconds]))

    async def release(self) -> bool:
        """Give the permit back (waiters retry at once); False when it was not held."""
        return bool(
            await self._release(
                keys=[self._keys.holders, self._keys.tokens], args=[*self._args, self._keys.released_channel]
            )
        )
