"""The generator claims the jobs a poll found in one Lua call, by arq's rule: a job
is claimed by setting its in-progress key, only if no worker holds that key and the
job is still queued and due."""

from __future__ import annotations

from redis.asyncio import Redis

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from services.generator.worker import _CLAIM_JOBS


async def test_only_due_queued_unclaimed_jobs_are_claimed_once(redis_server) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = "claims-test:queue"
    now = timestamp_ms()
    await redis.delete(queue, *(in_progress_key_prefix + j for j in ("due", "taken", "later", "gone")))
    await redis.zadd(queue, {"due": now - 10, "taken": now - 10, "later": now + 60_000})
    await redis.set(in_progress_key_prefix + "taken", "1")
    claim = redis.register_script(_CLAIM_JOBS)
    ids = ["due", "taken", "later", "gone"]
    keys = [queue, *(in_progress_key_prefix + j for j in ids)]

    claimed = await claim(keys=keys, args=[now, 5000, *ids])
    assert claimed[::2] == [b"due"] and int(float(claimed[1])) == now - 10
    assert 0 < await redis.pttl(in_progress_key_prefix + "due") <= 5000
    # A second worker polling the same ids gets nothing: the first holds "due".
    assert await claim(keys=keys, args=[now, 5000, *ids]) == []
    await redis.aclose()
