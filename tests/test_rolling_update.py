"""The acceptance test of stateless API pods: a rolling update breaks no stream.

Two API pods (a user's app, with the callback) behind a round-robin TCP proxy, one
generator with 40 slots, 40 concurrent seeded SSE streams of 240 tokens, each read
by a client that resumes the way the chat page does. Each API pod is restarted in
turn while they stream: first with SIGTERM (the pod drains: its streams get
``event: reconnect`` and resume on the other pod), then, in a second round, with
``kill -9`` (the connections just drop). Every stream ends with ``done``; every
reply is byte-identical to the same request (same seed) streamed without
interruption; each request's callback fires exactly once, with that reply, and
each session records it exactly once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx
import pytest

from services.common.contract import session_key
from tests.apps.seed_app import EXCHANGES_KEY
from tests.conftest import tiny_generator_env
from tests.support.client import ResumedStream, stream_resuming
from tests.support.processes import eventually
from tests.support.tcp_proxy import TcpProxy
from tests.test_resume import SEED_APP, exchanges

STREAMS = 40
TOKENS = 240
#: Token events every stream must have before a pod is restarted: all are mid-reply.
EVENTS_BEFORE_RESTART = 3


def _request(i: int) -> dict:
    return {"user_input": f"Tell story number {i}"}


async def _one_stream(
    base_url: str, i: int, ready: asyncio.Barrier, progress: dict[int, ResumedStream] | None
) -> ResumedStream:
    """Stream request ``i`` in a session of its own, seeded ``i``, once every stream's
    session is set up (so that they all run together)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30, connect=5)) as client:
        saved = await client.post("/generation_params", json={"seed": 1000 + i, "max_new_tokens": TOKENS})
        assert saved.status_code == 200, saved.text
        await ready.wait()
        result = ResumedStream()
        if progress is not None:
            progress[i] = result
        return await stream_resuming(
            client, _request(i), path="/chat_stream_callback", give_up_after=120, result=result
        )


async def _all(base_url: str, progress: dict[int, ResumedStream] | None = None) -> list[ResumedStream]:
    ready = asyncio.Barrier(STREAMS)
    return await asyncio.gather(*(_one_stream(base_url, i, ready, progress) for i in range(STREAMS)))


def _tokens(stream: ResumedStream) -> int:
    return sum(1 for name, _, _ in stream.events if name == "token")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def _restart(stack, pods: list, index: int, sig: int, progress: dict[int, ResumedStream]):
    """Stop pod ``index`` with ``sig`` while every stream is mid-reply, and start a new
    one on its port as soon as the old one stopped listening (a rolling update's
    surge: the old pod may still be draining); returns the old one."""
    await eventually(
        lambda: len(progress) == STREAMS and all(_tokens(s) >= EVENTS_BEFORE_RESTART for s in progress.values()),
        60,
        "every stream to be under way",
    )
    unfinished = sum(1 for s in progress.values() if s.end is None)
    assert unfinished == STREAMS, (
        "a stream ended before the pods restarted: lengthen the replies",
        sorted((_tokens(s), s.end is not None, s.request_id) for s in progress.values()),
    )
    old = pods[index]
    old.proc.send_signal(sig)
    await eventually(lambda: not _listening(old.port), 10, f"{old.name} to stop listening")
    pods[index] = await asyncio.to_thread(stack.api, old.env_extra, SEED_APP, old.port)
    pods[index].env_extra = old.env_extra
    return old


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_restarting_each_api_pod_breaks_no_stream(stack, tiny_model, sig):
    stack.generator(tiny_generator_env(tiny_model, TEMPERATURE="1.0", MAX_NEW_TOKENS=str(TOKENS), GENERATOR_SLOTS=str(STREAMS)))
    env = {"MAX_CONCURRENT_GENERATIONS": str(STREAMS)}
    pods = [stack.api(env, app=SEED_APP), stack.api(env, app=SEED_APP)]
    for pod in pods:
        pod.env_extra = env
    with TcpProxy([("127.0.0.1", pod.port) for pod in pods]) as proxy:
        uninterrupted = await _all(proxy.url)
        assert all(s.connections == 1 and s.end[0] == "done" for s in uninterrupted)
        # Callbacks fire once a response has ended: wait for all of them before clearing,
        # or a late one is counted with the restarted run's.
        await eventually(lambda: len(exchanges(stack)) == STREAMS, 10, "the uninterrupted runs' callbacks")
        stack.redis.delete(EXCHANGES_KEY)

        progress: dict[int, ResumedStream] = {}
        streams = asyncio.create_task(_all(proxy.url, progress))
        stopped = [await _restart(stack, pods, index, sig, progress) for index in range(len(pods))]
        resumed = await asyncio.wait_for(streams, 120)
        for old in stopped:  # a drained pod exits once its clients resumed elsewhere
            assert await asyncio.to_thread(old.proc.wait, 30) is not None

    for i, (stream, reference) in enumerate(zip(resumed, uninterrupted)):
        assert stream.end == reference.end, f"stream {i}: {stream.end} != {reference.end}"
        assert stream.end[0] == "done" and stream.end[1]["usage"]["completion_tokens"] == TOKENS
        assert stream.text == reference.text, f"stream {i} differs from its uninterrupted run"
        cursors = [c for _, _, c in stream.events]
        assert len(cursors) == len(set(cursors)), f"stream {i} got an event twice"
    # The restarts really cut streams: most of them had to resume (each of the two pods
    # carried about half of them), some more than once.
    reconnected = sum(1 for s in resumed if s.connections > 1)
    handed_off = sum(1 for s in resumed if s.handed_off)
    print(f"{sig.name}: {reconnected} streams resumed, {handed_off} handed off, "
          f"{sum(s.refused for s in resumed)} resumes refused by a draining pod")
    assert reconnected >= STREAMS // 2, f"only {reconnected} streams resumed"
    if sig == signal.SIGTERM:  # drained: told to reconnect, not cut
        assert handed_off == reconnected
    else:
        assert handed_off == 0

    # Exactly one callback per request, with the reply the client got, and one turn each.
    await asyncio.sleep(1)  # a pod's grace timer that were to fire wrongly would by now (grace: 10 s)
    by_request = {}
    for chat in exchanges(stack):
        assert chat["request_id"] not in by_request, f"two callbacks for {chat['request_id']}"
        by_request[chat["request_id"]] = chat
    assert set(by_request) == {s.request_id for s in resumed}
    for stream in resumed:
        chat = by_request[stream.request_id]
        assert chat["message"] == "success" and chat["reply"] == stream.text
        [turn] = [json.loads(t) for t in stack.redis.lrange(session_key(chat["session_id"]), 0, -1)]
        assert turn == {"user": _request(int(chat["user_input"].split()[-1]))["user_input"], "assistant": stream.text}
