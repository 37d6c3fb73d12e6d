"""Nothing unbounded in Redis: the chat sessions live in a Redis of their own with a small
memory limit and allkeys-lru, the main Redis has a limit with noeviction, as the chart
deploys them. Filling the sessions Redis to its limit costs only old sessions; admission,
the queue and streaming (on the main Redis) keep working and lose nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.contract import KEY_PREFIX, cancel_key, session_key
from tests.conftest import Stack, synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.processes import RedisServer

#: The chart's policies (helm/chatstream/values.yaml redis.bundled.*), with limits small enough to fill.
MAIN_ARGS = ("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
SESSIONS_ARGS = ("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")

#: One old conversation: ten turns of about 400 bytes each, as the API stores them.
TURN = json.dumps({"user": "tell me about " + "redis " * 30, "assistant": "it is a server " * 18})


@pytest.fixture
def memory_stack(workdir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Stack, RedisServer]]:
    main = RedisServer(workdir, args=MAIN_ARGS)
    sessions = RedisServer(workdir, args=SESSIONS_ARGS)
    stack = Stack(main, workdir, request.node.name[:30])
    stack.generator(synthetic_generator_env(tokens_per_second=100, MAX_NEW_TOKENS="12", GENERATOR_SLOTS="4"))
    stack.api({"SESSION_REDIS_URL": sessions.url, "MAX_CONCURRENT_GENERATIONS": "4", "MAX_QUEUE_SIZE": "64"})
    yield stack, sessions
    stack.stop()
    main.close()
    sessions.close()


def write_sessions(sessions: RedisServer, prefix: str, count: int) -> list[str]:
    """Sessions the way the API writes them: a list of JSON turns under chatstream:session:<id>."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    pipe = sessions.client.pipeline(transaction=False)
    for session_id in ids:
        pipe.rpush(session_key(session_id), *[TURN] * 10)
        pipe.expire(session_key(session_id), 86400)
    pipe.execute()
    return ids


async def converse(base_url: str, text: str) -> tuple[list[int], list[str]]:
    """Two turns of one browser-like client (its session cookie kept); statuses and last events."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        replies = [await stream_chat(client, "/chat_stream", {"user_input": f"{text} turn {n}"}, sse=True) for n in (1, 2)]
    return [r.status for r in replies], [r.sse_events()[-1][0] for r in replies]


async def test_full_sessions_redis_evicts_only_old_sessions_while_streaming_goes_on(memory_stack) -> None:
    stack, sessions = memory_stack
    api = next(s for s in stack.services if hasattr(s, "base_url"))
    main = stack.redis
    # Keys of the kind the relay depends on, each with a TTL (as all of them have).
    main.set(cancel_key("sentinel"), "1", ex=600)
    main.set(f"{KEY_PREFIX}:stream:sentinel", "1", ex=600)

    old = write_sessions(sessions, "old", 1200)  # about 5 MB of sessions: more than the 4 MB limit
    assert sessions.client.info("stats")["evicted_keys"] > 0, "the sessions Redis reached its limit"
    time.sleep(2.1)  # Redis's LRU clock ticks in seconds: the sessions below are younger than all old ones

    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        results = await asyncio.gather(
            *(converse(api.base_url, f"user{i}") for i in range(12)),
            *(
                stream_chat(client, "/v1/chat/completions", {"stream": True, "messages": [{"role": "user", "content": f"v1 {i}"}]})
                for i in range(6)
            ),
        )
    conversations, completions = results[:12], results[12:]
    assert all(statuses == [200, 200] and last == ["done", "done"] for statuses, last in conversations), conversations
    for reply in completions:
        assert reply.status == 200 and reply.text.rstrip().endswith("data: [DONE]"), reply.text[-200:]
    recent = write_sessions(sessions, "recent", 100)

    keys = {k.decode() for k in sessions.client.scan_iter(count=1000)}
    assert all(k.startswith(f"{KEY_PREFIX}:session:") for k in keys), "only sessions live in the sessions Redis"
    assert {session_key(s) for s in recent} <= keys, "the newest sessions were kept"
    through_api = [k for k in keys if not k.split(":")[-1].startswith(("old-", "recent-"))]
    assert len(through_api) == 12, "every conversation through the API kept its session"
    for key in through_api:
        assert len(sessions.client.lrange(key, 0, -1)) == 2
    lost = [s for s in old if session_key(s) not in keys]
    assert len(lost) > 300, "old sessions made room"

    # The main Redis lost nothing and holds no session.
    assert main.info("stats")["evicted_keys"] == 0
    assert main.get(cancel_key("sentinel")) == b"1" and main.exists(f"{KEY_PREFIX}:stream:sentinel")
    assert not list(main.scan_iter(match=f"{KEY_PREFIX}:session:*"))
    assert main.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
