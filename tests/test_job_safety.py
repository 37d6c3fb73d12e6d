"""A Redis write must never run code in a generator: jobs are JSON in the contract's
schema, and anything else found in the queue is removed without running.

The attacker here does exactly what someone who can reach Redis would: write a job
key and add its id to the queue, with no help from the API."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time

import httpx
import pytest
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix, job_key_prefix

from services.common.contract import QUEUE_NAME, WAKE_CHANNEL, ChatMessage, GenerationJob, Lease, new_request_id
from services.common.semaphore import GENERATIONS
from tests.support.processes import eventually
from tests.conftest import synthetic_generator_env
from tests.support.client import scrape, stream_chat
from tests.support.processes import wait_until

REJECTED = "chatstream_generator_jobs_rejected_total"


class _CreatesAFile:
    """Unpickling this runs a shell command, as an attacker's payload would."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def plant_job(redis, job_id: str, payload: bytes) -> None:
    """Write a job straight into Redis and wake the workers, bypassing the API."""
    redis.set(job_key_prefix + job_id, payload, ex=60)
    redis.zadd(QUEUE_NAME, {job_id: int(time.time() * 1000)})
    redis.publish(WAKE_CHANNEL, job_id)


def arq_envelope(args: list, function: str = "generate") -> bytes:
    return json.dumps({"t": 1, "f": function, "a": args, "k": {}, "et": int(time.time() * 1000)}).encode()


def rejected(generator, reason: str) -> float:
    return scrape(generator.metrics_url).get(f'{REJECTED}{{reason="{reason}"}}', 0.0)


def gone(redis, job_id: str) -> bool:
    return not redis.exists(job_key_prefix + job_id, in_progress_key_prefix + job_id) and redis.zscore(QUEUE_NAME, job_id) is None


def test_a_pickled_job_planted_in_redis_never_runs_and_the_generator_keeps_serving(stack, tmp_path):
    # The payload is live: unpickled here, it does create its file.
    proof = tmp_path / "unpickled-here"
    pickle.loads(pickle.dumps(_CreatesAFile(str(proof))))
    assert proof.exists()

    generator = stack.generator(synthetic_generator_env(tokens_per_second=200))
    api = stack.api()
    target = tmp_path / "pwned"
    job_id = new_request_id()
    plant_job(stack.redis, job_id, pickle.dumps(_CreatesAFile(str(target))))

    wait_until(lambda: rejected(generator, "not_json") == 1, 10, "the pickled job to be rejected")
    wait_until(lambda: gone(stack.redis, job_id), 5, "the job to leave the queue")
    assert not target.exists(), "the generator unpickled the job"
    assert f"rejected job {job_id} without running it (not_json)" in generator.log()
    assert generator.alive()

    reply = httpx.post(api.base_url + "/chat_stream", json={"user_input": "still serving"}, timeout=20)
    assert reply.status_code == 200 and reply.text
    assert scrape(generator.metrics_url)['chatstream_generator_jobs_total{outcome="length"}'] == 1
    assert not target.exists()


def _valid_job(job_id: str, **overrides) -> dict:
    job = GenerationJob(
        request_id=job_id, messages=[ChatMessage("user", "hi")], lease=Lease("someone", 1)
    ).to_dict()
    return {**job, **overrides}


@pytest.mark.parametrize(
    ("make_payload", "reason"),
    [
        (lambda job_id: arq_envelope([_valid_job(job_id)], function="os.system"), "unknown_function"),
        (lambda job_id: arq_envelope([_valid_job(job_id, sampling={"stop": ["x"] * 5})]), "bad_schema"),
        (lambda job_id: arq_envelope([_valid_job(job_id, messages=[{"role": "tool", "content": "x"}])]), "bad_schema"),
        (lambda job_id: arq_envelope([_valid_job(new_request_id())]), "bad_schema"),  # not the job's own id
        (lambda job_id: arq_envelope([_valid_job(job_id, lease=None)]), "bad_schema"),  # no permit to write under
        (lambda job_id: arq_envelope([_valid_job(job_id), "extra"]), "bad_schema"),
        (lambda job_id: b'{"t": 1, "f": "generate", "a": [', "not_json"),
    ],
    ids=["other-function", "five-stop-strings", "unknown-role", "foreign-request-id", "no-lease", "extra-argument", "truncated"],
)
def test_jobs_outside_the_contract_are_removed_without_running(stack, make_payload, reason):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=200))
    job_id = new_request_id()
    plant_job(stack.redis, job_id, make_payload(job_id))
    wait_until(lambda: rejected(generator, reason) == 1, 10, f"the job to be rejected as {reason}")
    wait_until(lambda: gone(stack.redis, job_id), 5, "the job to leave the queue")
    samples = scrape(generator.metrics_url)
    assert not any(name.startswith("chatstream_generator_jobs_total") and value for name, value in samples.items())
    log = generator.log()
    assert "request " not in log.replace(f"rejected job {job_id}", ""), "the job reached the job runner"
    assert generator.alive()


async def test_during_a_rolling_upgrade_a_job_an_older_generator_rejects_fails_fast(stack):
    """An older generator (arq's default pickle) fails the JSON job of a newer API;
    the API notices that its job is gone without a start and answers 503 at once,
    instead of holding the client until its deadline."""
    from arq.worker import Worker, func

    async def generate(ctx, job):  # never reached: the job cannot be unpickled
        raise AssertionError("an older generator ran a JSON job")

    older = Worker(
        functions=[func(generate, name="generate")],
        queue_name=QUEUE_NAME,
        redis_settings=RedisSettings.from_dsn(stack.redis_server.url),
        poll_delay=0.05,
        keep_result=0,
    )
    api = stack.api({"REQUEST_TIMEOUT_SECONDS": "60"})
    worker_task = asyncio.create_task(older.async_run())
    try:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
            started = time.monotonic()
            reply = await client.post("/chat_stream", json={"user_input": "hi"})
            elapsed = time.monotonic() - started
            sse = await stream_chat(client, "/chat_stream", {"user_input": "hi"}, sse=True)
    finally:
        worker_task.cancel()
        await older.close()
    assert reply.status_code == 503 and reply.json()["error"] == "job_lost", reply.text
    assert elapsed < 5, f"took {elapsed:.1f}s"
    event, data = sse.sse_events()[-1]
    assert event == "error" and data["code"] == "job_lost" and "try again" in data["message"]
    # Released as the response ends (just after the client has read it): within a moment.
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 2, "the permit to be back")

