"""``python -m services.generator.probe``, the generator pod's exec probe, against a real Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from redis.asyncio import Redis

from services.common.contract import GENERATORS_KEY
from services.common.registry import register_generator
from tests.support.processes import REPO, free_port


def probe(redis_url: str, worker_id: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url}
    if worker_id is not None:
        env["WORKER_ID"] = worker_id
    return subprocess.run(
        [sys.executable, "-m", "services.generator.probe", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )


def register(url: str, worker_id: str, ttl: float) -> None:
    async def go() -> None:
        client = Redis.from_url(url)
        await register_generator(client, worker_id, ttl)
        await client.aclose()

    asyncio.run(go())


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.client.delete(GENERATORS_KEY)
    return redis_server.url


def test_probe_passes_for_a_registered_generator(redis_url: str) -> None:
    register(redis_url, "gen-a", ttl=30)
    result = probe(redis_url, "gen-a")
    assert result.returncode == 0, result.stderr
    assert "'gen-a' registered" in result.stdout


def test_probe_fails_for_a_generator_that_never_registered(redis_url: str) -> None:
    register(redis_url, "someone-else", ttl=30)
    result = probe(redis_url, "gen-b")
    assert result.returncode == 1
    assert "not registered" in result.stderr


def test_probe_fails_once_the_registration_expired(redis_server, redis_url: str) -> None:
    # An entry scored in the past, as a worker that stopped renewing leaves behind.
    seconds, _ = redis_server.client.time()
    redis_server.client.zadd(GENERATORS_KEY, {"gen-c": seconds - 5})
    result = probe(redis_url, "gen-c", "--liveness")
    assert result.returncode == 1
    assert "expired" in result.stderr


def test_unreachable_redis_fails_readiness_but_not_liveness() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    readiness = probe(url, "gen-d")
    assert readiness.returncode == 2 and "redis unreachable" in readiness.stderr
    liveness = probe(url, "gen-d", "--liveness")
    assert liveness.returncode == 0, liveness.stderr


def test_probe_refuses_to_guess_the_worker_id(redis_url: str) -> None:
    result = probe(redis_url, None)
    assert result.returncode == 1
    assert "WORKER_ID is not set" in result.stderr


def test_a_generator_with_invalid_settings_refuses_to_start_with_one_line_per_problem():
    """Like the API: exit code 2 and what is wrong, not a pydantic traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GENERATOR_SLOTS": "0", "PREFIX_CACHE_MB": "lots"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.generator"], env=env, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "refusing to start, invalid settings" in output and "Traceback" not in output
    problems = [line.strip() for line in output.splitlines() if line.startswith("  ")]
    assert len(problems) == 2 and problems[0].startswith("GENERATOR_SLOTS: ") and "PREFIX_CACHE_MB: " in problems[1], output
