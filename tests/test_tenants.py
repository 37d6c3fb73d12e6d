"""Tenants: the file, and the fair share, caps and quotas it sets, through the real API
pods, generators and Redis."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from services.api.tenants import DEFAULT, Tenants, TenantsError, key_digest, parse_tenants
from services.common.semaphore import Priority

EXAMPLE = """
tenants:
  search:
    keys: ["sk-search-1", "sha256:%s"]
    weight: 3
    max_concurrent: 8
    max_queued: 32
    tokens_per_minute: 200000
  batch-jobs:
    keys: ["sk-batch-1"]
    weight: 1
    priority: batch
default:
  weight: 2
""" % hashlib.sha256(b"sk-search-2").hexdigest()


def test_the_example_file_parses_into_tenants_looked_up_by_key(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(EXAMPLE)
    tenants = Tenants(path)
    search = tenants.for_token("sk-search-1")
    assert search is tenants.for_token("sk-search-2")  # listed by its digest
    assert (search.name, search.share.weight, search.share.max_concurrent, search.share.max_queued) == ("search", 3, 8, 32)
    assert search.tokens_per_minute == 200000 and search.share.priority is Priority.INTERACTIVE
    assert tenants.for_token("sk-batch-1").share.priority is Priority.BATCH
    assert tenants.for_token("sk-unknown").name == tenants.for_token(None).name == "default"
    assert tenants.default.share.weight == 2
    assert tenants.has_keys and tenants.knows("sk-batch-1") and not tenants.knows("sk-nope")
    assert "sk-search-1" not in repr(search)  # keys never show up in logs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants:\n  a:\n    keys: [k1]\n    wieght: 2\n", "tenants.a: unknown field(s) wieght"),
        ("tenants:\n  a:\n    keys: [k1]\n    weight: 0\n", "tenants.a.weight must be greater than 0"),
        ("tenants:\n  a:\n    keys: [k1]\n    weight: lots\n", "tenants.a.weight must be a number"),
        ("tenants:\n  a:\n    keys: [k1]\n    max_concurrent: 1.5\n", "tenants.a.max_concurrent must be a whole number"),
        ("tenants:\n  a:\n    keys: [k1]\n    max_queued: -1\n", "tenants.a.max_queued must be 0 or more"),
        ("tenants:\n  a:\n    keys: [k1]\n    priority: urgent\n", "tenants.a.priority must be interactive or batch"),
        ("tenants:\n  a:\n    keys: [k1]\n  b:\n    keys: [k2, k1]\n", "tenants.b.keys[1] is listed twice (also under tenants.a)"),
        ("tenants:\n  a:\n    keys: [k1, 'sha256:%s']\n" % hashlib.sha256(b"k1").hexdigest(), "listed twice"),
        ("tenants:\n  a:\n    weight: 1\n", "tenants.a.keys must be a non-empty list"),
        ("tenants:\n  default:\n    keys: [k1]\n", "not 'default'"),
        ("default:\n  keys: [k1]\n", "default: unknown field(s) keys"),
        ("tenant:\n  a: {}\n", "unknown top-level field(s) tenant"),
        ("tenants: [a, b]\n", "must map tenant names"),
        ("tenants:\n  a: {keys: [k1]\n", "not valid YAML"),
    ],
)
def test_a_bad_file_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(TenantsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        parse_tenants(text)


def test_an_unreadable_file_is_refused_at_start(tmp_path):
    with pytest.raises(TenantsError, match="cannot be read"):
        Tenants(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  a:\n    keys: [k1]\n    weight: -2\n")
    with pytest.raises(TenantsError, match=f"TENANTS_FILE '{bad}': tenants.a.weight"):
        Tenants(bad)


def test_the_file_is_re_read_when_it_changes_and_a_bad_edit_keeps_the_previous(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  a:\n    keys: [k1]\n    weight: 2\n")
    tenants = Tenants(path)
    assert tenants.for_token("k1").share.weight == 2
    path.write_text("tenants:\n  a:\n    keys: [k1]\n    weight: 5\n  b:\n    keys: [k2]\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert tenants.for_token("k1").share.weight == 5 and tenants.for_token("k2").name == "b"
    path.write_text("tenants:\n  a:\n    keys: [k1]\n    weight: nope\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    with caplog.at_level(logging.ERROR, logger="services.api.tenants"):
        assert tenants.for_token("k1").share.weight == 5  # the previous tenants stay
    assert "keeping the previous tenants" in caplog.text and "tenants.a.weight" in caplog.text


def test_without_a_file_everyone_is_the_default_tenant():
    tenants = Tenants()
    assert tenants.for_token("anything") is DEFAULT and not tenants.has_keys


# ---------------------------------------------------------------- through the API pods

import asyncio  # noqa: E402
import signal  # noqa: E402

import httpx  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from services.common.semaphore import GENERATIONS, RedisSemaphore  # noqa: E402
from tests.conftest import synthetic_generator_env  # noqa: E402
from tests.support.client import stream_chat  # noqa: E402
from tests.test_admission import generation_intervals, max_overlap  # noqa: E402

TENANTS = """
tenants:
  heavy:
    keys: [k-heavy]
    weight: 3
  light:
    keys: [k-light]
    weight: 1
  capped:
    keys: [k-capped]
    max_concurrent: 2
  metered:
    keys: [k-metered]
    tokens_per_minute: 1200
  narrow:
    keys: [k-narrow]
    max_concurrent: 1
    max_queued: 2
"""


def tenant_env(tmp_path, **extra: str) -> dict[str, str]:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    return {"TENANTS_FILE": str(path), "MAX_QUEUE_SIZE": "200", **extra}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def flood(client: httpx.AsyncClient, url: str, key: str, until: asyncio.Event, ids: list[str]) -> None:
    """One client of a flooding tenant: request after request until told to stop."""
    while not until.is_set():
        async with client.stream("POST", url, json={"user_input": "x"}, headers=auth(key)) as response:
            assert response.status_code == 200, await response.aread()
            ids.append(response.headers["x-request-id"])
            await response.aread()


async def test_two_flooding_tenants_share_two_permits_3_to_1_through_two_api_pods(stack, tmp_path):
    generators = [stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="8")) for _ in range(2)]
    env = tenant_env(tmp_path, MAX_CONCURRENT_GENERATIONS="2")
    apis = [stack.api(env), stack.api(env)]
    stop = asyncio.Event()
    ids: dict[str, list[str]] = {"heavy": [], "light": []}
    async with httpx.AsyncClient(timeout=60) as client:
        clients = [
            asyncio.create_task(flood(client, f"{apis[i % 2].base_url}/chat_stream", f"k-{tenant}", stop, ids[tenant]))
            for tenant in ("heavy", "light")
            for i in range(6)
        ]
        await stack_wait(lambda: len(ids["heavy"]) + len(ids["light"]) >= 110, 60)
        stop.set()
        await asyncio.gather(*clients)
    intervals = generation_intervals(*generators)
    tenant_of = {rid: tenant for tenant, rids in ids.items() for rid in rids}
    starts = [tenant_of[rid] for rid, (start, _) in sorted(intervals.items(), key=lambda kv: kv[1][0]) if rid in tenant_of]
    # Both flood all along from the 10th start to the 100th (6 clients each for 2 permits).
    steady = starts[10:100]
    ratio = steady.count("heavy") / steady.count("light")
    print("SHARE", ratio, "".join(t[0] for t in steady))
    assert 2.7 <= ratio <= 3.3, (ratio, steady)
    assert max_overlap(list(intervals.values())) <= 2


async def stack_wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_flooding_tenant_delays_another_tenants_first_request_by_at_most_one_generation(stack, tmp_path):
    # One generation takes 1 s; 10 of heavy's requests wait for 2 permits.
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="20", GENERATOR_SLOTS="2"))
    api = stack.api(tenant_env(tmp_path, MAX_CONCURRENT_GENERATIONS="2"))
    stop = asyncio.Event()
    heavy_ids: list[str] = []
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        clients = [asyncio.create_task(flood(client, "/chat_stream", "k-heavy", stop, heavy_ids)) for _ in range(12)]
        await stack_wait(lambda: stack.redis.zcard(GENERATIONS.waiters) >= 10, 10)
        await asyncio.sleep(0.3)
        reply = await stream_chat(client, "/chat_stream", {"user_input": "me too"}, sse=True, headers=auth("k-light"))
        stop.set()
        await asyncio.gather(*clients)
    assert reply.status == 200
    first_token = next(t for t, c in zip(reply.times, reply.chunks) if b"event: token" in c)
    # FIFO would have put it behind 10 waiters: 5 s.
    print("FIRST", first_token - reply.started)
    assert first_token - reply.started < 1.0 + 0.6, first_token - reply.started


async def test_max_concurrent_holds_across_two_pods_and_a_killed_pods_permits_come_back(stack, tmp_path):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="10", GENERATOR_SLOTS="6"))
    # A short lease (the default, 10 s, outlasts a failover) keeps the wait for a dead pod's places short.
    lease_seconds = 3.0
    env = tenant_env(tmp_path, MAX_CONCURRENT_GENERATIONS="6", RESUME_GRACE_SECONDS="0", LEASE_SECONDS=f"{lease_seconds:g}")
    apis = [stack.api(env), stack.api(env)]
    async with httpx.AsyncClient(timeout=60) as client:
        async def racer(i: int) -> list[int]:
            statuses = []
            for _ in range(3):
                reply = await stream_chat(client, f"{apis[i % 2].base_url}/chat_stream", {"user_input": "c"}, headers=auth("k-capped"))
                statuses.append(reply.status)
            return statuses

        assert await asyncio.gather(*(racer(i) for i in range(6))) == [[200] * 3] * 6
    intervals = list(generation_intervals(generator).values())
    assert len(intervals) == 18
    assert max_overlap(intervals) == 2  # never more, and the cap was reached

    # The pod that holds capped's places dies: its waiters' places and permits come back.
    doomed = apis[0]
    redis = Redis.from_url(stack.redis_server.url)
    semaphore = RedisSemaphore(redis, GENERATIONS, 6, 3, 200)  # counts purge what expired, as any acquire does
    async with httpx.AsyncClient(timeout=60) as client:
        waiting = [
            asyncio.create_task(stream_chat(client, f"{doomed.base_url}/chat_stream", {"user_input": "c"}, headers=auth("k-capped")))
            for _ in range(5)
        ]
        await stack_wait(lambda: stack.redis.zcard(GENERATIONS.waiters) >= 1, 10)
        doomed.stop(signal.SIGKILL)
        await asyncio.gather(*waiting, return_exceptions=True)
        # Within the lease (the started generations end by themselves meanwhile).
        deadline = time.monotonic() + lease_seconds + 1.0
        while "capped" in (await semaphore.tenant_counts()).tenants:
            assert time.monotonic() < deadline, await semaphore.tenant_counts()
            await asyncio.sleep(0.1)
        # And the cap is whole again on the surviving pod.
        replies = await asyncio.gather(
            *(stream_chat(client, f"{apis[1].base_url}/chat_stream", {"user_input": "c"}, headers=auth("k-capped")) for _ in range(2))
        )
    assert [r.status for r in replies] == [200, 200]
    await redis.aclose()


async def test_a_tenant_over_its_tokens_per_minute_gets_429_with_the_exact_retry_after(stack, tmp_path):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=5000, MAX_NEW_TOKENS="1300"))
    api = stack.api(tenant_env(tmp_path))
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        # 1,300 tokens against 1,200 a minute: 65 s of budget, 5 s past the minute allowed at once.
        first = await stream_chat(client, "/chat_stream", {"user_input": "long"}, headers=auth("k-metered"))
        assert first.status == 200
        charged_at = time.monotonic()
        refused = await client.post("/chat_stream", json={"user_input": "more"}, headers=auth("k-metered"))
        assert refused.status_code == 429 and refused.json()["error"] == "tenant_quota_exceeded"
        retry_after = int(refused.headers["retry-after"])
        assert retry_after == 5, retry_after
        openai = await client.post(
            "/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "hi"}]}, headers=auth("k-metered")
        )
        assert openai.status_code == 429 and openai.headers["retry-after"] in {"4", "5"}
        assert openai.json()["error"]["code"] == "tenant_quota_exceeded" and openai.json()["error"]["type"] == "rate_limit_error"
        # Other tenants are not affected.
        assert (await stream_chat(client, "/chat_stream", {"user_input": "x"}, headers=auth("k-light"))).status == 200
        # A second before the time said, still refused; at it, served.
        await asyncio.sleep(max(0.0, charged_at + retry_after - 1.3 - time.monotonic()))
        assert (await client.post("/chat_stream", json={"user_input": "more"}, headers=auth("k-metered"))).status_code == 429
        await asyncio.sleep(max(0.0, charged_at + retry_after + 0.1 - time.monotonic()))
        assert (await stream_chat(client, "/chat_stream", {"user_input": "more"}, headers=auth("k-metered"))).status == 200
    metrics_text = (await httpx.AsyncClient().get(f"{api.base_url}/metrics")).text
    assert 'chatstream_tenant_rejections_total{reason="tenant_quota_exceeded",tenant="metered"} 3.0' in metrics_text
    # The generator counts each tenant's tokens by name: two replies of 1,300 for metered.
    generated = httpx.get(f"http://127.0.0.1:{generator.metrics_port}/metrics", timeout=10).text
    assert 'chatstream_generator_tenant_tokens_total{tenant="metered"} 2600.0' in generated
    assert 'chatstream_generator_tenant_tokens_total{tenant="light"} 1300.0' in generated


def test_the_documented_example_is_a_valid_file():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tenants.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    tenants, default = parse_tenants(block)
    assert set(tenants) == {"search", "batch-jobs"} and default.share.weight == 1
    assert tenants["search"].key_digests == {key_digest("sk-search-1"), key_digest("test")}


async def test_a_tenant_over_its_max_queued_gets_429_and_the_metrics_show_each_tenant(stack, tmp_path):
    stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="60", GENERATOR_SLOTS="4"))
    api = stack.api(tenant_env(tmp_path, MAX_CONCURRENT_GENERATIONS="4"))
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        narrow = [
            asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "n"}, sse=True, headers=auth("k-narrow")))
            for _ in range(3)
        ]
        await stack_wait(lambda: stack.redis.zcard(GENERATIONS.queue("narrow")) == 2, 10)
        refused = await client.post("/chat_stream", json={"user_input": "n"}, headers=auth("k-narrow"))
        assert refused.status_code == 429 and refused.json()["error"] == "tenant_queue_full"
        assert refused.headers["retry-after"] == "2"
        openai = await client.post(
            "/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "n"}]}, headers=auth("k-narrow")
        )
        assert openai.status_code == 429 and openai.json()["error"]["code"] == "tenant_queue_full"
        # Permits are free for everyone else meanwhile.
        light = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "l"}, headers=auth("k-light")))
        await stack_wait(lambda: stack.redis.hget(GENERATIONS.inuse, "light") == b"1", 10)
        metrics_text = (await client.get("/metrics")).text
        assert 'chatstream_tenant_permits_in_use{tenant="narrow"} 1.0' in metrics_text
        assert 'chatstream_tenant_queue_depth{tenant="narrow"} 2.0' in metrics_text
        assert 'chatstream_tenant_permits_in_use{tenant="light"} 1.0' in metrics_text
        assert 'chatstream_tenant_rejections_total{reason="tenant_queue_full",tenant="narrow"} 2.0' in metrics_text
        for task in narrow:
            task.cancel()
        assert (await light).status == 200


def test_an_api_pod_with_a_bad_tenants_file_refuses_to_start_and_says_where(redis_server, tmp_path):
    from tests.support.processes import free_port
    from tests.test_auth import start_api

    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants:\n  a:\n    keys: [sk-secret-1]\n  b:\n    keys: [sk-secret-1]\n")
    proc = start_api({"TENANTS_FILE": str(bad), "REDIS_URL": redis_server.url, "API_PORT": str(free_port())})
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, output
    assert "refusing to start" in output and "tenants.b.keys[0] is listed twice (also under tenants.a)" in output
    assert "sk-secret-1" not in output and "Traceback" not in output


async def test_with_tenant_keys_every_request_needs_a_key(stack, tmp_path):
    api = stack.api(tenant_env(tmp_path))
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        assert (await client.post("/chat_stream", json={"user_input": "x"})).status_code == 401
        assert (await client.post("/chat_stream", json={"user_input": "x"}, headers=auth("k-wrong"))).status_code == 401
        assert (await client.get("/load", headers=auth("k-light"))).status_code == 200
