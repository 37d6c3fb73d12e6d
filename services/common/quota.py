"""Token quotas per tenant (``tokens_per_minute``), exact across the cluster.

A generic cell rate algorithm (GCRA) over generated tokens: one key per tenant
holds its theoretical arrival time ``tat`` (Redis time, seconds). Each token
costs ``60 / tokens_per_minute`` seconds; the generator charges a job's tokens
when it ends (``charge``), pushing ``tat`` forward from ``max(tat, now)``. A
tenant may start a request while ``tat - now`` is at most one minute, that is
while it has used no more than its budget over any sliding minute (a full
minute's budget may be spent at once). Past that, ``retry_after`` says exactly
when it may again: ``tat - 60 - now``. A request that is already running is
never cut off; its tokens are charged when it ends, so a tenant can overshoot by
what its running requests generate. Both sides read Redis's clock, never their own.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.common.lua import redis_now

#: How much of the budget may be spent at once: one minute's worth.
WINDOW_SECONDS = 60

# KEYS: quota key; ARGV: tokens, tokens per minute. Returns nothing.
_CHARGE = redis_now() + f"""
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
tat = tat + tonumber(ARGV[1]) * {WINDOW_SECONDS} / tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1)
"""

# KEYS: quota key. Returns milliseconds until a request may start (0 = now).
_RETRY_AFTER = redis_now() + f"""
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local wait = tat - {WINDOW_SECONDS} - now
if wait <= 0 then return 0 end
return math.ceil(wait * 1000)
"""


class TokenBudgets:
    """The tenants' token budgets, in ``redis``."""

    def __init__(self, redis: Redis) -> None:
        self._charge = redis.register_script(_CHARGE)
        self._retry_after = redis.register_script(_RETRY_AFTER)

    async def charge(self, key: str, tokens: int, tokens_per_minute: int) -> None:
        """Count ``tokens`` generated against the budget at ``key``."""
        if tokens > 0:
            await self._charge(keys=[key], args=[tokens, tokens_per_minute])

    async def retry_after(self, key: str) -> float:
        """Seconds until the tenant of ``key`` may start a request (0: now)."""
        return int(await self._retry_after(keys=[key])) / 1000
