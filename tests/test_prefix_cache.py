"""Multi-turn prefix reuse: a follow-up turn starts from the key/value cache its
conversation left behind, gives the reply a full prefill gives, and goes to the
generator that holds that cache first, to any other after a short bounded wait."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from services.common.contract import GENERATORS_KEY, ChatMessage
from services.generator.batching import BatchScheduler
from services.generator.decoding import SequentialDecoder
from services.generator.factory import create_engine
from services.generator.prefix_cache import PrefixCache
from services.generator.sampling import ResolvedSampling
from services.generator.settings import GeneratorSettings
from tests.conftest import tiny_generator_env
from tests.support.client import scrape, stream_chat


def kv(length: int, fill: float = 0.0) -> list:
    """Two layers of keys and values, [1, 2 heads, length, 4]: 2 x 2 x 32 x length bytes."""
    import torch

    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), fill)) for _ in range(2)]


def test_a_prompt_resumes_from_the_longest_shared_prefix_and_prefills_at_least_one_token():
    cache = PrefixCache(10**6)
    cache.store("t", [1, 2, 3, 4, 5, 6], kv(6, 1.0))
    cache.store("t", [1, 2, 9, 9], kv(4, 2.0))
    layers, reused = cache.lookup("t", [1, 2, 3, 4, 7, 7, 7])
    assert reused == 4 and layers[0][0].shape[2] == 4 and float(layers[0][0][0, 0, 0, 0]) == 1.0
    assert cache.lookup("t", [1, 2, 3])[1] == 2, "the last prompt token is always prefilled: it picks the next token"
    assert cache.lookup("t", [1, 2, 3, 4, 5, 6])[1] == 5
    assert cache.lookup("t", [8, 1, 2])[1] == 0
    long_history = list(range(5000))
    cache.store("t", long_history, kv(5000))
    assert cache.lookup("t", long_history[:4321] + [-1])[1] == 4321


def test_tenants_never_share_a_cached_prefix():
    cache = PrefixCache(10**6)
    cache.store("tenant-a", [1, 2, 3, 4], kv(4))
    assert cache.lookup("tenant-b", [1, 2, 3, 4, 5]) == ([], 0)
    assert cache.lookup("tenant-a", [1, 2, 3, 4, 5])[1] == 4


def test_the_cache_stays_within_its_bytes_evicting_the_least_recently_used():
    per_token = 2 * 2 * 2 * 4 * 4  # layers x (k, v) x heads x dim x float32
    cache = PrefixCache(per_token * 25)
    cache.store("t", [1] * 10, kv(10))
    cache.store("t", [2] * 10, kv(10))
    cache.lookup("t", [1] * 11)  # the first is now the most recently used
    cache.store("t", [3] * 10, kv(10))
    assert cache.nbytes <= cache.capacity_bytes and len(cache) == 2
    assert cache.lookup("t", [1] * 11)[1] == 10 and cache.lookup("t", [2] * 11)[1] == 0
    cache.store("t", [4] * 30, kv(30))  # larger than the whole cache: not kept
    assert cache.lookup("t", [4] * 31)[1] == 0 and len(cache) == 2
    # A longer turn of the same conversation replaces the shorter one it extends.
    cache.store("t", [1] * 15, kv(15))
    assert len(cache) == 2 and cache.nbytes == per_token * 25
    assert cache.lookup("t", [1] * 20)[1] == 15 and cache.lookup("t", [3] * 11)[1] == 10
    assert PrefixCache(0).lookup("t", [1] * 11) == ([], 0)


def greedy(tokens: int) -> ResolvedSampling:
    return ResolvedSampling(max_new_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[])


async def reply(engine, messages: list[ChatMessage], tokens: int = 24, tenant: str = "t") -> tuple[str, int]:
    """The reply's text and its prompt's length."""
    generation = engine.start(messages, greedy(tokens), threading.Event(), cache_salt=tenant)
    text = "".join([delta async for delta in generation])
    return text, generation.prompt_tokens


async def conversation(engine, questions: list[str]) -> tuple[list[str], list[int], list[int]]:
    """Ask ``questions`` in one conversation: the replies, each turn's prompt tokens and
    how many of them came from the cache."""
    messages: list[ChatMessage] = []
    replies, prompts, reused = [], [], []
    cache = engine.decoder.prefix_cache
    for question in questions:
        messages.append(ChatMessage("user", question))
        before = cache.hit_tokens
        text, prompt_tokens = await reply(engine, messages)
        replies.append(text)
        prompts.append(prompt_tokens)
        reused.append(cache.hit_tokens - before)
        messages.append(ChatMessage("assistant", text))
    return replies, prompts, reused


QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]


async def test_a_reply_with_reuse_is_token_identical_to_one_without_in_float32(default_model):
    """Both decoders, the default model in float32, greedy: turns 2 and 3 start from
    their conversation's cache and give exactly the replies of a full prefill."""
    engines = {
        name: create_engine(GeneratorSettings(model_id=str(default_model), dtype="float32", **extra))
        for name, extra in {
            "no reuse": {"prefix_cache_mb": 0},
            "sequential": {"prefix_cache_mb": 256},
            "batched": {"prefix_cache_mb": 256, "generator_slots": 4, "prefill_chunk_tokens": 16},
        }.items()
    }
    try:
        assert isinstance(engines["sequential"].decoder, SequentialDecoder)
        assert isinstance(engines["batched"].decoder, BatchScheduler)
        expected, _, none = await conversation(engines["no reuse"], QUESTIONS)
        assert none == [0, 0, 0]
        for name in ("sequential", "batched"):
            replies, prompts, reused = await conversation(engines[name], QUESTIONS)
            assert replies == expected, name
            # Each follow-up reuses at least the previous turn's whole prompt.
            assert reused[0] == 0 and reused[1] >= prompts[0] and reused[2] >= prompts[1], (name, prompts, reused)
        # Another tenant asking the same gets no hit.
        cache = engines["batched"].decoder.prefix_cache
        before = cache.hit_tokens
        await reply(engines["batched"], [ChatMessage("user", QUESTIONS[0])], tenant="other")
        assert cache.hit_tokens == before
    finally:
        for engine in engines.values():
            engine.close()


def hits(generator) -> float:
    return scrape(generator.metrics_url).get("chatstream_generator_prefix_cache_hits_total", 0.0)


async def test_follow_up_turns_go_to_the_generator_holding_the_conversation(stack, tiny_model):
    """Two idle generators: every follow-up of a session is served where its history is
    cached (with a wait long enough that chance cannot pass this test)."""
    env = tiny_generator_env(tiny_model, PREFIX_CACHE_MB="256", PREFIX_AFFINITY_WAIT_MS="3000")
    generators = [stack.generator(env), stack.generator(env)]
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        for turn in range(4):
            started = time.monotonic()
            answer = await stream_chat(client, "/chat_stream", {"user_input": f"Tell me about number {turn}."})
            assert answer.status == 200 and answer.text
            assert time.monotonic() - started < 2.5, "a free holder claims at once: nobody waited out the 3 s"
    assert sorted(hits(g) for g in generators) == [0.0, 3.0]


async def test_a_follow_up_waits_for_a_wedged_holder_only_the_affinity_wait(stack, tiny_model):
    """The holder is registered but never claims (busy or hung): another generator takes
    the job after PREFIX_AFFINITY_WAIT_MS. A holder whose registration expired (dead) is
    not waited for at all."""
    generator = stack.generator(tiny_generator_env(tiny_model, PREFIX_CACHE_MB="256", PREFIX_AFFINITY_WAIT_MS="1500"))
    api = stack.api()
    redis = stack.redis

    async def turn(client: httpx.AsyncClient, text: str) -> float:
        started = time.monotonic()
        answer = await asyncio.wait_for(stream_chat(client, "/chat_stream", {"user_input": text}, sse=True), 20)
        assert answer.sse_events()[-1][0] == "done", answer.text
        return time.monotonic() - started  # the whole reply: its first SSE event comes before the job starts

    def hand_the_conversation_to(worker: str, registered_for: float) -> None:
        (holder_key,) = redis.keys("chatstream:prefix:holder:*")
        assert redis.get(holder_key) == generator.worker_id.encode()
        redis.set(holder_key, worker)
        redis.zadd(GENERATORS_KEY, {worker: time.time() + registered_for})

    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        await turn(client, "Hello there.")
        hand_the_conversation_to("wedged", registered_for=60)
        waited = await turn(client, "Are you still there?")
        assert 1.4 < waited < 4.5, waited
        redis.delete(*redis.keys("chatstream:prefix:holder:*"))

    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:  # a new session
        await turn(client, "Hello again.")
        hand_the_conversation_to("dead", registered_for=-1)
        assert await turn(client, "Anyone?") < 1.2
    assert not redis.keys("chatstream:affinity:*"), "a claimed job's affinity key goes with it"
    redis.zrem(GENERATORS_KEY, "wedged", "dead")
