"""A stress worker for the semaphore test: ``python -m tests.support.semaphore_stress
REDIS_URL NAME LIMIT LEASE SEED OPERATIONS``. Prints one JSON summary line."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from redis.asyncio import Redis

from services.common.semaphore import AcquireStatus, RedisSemaphore, SemaphoreKeys, lease_is_valid


async def main(url: str, name: str, limit: int, lease: float, seed: int, operations: int) -> None:
    rng = random.Random(seed)
    redis = Redis.from_url(url)
    keys = SemaphoreKeys(name)
    sem = RedisSemaphore(redis, keys, limit=limit, lease_seconds=lease, max_waiting=8)
    counts = dict(operations=0, released=0, abandoned=0, rejected=0, timed_out=0, lost_lease=0)
    for op in range(operations):
        counts["operations"] += 1
        holder = f"w{seed}-op{op}"
        deadline = time.monotonic() + 5
        result = await sem.acquire(holder)
        while result.status is AcquireStatus.WAITING and time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            result = await sem.acquire(holder)
        if result.status is AcquireStatus.REJECTED:
            counts["rejected"] += 1
            await asyncio.sleep(rng.uniform(0, 0.05))
            continue
        if result.status is AcquireStatus.WAITING:
            await sem.release(holder)
            counts["timed_out"] += 1
            continue
        hold = rng.uniform(0, 0.08)
        held_until = time.monotonic() + hold
        while time.monotonic() < held_until:  # renew like a live request does
            await asyncio.sleep(min(lease / 3, held_until - time.monotonic()))
            await sem.renew(holder)
        if not await lease_is_valid(redis, keys, holder, result.fencing_token):
            counts["lost_lease"] += 1
        if rng.random() < 0.1:
            counts["abandoned"] += 1  # walk away without releasing, like a crash
        else:
            await sem.release(holder)
            counts["released"] += 1
    print(json.dumps(counts), flush=True)
    await redis.aclose()


if __name__ == "__main__":
    url, name, limit, lease, seed, ops = sys.argv[1:]
    asyncio.run(main(url, name, int(limit), float(lease), int(seed), int(ops)))
