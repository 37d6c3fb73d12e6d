"""Least privilege in Redis: the API, the generators and KEDA each log in as their own
ACL user, with the rules of helm/chatstream/files/redis-acl.conf (the chart's one
source), on a real Redis. The whole service works under them, and each user is
refused what it must not do, by Redis itself (NOPERM)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from scripts.redis_acl import PASSWORD_ENV, RULES_FILE, acl_file, users
from services.common.semaphore import GENERATIONS
from services.common.contract import QUEUE_NAME, session_key, session_params_key, stream_key
from tests.conftest import Stack, synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.deploy import find, helm_template, parse
from tests.support.processes import RedisServer, eventually

PASSWORDS = {name: secrets.token_hex(16) for name in PASSWORD_ENV}
#: The tests' own user, to set up and inspect data; not one of the chart's.
ADMIN, ADMIN_PASSWORD = "chatstream-test-admin", secrets.token_hex(16)

#: KEDA's redis scaler's script (pkg/scalers/redis_scaler.go): the depth of a list-like key by its type.
KEDA_SCRIPT = """
local listType = redis.call('type', KEYS[1]).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[listType], KEYS[1])
"""


def start_acl_redis(workdir: Path, tmp: Path, extra_args: tuple[str, ...] = (), only: set[str] | None = None) -> RedisServer:
    """A real Redis whose users are the chart's (plus the tests' admin)."""
    path = tmp / "users.acl"
    path.write_text(acl_file(PASSWORDS, only) + f"user {ADMIN} on >{ADMIN_PASSWORD} ~* &* +@all\n")
    # DEBUG enabled, so that only the ACL stands between a user and it.
    args = ("--aclfile", str(path), "--enable-debug-command", "yes", *extra_args)
    return RedisServer(workdir, args=args, username=ADMIN, password=ADMIN_PASSWORD)


def login(server: RedisServer, user: str) -> redis.Redis:
    """A client of ``server`` logged in as one of the chart's users."""
    return redis.Redis.from_url(server.url_for(user, PASSWORDS[user]))


@pytest.fixture(scope="module")
def acl_redis(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_acl_redis(workdir, tmp_path_factory.mktemp("acl"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def acl_stack(acl_redis: RedisServer, workdir: Path) -> Iterator[Stack]:
    """One API and one synthetic generator, each with its own user; one permit, so a
    second request waits in the admission queue."""
    stack = Stack(acl_redis, workdir, "acl")
    stack.generator(
        {**synthetic_generator_env(tokens_per_second=40, MAX_NEW_TOKENS="20"), "REDIS_URL": acl_redis.url_for("chatstream-generator", PASSWORDS["chatstream-generator"])}
    )
    stack.api({"REDIS_URL": acl_redis.url_for("chatstream-api", PASSWORDS["chatstream-api"]), "MAX_CONCURRENT_GENERATIONS": "1", "RESUME_GRACE_SECONDS": "1"})
    acl_redis.client.acl_log_reset()
    yield stack
    stack.stop()


def denials(server: RedisServer) -> list[dict]:
    """ACL LOG entries of the chart's users. CLIENT SETINFO is left out: redis-py sends
    it on connect and ignores the refusal (see redis-acl.conf)."""
    return [
        entry
        for entry in server.client.acl_log()
        if entry["username"] in PASSWORD_ENV and not str(entry["object"]).startswith("client|setinfo")
    ]


def assert_refused(client: redis.Redis, *command: str) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)


def assert_refused_in_script(client: redis.Redis, script: str, *keys: str) -> None:
    """A script's command refused by the ACL (Redis checks each command a script runs)."""
    with pytest.raises(redis.exceptions.ResponseError, match="user executing the script can't run this command"):
        client.eval(script, len(keys), *keys)


def test_the_charts_redis_gets_the_rules_these_tests_load(acl_redis) -> None:
    objects = parse(helm_template())
    rendered = find(objects, "ConfigMap", "-redis-acl")["data"]["redis-acl.conf"]
    assert rendered == RULES_FILE.read_text()
    assert users(rendered) == users()
    # The bundled HA Redis's own users (replication, sentinel) are in the file too; the
    # services' tests load the services' users only.
    assert set(users()) == {"default", *PASSWORD_ENV, "chatstream-replication", "chatstream-sentinel"}
    loaded = set(acl_redis.client.acl_users())
    assert loaded == {"default", *PASSWORD_ENV, ADMIN}


async def test_service_streams_cancels_queues_and_reports_under_its_acl_users(acl_stack, acl_redis) -> None:
    (generator,) = [s for s in acl_stack.services if s.name.startswith("acl-gen")]
    (api,) = [s for s in acl_stack.services if s.name.startswith("acl-api")]
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        reply = await stream_chat(client, "/chat_stream", {"user_input": "hello there"}, sse=True)
        assert reply.status == 200
        events = reply.sse_events()
        assert events[-1][0] == "done"
        assert "".join(d["text"] for n, d in events if n == "token").startswith("hello there")

        # Resumable: the requester reads the finished stream again (request record,
        # readers key, stream read back), on the API's user.
        again = await client.get(f"/chat_stream/{reply.request_id}", headers={"accept": "text/event-stream"})
        # The same end, at the same cursor (tokens read back together may be fewer events).
        assert again.status_code == 200 and again.text.split("\n\n")[-2] == reply.text.split("\n\n")[-2]

        # A client that goes away mid-reply: the generation goes on for the grace (1 s;
        # these replies are shorter, so it finishes), renewing and then releasing its
        # own permit on the generator's user.
        gone = await stream_chat(client, "/chat_stream", {"user_input": "go away"}, stop_after_chunks=2)
        await eventually(lambda: f"request {gone.request_id} finished: length" in generator.log(), 10, "the generation to end")
        await eventually(lambda: acl_redis.client.zcard(GENERATIONS.holders) == 0, 3, "the permit to return")
        # Once the grace is over, nobody came back: the stream is kept for the retention only.
        await eventually(lambda: 0 < acl_redis.client.ttl(stream_key(gone.request_id)) <= 60, 3, "the retention")

        # One permit: the second request waits in the admission queue, then is served.
        first = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "first"}, sse=True))
        await asyncio.sleep(0.1)
        second = await stream_chat(client, "/chat_stream", {"user_input": "second"}, sse=True)
        assert (await first).status == 200 and second.status == 200
        assert any(name == "queued" for name, _ in second.sse_events())
        assert second.sse_events()[-1][0] == "done"

        completion = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi openai"}]})
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["message"]["content"].startswith("hi openai")

        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["generators"] == 1
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "chatstream_queue_depth" in metrics.text
    assert generator.alive()
    assert denials(acl_redis) == [], "a component was refused something it needs"


async def test_session_settings_and_load_work_under_the_acl_users(acl_stack, acl_redis) -> None:
    (api,) = [s for s in acl_stack.services if s.name.startswith("acl-api")]
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        load = await client.get("/load")
        assert load.status_code == 200, load.text
        (generator,) = load.json()["generators"]
        assert generator["model_id"] == "synthetic", "the generator published its info, the API read it"
        saved = await client.post("/generation_params", json={"max_new_tokens": 3, "temperature": 0.5})
        assert saved.status_code == 200, saved.text
        assert saved.json()["defaults"]["max_new_tokens"] == 20
        assert (await client.get("/generation_params")).json()["session"] == {"max_new_tokens": 3, "temperature": 0.5}
        reply = await stream_chat(client, "/chat_stream", {"user_input": "a b"}, sse=True)
        assert reply.sse_events()[-1][1]["usage"]["completion_tokens"] == 3
        await client.post("/generation_params", json={"max_new_tokens": None, "temperature": None})
    assert denials(acl_redis) == [], "a component was refused something it needs"


def test_generator_user_is_refused_admin_commands_and_sessions(acl_redis) -> None:
    key = session_key("someone")
    acl_redis.client.rpush(key, '{"user": "private", "assistant": "words"}')
    generator = login(acl_redis, "chatstream-generator")
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE")):
        assert_refused(generator, *command)
    assert_refused(generator, "LRANGE", key, "0", "-1")
    assert_refused(generator, "RPUSH", key, "forged")
    assert_refused(generator, "DEL", key)
    assert_refused(generator, "EVAL", "return redis.call('LRANGE', KEYS[1], 0, -1)", "1", key)
    assert_refused(generator, "HGET", session_params_key("someone"), "temperature")
    # Nor can it take a queue place or a fencing token: the semaphore's other keys are the API's.
    assert_refused(generator, "ZADD", "chatstream:sem:generations:queue", "1", "forged")
    assert_refused(generator, "INCR", "chatstream:sem:generations:fence")
    # What it may read of a stream: its top entry (to write again what a failover lost).
    assert generator.xrevrange("chatstream:stream:any", count=1) == []
    assert acl_redis.client.lrange(key, 0, -1) == [b'{"user": "private", "assistant": "words"}']


def test_api_user_is_refused_admin_commands(acl_redis) -> None:
    api = login(acl_redis, "chatstream-api")
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "maxmemory", "0"), ("KEYS", "*"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("ACL", "LIST")):
        assert_refused(api, *command)
    assert_refused(api, "SET", "someone-elses-key", "x")


def test_keda_user_can_only_count_the_queue(acl_redis) -> None:
    acl_redis.client.zadd(QUEUE_NAME, {"job-a": 1, "job-b": 2})
    keda = login(acl_redis, "chatstream-keda")
    try:
        assert keda.eval(KEDA_SCRIPT, 1, QUEUE_NAME) == 2
        assert keda.zcard(QUEUE_NAME) == 2
        for command in (("ZADD", QUEUE_NAME, "3", "job-c"), ("ZREM", QUEUE_NAME, "job-a"), ("DEL", QUEUE_NAME), ("ZRANGE", QUEUE_NAME, "0", "-1")):
            assert_refused(keda, *command)
        assert_refused_in_script(keda, "return redis.call('ZADD', KEYS[1], 3, 'job-c')", QUEUE_NAME)
        assert_refused_in_script(keda, "return redis.call('DEL', KEYS[1])", QUEUE_NAME)
        for command in (("GET", "arq:job:job-a"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("PUBLISH", "chatstream:wake", "x")):
            assert_refused(keda, *command)
        assert acl_redis.client.zcard(QUEUE_NAME) == 2
    finally:
        acl_redis.client.delete(QUEUE_NAME)


def test_unauthenticated_connections_may_only_ping(acl_redis) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port)
    assert anonymous.ping()
    for command in (("GET", "x"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("SUBSCRIBE", "chatstream:wake")):
        assert_refused(anonymous, *command)
