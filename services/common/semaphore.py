"""A distributed counting semaphore with leases and a bounded, fair wait queue, in Redis.

Many API pods share one limit on concurrent generations. Every operation is one
Lua script, so it is atomic, and every script reads the time from Redis
(``TIME``), never from a client's clock. Holders live in a sorted set scored
by lease expiry and waiters in another; expired entries are purged by every
acquire, so a crashed process can never leak a permit or a queue place: its
lease simply runs out. Each acquire returns a fencing token (a counter that only
grows); the generator checks it before every write, so a holder whose lease
expired during a long pause can no longer act as if it held the permit.

Every request belongs to a tenant (:class:`TenantShare`; one ``default`` tenant
when none are configured). Each tenant waits in a FIFO queue of its own; when
permits are free, every acquire (whoever calls it) hands them to the heads of
the queues, chosen by weighted fair queuing: each tenant has a virtual time that
a grant advances by ``1 / weight``, and the waiting tenant with the smallest one
goes next, so flooding tenants share the permits in proportion to their weights
and an idle tenant's share goes to the others. A tenant that starts waiting again
resumes at the current virtual time (``vclock``): idling earns no credit.
``interactive`` tenants go before ``batch`` ones, except that a waiting batch
tenant gets at least every ``batch_every``-th grant, so batch never starves. A
tenant's ``max_concurrent`` (permits held) and ``max_queued`` (places in its
queue) hold exactly, for the whole cluster. A waiter handed a permit holds it
for what was left of its waiting lease, and for a full lease from its next poll:
one that died meanwhile keeps it no longer than it would have kept its place.

Keys (all under one name, see :class:`SemaphoreKeys`):

* ``holders``  ZSET holder id → lease expiry (Redis time, seconds)
* ``tokens``   HASH holder id → fencing token
* ``fence``    counter of fencing tokens
* ``waiters``  ZSET waiter id → waiting-lease expiry
* ``seq``      counter of arrival numbers
* ``owner``    HASH holder or waiter id → tenant
* ``inuse``    HASH tenant → permits held
* ``tenants``  HASH tenant → "weight max_concurrent" (as its latest request said)
* ``vtime``    HASH tenant → virtual time; ``vclock``: the virtual time of the latest grant
* ``active:interactive``, ``active:batch``  ZSET waiting tenant → virtual time
* ``activeweight``  HASH class → total weight of its waiting tenants
* ``batchdebt``  grants to interactive tenants while a batch tenant waited
* ``q:<tenant>``  ZSET waiter id → arrival number (that tenant's FIFO queue)
* channel ``released``: published on every release, so waiters retry at once
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from services.common.contract import GENERATIONS, SEMAPHORE_KEY_NAMES as _KEY_NAMES, SemaphoreKeys
from services.common.lua import redis_now

#: Lua: forget holder ``id`` (already removed from ``holders``) in the tenant counts.
#: Needs the keys table ``K`` (see ``_KEY_NAMES``).
_DROP_HOLDER = """
local function drop_holder(id)
  redis.call('HDEL', K.tokens, id)
  local tenant = redis.call('HGET', K.owner, id)
  if tenant then
    redis.call('HDEL', K.owner, id)
    if redis.call('HINCRBY', K.inuse, tenant, -1) <= 0 then redis.call('HDEL', K.inuse, tenant) end
  end
end
"""

#: Lua: a tenant's weight and max_concurrent, as its latest request said. Needs ``K``.
_SETTINGS_OF = """
local function settings_of(name)
  local weight_text, cap_text = string.match(redis.call('HGET', K.tenants, name) or '1 0', '^(%S+) (%S+)$')
  return tonumber(weight_text), tonumber(cap_text)
end
"""

#: Lua: take waiter ``id`` out of its tenant's queue (and the tenant out of the
#: waiting set when that was its last waiter). Needs ``K`` and ``queue_prefix``.
_LEAVE_QUEUE = """
local function leave_queue(id, keep_owner)
  local tenant = redis.call('HGET', K.owner, id)
  redis.call('ZREM', K.waiters, id)
  if not tenant then return end
  if not keep_owner then redis.call('HDEL', K.owner, id) end
  local queue = queue_prefix .. tenant
  if redis.call('ZREM', queue, id) == 1 and redis.call('ZCARD', queue) == 0 then
    for _, class in ipairs({'interactive', 'batch'}) do
      if redis.call('ZREM', K['active:' .. class], tenant) == 1 then
        redis.call('HINCRBYFLOAT', K.activeweight, class, -settings_of(tenant))
      end
    end
  end
end
"""

#: The keys every script gets, in this order, as ``KEYS``; scripts name them ``K.<name>``.
_KEYS_TABLE = "local K = {}\n" + "".join(
    f"K[{name!r}] = KEYS[{i}]\n" for i, name in enumerate(_KEY_NAMES, start=1)
)

_PURGE = redis_now() + """
local expired = redis.call('ZRANGEBYSCORE', K.holders, '-inf', now)
if #expired > 0 then
  redis.call('ZREM', K.holders, unpack(expired))
  for _, id in ipairs(expired) do drop_holder(id) end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.waiters, '-inf', now)) do leave_queue(id) end
"""

#: What the scripts over all the keys share (ARGV[1]: the queue prefix).
_HELPERS = _KEYS_TABLE + "local queue_prefix = ARGV[1]\n" + _DROP_HOLDER + _SETTINGS_OF + _LEAVE_QUEUE
_PRELUDE = _HELPERS + _PURGE

# KEYS: _KEY_NAMES, then capacity members, capacity values.
# ARGV: queue prefix, id, limit, lease seconds, max waiting, '1' to cap the limit by
#   the capacity, tenant, weight, 'interactive' or 'batch', tenant's max concurrent
#   (0 = no cap), tenant's max queued (0 = no cap), batch_every (0 = batch waits
#   for interactive).
# Returns {status, position or 0, fencing token or 0}; status 1 acquired, 2 waiting,
#   3 rejected (the queue is full), 4 rejected (the tenant's queue is full).
_ACQUIRE = _PRELUDE + """
local id, limit, lease, max_waiting = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tenant, weight, class = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local max_concurrent, max_queued, batch_every = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local n = #KEYS
if ARGV[6] == '1' then
  local capacity = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[n - 1], '(' .. now, '+inf')) do
    capacity = capacity + tonumber(redis.call('HGET', KEYS[n], member) or '1')
  end
  if capacity < limit then limit = capacity end
end

-- Held, or handed over while waiting: from now on, a full lease.
local function held_token()
  local held = redis.call('ZSCORE', K.holders, id)
  if not held then return nil end
  if tonumber(held) < now + lease then redis.call('ZADD', K.holders, 'XX', now + lease, id) end
  return tonumber(redis.call('HGET', K.tokens, id))
end

local token = held_token()
if token then return {1, 0, token} end

-- The waiting tenant of `class` with the smallest virtual time that is under its cap.
local function eligible(class)
  local active = K['active:' .. class]
  local start = 0
  while true do
    local names = redis.call('ZRANGE', active, start, start + 7)
    if #names == 0 then return nil end
    for _, name in ipairs(names) do
      local _, cap = settings_of(name)
      if cap == 0 or tonumber(redis.call('HGET', K.inuse, name) or '0') < cap then return name end
    end
    start = start + 8
  end
end

local function grant(name, class)
  local queue = queue_prefix .. name
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  local expiry = redis.call('ZSCORE', K.waiters, head) or (now + lease)
  leave_queue(head, true)
  redis.call('ZADD', K.holders, expiry, head)
  redis.call('HSET', K.tokens, head, redis.call('INCR', K.fence))
  redis.call('HINCRBY', K.inuse, name, 1)
  local weight_of = settings_of(name)
  local vt = tonumber(redis.call('HGET', K.vtime, name) or '0')
  redis.call('SET', K.vclock, vt)
  vt = vt + 1 / weight_of
  redis.call('HSET', K.vtime, name, vt)
  if redis.call('ZSCORE', K['active:' .. class], name) then
    redis.call('ZADD', K['active:' .. class], 'XX', vt, name)
  end
end

local queue = queue_prefix .. tenant
local rank = redis.call('ZRANK', queue, id)
local arrived = false
if not rank then
  arrived = true
  local queued_total, queued_here = redis.call('ZCARD', K.waiters), redis.call('ZCARD', queue)
  if queued_here > 0 and redis.call('ZSCORE', K['active:' .. class], tenant) then
    local old_weight = settings_of(tenant)  -- a reloaded file may have changed it
    if old_weight ~= weight then redis.call('HINCRBYFLOAT', K.activeweight, class, weight - old_weight) end
  end
  redis.call('HSET', K.tenants, tenant, weight .. ' ' .. max_concurrent)
  redis.call('HSET', K.owner, id, tenant)
  redis.call('ZADD', queue, redis.call('INCR', K.seq), id)
  redis.call('ZADD', K.waiters, now + lease, id)
  if queued_here == 0 then
    -- It starts waiting: at the current virtual time, or later if it is ahead.
    local vt = math.max(tonumber(redis.call('HGET', K.vtime, tenant) or '0'),
                        tonumber(redis.call('GET', K.vclock) or '0'))
    redis.call('HSET', K.vtime, tenant, vt)
    redis.call('ZADD', K['active:' .. class], vt, tenant)
    redis.call('HINCRBYFLOAT', K.activeweight, class, weight)
  end
  rank = queued_here
  if max_queued > 0 and queued_here >= max_queued then arrived = 4
  elseif queued_total >= max_waiting then arrived = 3 end
else
  redis.call('ZADD', K.waiters, 'XX', now + lease, id)
end

-- Hand the free permits to the heads of the queues, fairly.
local free = limit - redis.call('ZCARD', K.holders)
while free > 0 do
  local batch = eligible('batch')
  local name, chosen = nil, nil
  if batch and batch_every > 0 and tonumber(redis.call('GET', K.batchdebt) or '0') >= batch_every - 1 then
    name, chosen = batch, 'batch'
  else
    name = eligible('interactive')
    chosen = 'interactive'
    if not name then name, chosen = batch, 'batch' end
  end
  if not name then break end
  if chosen == 'batch' then
    redis.call('DEL', K.batchdebt)
  elseif batch then
    redis.call('INCR', K.batchdebt)
  end
  grant(name, chosen)
  free = free - 1
end

token = held_token()
if token then return {1, 0, token} end
if arrived == 3 or arrived == 4 then
  leave_queue(id)
  return {arrived, redis.call('ZCARD', K.waiters), 0}
end
-- About how many start before it: its own tenant's waiters ahead of it, and the
-- others' in proportion to their weight (what fair queuing gives them meanwhile).
rank = redis.call('ZRANK', queue, id)
local others = tonumber(redis.call('HGET', K.activeweight, class) or '0') - weight
local position = rank + 1 + math.floor((rank + 1) * math.max(others, 0) / weight)
if class == 'batch' then position = redis.call('ZCARD', K.waiters) end  -- interactive ones go first
return {2, math.max(1, math.min(position, redis.call('ZCARD', K.waiters))), 0}
"""

# KEYS: holders; ARGV: id, lease seconds. Returns 1 renewed, 0 lease lost.
_RENEW = redis_now() + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not expiry) or tonumber(expiry) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: _KEY_NAMES; ARGV: queue prefix, id, channel. Returns 1 if it held a permit.
_RELEASE = _HELPERS + """
local id = ARGV[2]
local held = redis.call('ZREM', K.holders, id)
local waited = redis.call('ZSCORE', K.waiters, id)
if held == 1 then
  drop_holder(id)
elseif waited then
  leave_queue(id)
end
if held == 1 or waited then
  redis.call('PUBLISH', ARGV[3], id)
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

# KEYS: _KEY_NAMES; ARGV: queue prefix. Returns {holders in use, waiting, [tenant,
# permits held, waiting]...} for every tenant that holds or waits.
_COUNTS = _PRELUDE + """
local out = {redis.call('ZCARD', K.holders), redis.call('ZCARD', K.waiters)}
local seen = {}
local inuse = redis.call('HGETALL', K.inuse)
for i = 1, #inuse, 2 do seen[inuse[i]] = tonumber(inuse[i + 1]) end
for _, class in ipairs({'interactive', 'batch'}) do
  for _, name in ipairs(redis.call('ZRANGE', K['active:' .. class], 0, -1)) do
    seen[name] = seen[name] or 0
  end
end
for name, held in pairs(seen) do
  table.insert(out, name)
  table.insert(out, held)
  table.insert(out, redis.call('ZCARD', queue_prefix .. name))
end
return out
"""




class Priority(str, Enum):
    """A tenant's class: interactive waiters start before batch ones."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


@dataclass(frozen=True)
class TenantShare:
    """What the semaphore knows of a request's tenant: its weight among the waiting
    tenants, its class, and its cluster-wide caps (0 = none)."""

    name: str = "default"
    weight: float = 1.0
    priority: Priority = Priority.INTERACTIVE
    max_concurrent: int = 0
    max_queued: int = 0


#: Every request's tenant when no tenants are configured.
DEFAULT_TENANT = TenantShare()


class AcquireStatus(Enum):
    """Outcome of one acquire attempt."""

    ACQUIRED = 1
    WAITING = 2
    REJECTED = 3  # the queue (all tenants') is full
    TENANT_REJECTED = 4  # the tenant's own queue is full (``max_queued``)


@dataclass(frozen=True)
class AcquireResult:
    """``position`` (1 = next; an estimate with several tenants) while waiting;
    ``fencing_token`` once acquired; the queue length when rejected."""

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


@dataclass(frozen=True)
class Counts:
    """Permits in use and requests waiting, in all and per tenant (name → (held, waiting))."""

    in_use: int
    waiting: int
    tenants: dict[str, tuple[int, int]]


class RedisSemaphore:
    """Client side of the semaphore. One instance per process is enough.

    With ``capacity``, the effective limit is the smaller of ``limit`` and the total
    capacity of the live members, so permits follow the fleet as it scales.
    ``batch_every``: a waiting batch tenant gets at least every so many grants.
    """

    def __init__(
        self,
        redis: Redis,
        keys: SemaphoreKeys,
        limit: int,
        lease_seconds: float,
        max_waiting: int,
        capacity: Capacity | None = None,
        batch_every: int = 10,
    ) -> None:
        self.keys = keys
        self.capacity = capacity
        self.limit = limit
        self.lease_seconds = lease_seconds
        self.max_waiting = max_waiting
        self.batch_every = batch_every
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._counts = redis.register_script(_COUNTS)

    async def acquire(self, holder_id: str, tenant: TenantShare = DEFAULT_TENANT) -> AcquireResult:
        """Take a permit, or join (or stay in) the tenant's wait queue, or be rejected
        when the queue is full. Calling it again while waiting renews the waiting
        lease and acquires when the tenant's turn has come and a permit is free (or
        finds that another call handed it one)."""
        capacity_keys = [self.capacity.members, self.capacity.values] if self.capacity else [self.keys.holders] * 2
        status, position, token = await self._acquire(
            keys=[*self.keys.all, *capacity_keys],
            args=[
                self.keys.queue_prefix, holder_id, self.limit, self.lease_seconds, self.max_waiting,
                "1" if self.capacity else "0", tenant.name, repr(float(tenant.weight)), tenant.priority.value,
                tenant.max_concurrent, tenant.max_queued, self.batch_every,
            ],
        )
        return AcquireResult(AcquireStatus(int(status)), int(position), int(token))

    async def renew(self, holder_id: str) -> bool:
        """Extend a held permit's lease; False when it had already expired (lost)."""
        return bool(await self._renew(keys=[self.keys.holders], args=[holder_id, self.lease_seconds]))

    async def release(self, holder_id: str) -> bool:
        """Give back a permit or a queue place; True when a permit was held."""
        return bool(
            await self._release(
                keys=self.keys.all, args=[self.keys.queue_prefix, holder_id, self.keys.released_channel]
            )
        )

    async def counts(self) -> tuple[int, int]:
        """(permits in use, requests waiting), after purging expired entries."""
        counts = await self.tenant_counts()
        return counts.in_use, counts.waiting

    async def tenant_counts(self) -> Counts:
        """The counts, in all and per tenant, after purging expired entries."""
        in_use, waiting, *rest = await self._counts(keys=self.keys.all, args=[self.keys.queue_prefix])
        tenants = {
            (name.decode() if isinstance(name, bytes) else name): (int(held), int(queued))
            for name, held, queued in zip(rest[::3], rest[1::3], rest[2::3])
        }
        return Counts(int(in_use), int(waiting), tenants)


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

# KEYS: holders, tokens, owner, inuse (what the generator may touch); ARGV: id, token,
# channel. Returns 1 released, 0 not held.
_RELEASE_FENCED = """
local K = {holders = KEYS[1], tokens = KEYS[2], owner = KEYS[3], inuse = KEYS[4]}
""" + _DROP_HOLDER + """
if redis.call('HGET', K.tokens, ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', K.holders, ARGV[1])
drop_holder(ARGV[1])
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
                keys=[self._keys.holders, self._keys.tokens, self._keys.owner, self._keys.inuse],
                args=[*self._args, self._keys.released_channel],
            )
        )
