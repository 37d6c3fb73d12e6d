"""The exactly-once callback contract under chaos: hundreds of requests through two
API processes and two generators while clients drop at random and a generator is
killed and replaced."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from collections import Counter

import httpx

from services.common.contract import GENERATOR_INFO_KEY, GENERATOR_SLOTS_KEY, GENERATORS_KEY
from services.common.semaphore import GENERATIONS
from tests.apps.recording_app import CALLBACKS_KEY
from tests.conftest import synthetic_generator_env
from tests.support.processes import eventually

REQUESTS = 240
TOKENS_PER_SECOND, TOKENS_PER_REPLY = 100, 20
MIN_REPLY_SECONDS = TOKENS_PER_REPLY / TOKENS_PER_SECOND
CONCURRENCY = 14  # below permits + queue places (16): rejections stay rare


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random) -> dict:
    """Send one request; maybe walk away. Returns what the client saw."""
    plan = rng.choices(["read", "drop_mid", "drop_early"], weights=[6, 2, 2])[0]
    seen = {"plan": plan, "tokens": 0, "end": None, "status": None, "request_id": None}
    if plan == "drop_early":
        # Plain text: the headers come with the first token, so a client that gives up
        # before them has seen nothing, and its request id is unknown to it.
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.1)):
                async with client.stream("POST", url, json={"user_input": "c h a o s"}) as response:
                    seen["status"] = response.status_code
                    seen["request_id"] = response.headers.get("x-request-id")
                    seen["tokens"] = 1 if response.status_code == 200 else 0
        except TimeoutError:
            # On a loaded machine the timer may fire late: note when it really did.
            seen["left_after"] = time.monotonic() - sent_at
        return seen
    try:
        async with client.stream("POST", url, json={"user_input": "c h a o s"}, headers={"accept": "text/event-stream"}) as response:
            seen["status"] = response.status_code
            seen["request_id"] = response.headers.get("x-request-id")
            if response.status_code != 200:
                return seen
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                    if name == "token":
                        seen["tokens"] += 1
                        if plan == "drop_mid" and seen["tokens"] >= rng.randint(1, 4):
                            return seen
                    elif name in ("done", "error"):
                        seen["end"] = name
    except httpx.HTTPError as exc:
        seen["end"] = f"transport:{type(exc).__name__}"
    return seen


async def test_every_accepted_request_gets_exactly_one_matching_callback(stack):
    rng = random.Random(20261125)
    gen_env = synthetic_generator_env(
        tokens_per_second=TOKENS_PER_SECOND, MAX_NEW_TOKENS=str(TOKENS_PER_REPLY), GENERATOR_SLOTS="2"
    )
    generators = [stack.generator(gen_env), stack.generator(gen_env)]
    api_env = {
        "MAX_CONCURRENT_GENERATIONS": "4",
        "MAX_QUEUE_SIZE": "12",
        "LEASE_SECONDS": "1.5",
        "GENERATOR_SILENCE_SECONDS": "1.5",
        "RETRY_AFTER_SECONDS": "1",
        # No resume grace: a generation whose client left stops at once, so the killed
        # generator is surely running streams whose clients still read them (the
        # grace's exactly-once callbacks: test_resume.py).
        "RESUME_GRACE_SECONDS": "0",
    }
    apis = [stack.api(api_env, app="tests.apps.recording_app:app") for _ in range(2)]
    limiter = asyncio.Semaphore(CONCURRENCY)

    async def limited(i: int) -> dict:
        async with limiter:
            return await one_request(client, apis[i % 2].base_url + "/chat_stream", rng)

    def running_on(generator) -> set[str]:
        log = generator.log()
        started = set(re.findall(r"request (\w+) started", log))
        return started - set(re.findall(r"request (\w+) finished", log))

    async def chaos() -> None:
        await asyncio.sleep(2.0)
        # Killed while it streams: its clients must get an error (not an idle kill).
        await eventually(lambda: running_on(generators[0]), 20, "the first generator to be streaming")
        generators[0].stop(signal.SIGKILL)
        await asyncio.sleep(1.5)
        generators.append(await asyncio.to_thread(stack.generator, gen_env))

    async with httpx.AsyncClient(timeout=60) as client:
        chaos_task = asyncio.create_task(chaos())
        seen = await asyncio.gather(*[limited(i) for i in range(REQUESTS)])
        await chaos_task

    accepted = [s for s in seen if s["status"] == 200]
    rejected = [s for s in seen if s["status"] == 429]
    gave_up_blind = [s for s in seen if s["status"] is None]
    assert len(accepted) + len(rejected) + len(gave_up_blind) == REQUESTS, Counter(s["status"] for s in seen)
    assert all(s["plan"] == "drop_early" for s in gave_up_blind)
    assert len(accepted) > REQUESTS / 2

    def all_callbacks() -> list[tuple[str, str]]:
        return [tuple(e.decode().split(" ", 1)) for e in stack.redis.lrange(CALLBACKS_KEY, 0, -1)]

    # Every accepted request's callback: those whose client left come a grace later.
    accepted_ids = {s["request_id"] for s in accepted}
    await eventually(lambda: accepted_ids <= {rid for rid, _ in all_callbacks()}, 20, "every callback")
    await asyncio.sleep(1.0)  # a duplicate, or a late one, would show up now
    callbacks = all_callbacks()
    per_request = Counter(rid for rid, _ in callbacks)
    assert all(n == 1 for n in per_request.values()), [r for r, n in per_request.items() if n > 1]
    known = {s["request_id"] for s in accepted}
    assert known <= set(per_request), "every accepted request got its callback"
    assert not known & {s["request_id"] for s in rejected}, "rejected requests get no callback"
    message = dict(callbacks)
    # Requests whose client gave up before any byte: the client never learnt their id.
    unknown = set(per_request) - known
    assert len(unknown) <= len(gave_up_blind)
    blind = {"client_disconnected_before_streaming", "client_disconnected_while_streaming"}
    odd = [message[rid] for rid in unknown if message[rid] not in blind]
    # A reply takes at least MIN_REPLY_SECONDS; a client whose timer fired later than
    # that may have been sent all of it (a true success) without having read it.
    late = [s for s in gave_up_blind if s["left_after"] >= MIN_REPLY_SECONDS]
    assert set(odd) <= {"success"} and len(odd) <= len(late), (odd, len(late))
    for s in accepted:
        got = message[s["request_id"]]
        if s["end"] == "done":
            assert got == "success", s
        elif s["end"] == "error":
            assert got == "unknown_error_occurred", s
        else:
            assert s["tokens"] > 0, s
            assert got == "client_disconnected_while_streaming", s
    outcomes = Counter(message.values())
    assert outcomes["success"] and outcomes["client_disconnected_while_streaming"]
    assert outcomes["client_disconnected_before_streaming"], "some clients left while queued"
    assert outcomes["unknown_error_occurred"], "the killed generator's streams ended with an error"

    # Nothing is left behind.
    await eventually(lambda: stack.redis.zcard(GENERATIONS.holders) == 0, 5, "every permit back")
    assert stack.redis.zcard(GENERATIONS.waiters) == 0
    # Streams stay readable for RESUME_RETENTION_SECONDS after their end, no longer.
    assert all(0 < stack.redis.ttl(key) <= 60 for key in stack.redis.keys("chatstream:stream:*"))
    assert stack.redis.zcard("chatstream:queue") == 0
    # Long-lived by design, and bounded: registrations, slots and info are purged as they
    # expire, the semaphore's sets as leases expire.
    persistent = {k.encode() for k in (GENERATORS_KEY, GENERATOR_SLOTS_KEY, GENERATOR_INFO_KEY, CALLBACKS_KEY)}
    persistent |= {k.encode() for k in GENERATIONS.all}
    for key in stack.redis.keys("*"):
        if key not in persistent and not key.startswith(b"chatstream:queue:health"):
            assert stack.redis.ttl(key) > 0, f"{key!r} would never expire"
    # The generators that were not killed are still serving.
    for generator in generators[1:]:
        assert generator.alive()
        assert stack.redis.zscore("chatstream:generators", generator.worker_id) is not None
