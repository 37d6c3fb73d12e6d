"""Lua fragments shared by the Redis scripts of the registry, the semaphore and the
generator's fenced writes: one definition of "now" (Redis's own clock, never a
client's) and of purging expired members."""

from __future__ import annotations

import re


def redis_now(var: str = "now") -> str:
    """Lua that sets local ``var`` to the Redis server's time in seconds (a float)."""
    return (
        f"local {var}_parts = redis.call('TIME')\n"
        f"local {var} = tonumber({var}_parts[1]) + tonumber({var}_parts[2]) / 1e6\n"
    )


def purge_expired(
    scored_by_expiry: str, companion: str, companion_remove: str, now: str = "now", also: tuple[str, ...] = ()
) -> str:
    """Lua that removes the members of ``scored_by_expiry`` (a sorted set scored by
    expiry) whose time has passed, and the same members from ``companion`` and the
    keys in ``also``, which ``companion_remove`` (``HDEL`` or ``ZREM``) removes
    from. Needs ``now``."""
    var = "expired_" + re.sub(r"\W", "", scored_by_expiry)  # one local per set, stable script text
    removals = "".join(f"  redis.call('{companion_remove}', {key}, unpack({var}))\n" for key in (companion, *also))
    return f"""
local {var} = redis.call('ZRANGEBYSCORE', {scored_by_expiry}, '-inf', {now})
if #{var} > 0 then
  redis.call('ZREM', {scored_by_expiry}, unpack({var}))
{removals}end
"""
