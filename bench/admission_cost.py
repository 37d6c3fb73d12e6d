"""Admission benchmark: what tenant-aware admission costs per operation, against the
semaphore it replaced (issue 16's target: at most 2x the old acquire+release, at
100 tenants and 1,000 waiting requests).

Both run side by side on one local redis-server, in the same run: the old one is
``services/common/semaphore.py`` as it was at ``--baseline`` (read from git, not
copied), the new one is the working tree's. Measured, each as the median and p99
of ``--rounds`` calls from one client (a round trip included, as an API pod pays):

* ``acquire+release``: a request that finds a free permit takes it and gives it
  back (the whole admission of a request when the cluster is not full);
* ``arrive+leave`` (loaded): with every permit held and ``--waiting`` requests
  queued (over ``--tenants`` tenants for the new one), a request joins the queue
  and leaves it (one that waits, then gives up or is rejected);
* ``poll`` (loaded): a waiting request asks again (what every waiter does on each
  release and every 0.25 s);
* ``turnover`` (loaded): a holder releases and a waiter's poll hands the permit to
  the next request (for the new one, chosen fairly across the tenants).

Writes ``bench/results/admission.json`` and ``admission.md``.

    .venv/bin/python bench/admission_cost.py      # ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis.asyncio import Redis  # noqa: E402

from services.common import semaphore as current  # noqa: E402
from tests.support.processes import RedisServer  # noqa: E402


def module_at(revision: str) -> ModuleType:
    """``services.common.semaphore`` as it was at ``revision``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:services/common/semaphore.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "semaphore_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("semaphore_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def quantiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"median_us": statistics.median(samples) * 1e6, "p99_us": samples[int(0.99 * (len(samples) - 1))] * 1e6}


async def timed(rounds: int, op: Any) -> dict[str, float]:
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        await op(i)
        samples.append(time.perf_counter() - started)
    return quantiles(samples)


class Subject:
    """One semaphore under test, and how to call it for a request of tenant ``t``."""

    def __init__(self, name: str, module: ModuleType, redis: Redis, limit: int, tenants: int) -> None:
        self.name = name
        self.redis = redis
        self.keys = module.SemaphoreKeys(f"bench-{name}")
        self.sem = module.RedisSemaphore(redis, self.keys, limit, 300, 10**6)
        self.shares = (
            [module.TenantShare(f"t{i}", weight=1 + i % 4) for i in range(tenants)] if hasattr(module, "TenantShare") else None
        )

    async def acquire(self, holder: str, t: int) -> Any:
        if self.shares is None:
            return await self.sem.acquire(holder)
        return await self.sem.acquire(holder, self.shares[t % len(self.shares)])

    async def release(self, holder: str) -> None:
        await self.sem.release(holder)

    async def fifo_head(self) -> str | None:
        """The baseline's next request (None for the tenant-aware one: anyone may ask)."""
        if self.shares is not None:
            return None
        head = await self.redis.zrange(self.keys.queue, 0, 0)
        return head[0].decode()

    async def newest_holder(self) -> str:
        """The holder of the newest permit (the highest fencing token)."""
        tokens = await self.redis.hgetall(self.keys.tokens)
        return max(tokens, key=lambda holder: int(tokens[holder])).decode()


async def measure(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def acquire_release(i: int) -> None:
        await subject.acquire(f"free-{i}", i)
        await subject.release(f"free-{i}")

    out["acquire+release"] = await timed(args.rounds, acquire_release)

    # Fill the pool, then the queue.
    for i in range(args.limit):
        await subject.acquire(f"holder-{i}", i)
    for i in range(args.waiting):
        await subject.acquire(f"waiter-{i}", i)

    async def arrive_leave(i: int) -> None:
        await subject.acquire(f"passer-{i}", i)
        await subject.release(f"passer-{i}")

    out["arrive+leave"] = await timed(args.rounds, arrive_leave)

    async def poll(i: int) -> None:
        await subject.acquire(f"waiter-{i % args.waiting}", i % args.waiting)

    out["poll"] = await timed(args.rounds, poll)

    holders = [f"holder-{i}" for i in range(args.limit)]
    next_waiter = args.waiting
    samples = []
    for i in range(args.rounds):
        # The baseline hands a freed permit only to its queue's head, when it asks; the
        # tenant-aware one to the fair choice, whoever asks.
        asker = await subject.fifo_head() or f"waiter-{i % args.waiting}"
        started = time.perf_counter()
        await subject.release(holders[i % len(holders)])
        await subject.acquire(asker, i)
        samples.append(time.perf_counter() - started)
        holders[i % len(holders)] = await subject.newest_holder()
        await subject.acquire(f"waiter-{next_waiter}", next_waiter)  # the queue keeps its length
        next_waiter += 1
    out["turnover"] = quantiles(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="6b39ee9", help="git revision of the semaphore to compare with")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=100, help="permits (all held in the loaded measurements)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    workdir = REPO / ".cache" / "bench-admission"
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir)

    async def run() -> dict[str, Any]:
        redis = Redis.from_url(server.url)
        try:
            baseline = Subject("baseline", module_at(args.baseline), redis, args.limit, args.tenants)
            tenants = Subject("tenants", current, redis, args.limit, args.tenants)
            return {"baseline": await measure(baseline, args), "tenants": await measure(tenants, args)}
        finally:
            await redis.aclose()

    try:
        results = asyncio.run(run())
    finally:
        server.close()
    ratios = {
        op: results["tenants"][op]["median_us"] / results["baseline"][op]["median_us"] for op in results["baseline"]
    }
    report = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **results,
        "ratio_median": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admission.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Admission cost",
        "",
        f"One client, one local redis-server, {args.rounds} calls each ({report['machine']}). Loaded: {args.limit} "
        f"permits all held and {args.waiting} requests waiting, over {args.tenants} tenants of weights 1-4 for the "
        f"tenant-aware semaphore, in one FIFO queue for the baseline (the semaphore at {args.baseline}).",
        "",
        "| operation | baseline median µs | baseline p99 µs | tenants median µs | tenants p99 µs | ratio (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for op, ratio in ratios.items():
        b, t = results["baseline"][op], results["tenants"][op]
        lines.append(
            f"| {op} | {b['median_us']:.0f} | {b['p99_us']:.0f} | {t['median_us']:.0f} | {t['p99_us']:.0f} | {ratio:.2f} |"
        )
    (args.out / "admission.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
