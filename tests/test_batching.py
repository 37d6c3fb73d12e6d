"""Continuous batching: many requests share one decode loop, and each still gets
exactly the reply, the limits and the cancellation it would get on its own."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.common.contract import ChatMessage, FinishReason
from services.generator.batching import BatchScheduler
from services.generator.decoding import DecodeRequest, SequentialDecoder
from services.generator.engine import Engine, TransformersEngine
from services.generator.factory import create_engine
from services.generator.sampling import ResolvedSampling
from services.generator.settings import GeneratorSettings
from tests.conftest import tiny_generator_env
from tests.support.client import stream_chat

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Please write a short story about a robot who learns to paint, in three sentences.",
    "Tell me a joke.",
    "Let's count: one, two, three.",
    "Why is water wet? Explain briefly, then give an example from everyday life.",
]


def greedy(max_new_tokens: int = 24, **overrides) -> ResolvedSampling:
    fields = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[])
    return ResolvedSampling(**{**fields, **overrides})


def settings(model: Path, slots: int, **extra) -> GeneratorSettings:
    return GeneratorSettings(model_id=str(model), generator_slots=slots, **extra)


class Reply:
    """What one request's consumer saw."""

    def __init__(self, deltas: list[str], generation) -> None:
        self.deltas = deltas
        self.text = "".join(deltas)
        self.finish_reason = generation.finish_reason
        self.prompt_tokens = generation.prompt_tokens
        self.completion_tokens = generation.completion_tokens

    def outcome(self) -> tuple:
        return self.text, self.finish_reason, self.prompt_tokens, self.completion_tokens


async def generate(
    engine: Engine,
    prompt: str,
    sampling: ResolvedSampling,
    *,
    delay: float = 0.0,
    cancel: threading.Event | None = None,
    cancel_after_deltas: int | None = None,
) -> Reply:
    await asyncio.sleep(delay)
    cancel = cancel or threading.Event()
    generation = engine.start([ChatMessage(role="user", content=prompt)], sampling, cancel)
    deltas = []
    async for delta in generation:
        deltas.append(delta)
        if len(deltas) == cancel_after_deltas:
            cancel.set()
    return Reply(deltas, generation)


async def sequentially(engine: Engine, prompts: list[str], samplings: list[ResolvedSampling]) -> list[Reply]:
    return [await generate(engine, p, s) for p, s in zip(prompts, samplings)]


async def concurrently(engine: Engine, prompts: list[str], samplings: list[ResolvedSampling], **kwargs) -> list[Reply]:
    """All requests at once, joining a few milliseconds apart so that they enter a running batch."""
    requests = enumerate(zip(prompts, samplings))
    return await asyncio.gather(*(generate(engine, p, s, delay=0.01 * i, **kwargs) for i, (p, s) in requests))


class BatchSizeProbe:
    """Records the largest batch the decode loop ran while it was active."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.largest = 0
        self._engine = engine
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.largest = max(self.largest, self._engine.decoder.running)
            await asyncio.sleep(0.001)

    def stop(self) -> int:
        self._task.cancel()
        return self.largest


@pytest.fixture(scope="module")
def tiny_sequential(tiny_model):
    engine = create_engine(settings(tiny_model, slots=1))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_batched(tiny_model):
    engine = create_engine(settings(tiny_model, slots=4))
    yield engine
    engine.close()


def test_generator_slots_select_the_decoder(tiny_sequential, tiny_batched):
    assert isinstance(tiny_sequential, TransformersEngine) and isinstance(tiny_sequential.decoder, SequentialDecoder)
    assert isinstance(tiny_batched, TransformersEngine) and isinstance(tiny_batched.decoder, BatchScheduler)


async def test_batched_greedy_text_equals_sequential_for_concurrent_prompts_of_different_lengths(
    tiny_sequential, tiny_batched
):
    samplings = [greedy(max_new_tokens=40)] * len(PROMPTS)
    expected = await sequentially(tiny_sequential, PROMPTS, samplings)
    probe = BatchSizeProbe(tiny_batched)
    got = await concurrently(tiny_batched, PROMPTS, samplings)
    assert probe.stop() == 4, "six requests on four slots must fill the batch"
    assert len({r.prompt_tokens for r in got}) >= 4, "the prompts must differ in length"
    for want, have in zip(expected, got):
        assert have.outcome() == want.outcome()
        assert have.finish_reason is FinishReason.LENGTH and have.completion_tokens == 40
        assert len(have.deltas) > 10, "tokens are streamed one by one, not handed over at the end"


async def test_batched_greedy_equals_sequential_with_the_default_model_in_float32(default_model, monkeypatch):
    # float32: bfloat16 rounding depends on the batch shape, see services/generator/batching.py.
    prompts, samplings = PROMPTS[:4], [greedy(max_new_tokens=32, repetition_penalty=1.1)] * 4
    sequential = create_engine(settings(default_model, slots=1, dtype="float32"))
    try:
        expected = await sequentially(sequential, prompts, samplings)
    finally:
        sequential.close()
    # Prompts of 30-40 tokens prefilled 8 at a time: chunked prefill is exact too.
    batched = create_engine(settings(default_model, slots=4, dtype="float32", prefill_chunk_tokens=8))
    try:
        got = await concurrently(batched, prompts, samplings)
    finally:
        batched.close()
    assert [r.outcome() for r in got] == [r.outcome() for r in expected]
    assert "Paris" in got[1].text
    assert any(r.finish_reason is FinishReason.STOP for r in got), "an end-of-sequence must end just its own request"

    # Arriving together, with no chunk limit: the prompts go through the model in one left-padded pass.
    groups: list[int] = []
    prefill_together = BatchScheduler._prefill_together

    def counted(scheduler, group):
        groups.append(len(group))
        return prefill_together(scheduler, group)

    monkeypatch.setattr(BatchScheduler, "_prefill_together", counted)
    batched = create_engine(settings(default_model, slots=4, dtype="float32", prefill_chunk_tokens=0))
    try:
        together = await asyncio.gather(*(generate(batched, p, s) for p, s in zip(prompts, samplings)))
    finally:
        batched.close()
    assert max(groups, default=0) >= 2, groups
    assert [r.outcome() for r in together] == [r.outcome() for r in expected]


async def test_cancelling_one_request_leaves_the_others_complete_and_intact(tiny_sequential, tiny_batched):
    prompts, samplings = PROMPTS[:4], [greedy(max_new_tokens=120)] * 4
    expected = await sequentially(tiny_sequential, prompts, samplings)
    victim = threading.Event()
    *replies, stopped = await asyncio.gather(
        concurrently(tiny_batched, prompts, samplings),
        generate(tiny_batched, PROMPTS[1], samplings[0], cancel=victim, cancel_after_deltas=5),
    )
    replies = replies[0]
    assert stopped.finish_reason is FinishReason.CANCELLED
    assert 5 <= stopped.completion_tokens < 120
    assert stopped.text == expected[1].text[: len(stopped.text)]
    for want, have in zip(expected, replies):
        assert have.outcome() == want.outcome()


async def test_a_consumer_that_stops_reading_frees_its_slot(tiny_batched):
    hi = [ChatMessage(role="user", content="Hi")]
    generation = tiny_batched.start(hi, greedy(max_new_tokens=400), threading.Event())
    async for _ in generation:
        break
    await generation.__aiter__().aclose()  # what an abandoned async for does, made prompt
    assert tiny_batched.decoder.running == 0
    assert generation.completion_tokens < 400


async def test_each_request_keeps_its_own_sampling_parameters(tiny_sequential, tiny_batched):
    reference = (await sequentially(tiny_sequential, ["Tell me a joke."], [greedy(max_new_tokens=60)]))[0]
    stop = reference.text[12:16]
    samplings = [
        greedy(max_new_tokens=60),
        greedy(max_new_tokens=7),
        greedy(max_new_tokens=60, repetition_penalty=1.8),
        greedy(max_new_tokens=60, stop=[stop]),
    ]
    prompts = ["Tell me a joke."] * 4
    expected = await sequentially(tiny_sequential, prompts, samplings)
    sampled = ResolvedSampling(max_new_tokens=60, temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[])
    probe = BatchSizeProbe(tiny_batched)
    *got, hot = await asyncio.gather(
        *(generate(tiny_batched, p, s) for p, s in zip(prompts, samplings)), generate(tiny_batched, prompts[0], sampled)
    )
    # The short ones leave early and the fifth takes their slot: the batch stays full.
    assert probe.stop() == 4
    assert [r.outcome() for r in got] == [r.outcome() for r in expected]
    assert got[1].completion_tokens == 7
    assert got[2].text != reference.text, "the repetition penalty must change the greedy reply"
    assert got[3].finish_reason is FinishReason.STOP and got[3].text == reference.text[: reference.text.index(stop)]
    assert hot.completion_tokens == 60 and hot.text != reference.text, "temperature 1.5 samples, it does not argmax"


LOG_LINE = re.compile(r"^(\S+ \S+) INFO services\.generator\.job: request (\w+) (started|finished)", re.M)


def request_spans(log: str) -> dict[str, tuple[datetime, datetime]]:
    """request id -> (started, finished), from the generator's own log lines."""
    seen: dict[str, dict[str, datetime]] = {}
    for stamp, request_id, event in LOG_LINE.findall(log):
        seen.setdefault(request_id, {})[event] = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
    return {rid: (ev["started"], ev["finished"]) for rid, ev in seen.items() if len(ev) == 2}


async def test_one_generator_with_four_slots_streams_four_requests_at_once(stack, tiny_model):
    generator = stack.generator(tiny_generator_env(tiny_model, GENERATOR_SLOTS="4", MAX_NEW_TOKENS="300"))
    # The API's cluster-wide permit count (default 2) must let four through at once.
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "4"})
    prompts = PROMPTS[:4]

    async def ask(prompt: str):
        # A client of its own per request: no shared session, so every prompt is just this message.
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
            return await stream_chat(client, "/chat_stream", {"user_input": prompt})

    together = await asyncio.gather(*(ask(p) for p in prompts))
    spans = request_spans(generator.log())
    alone = [await ask(p) for p in prompts]
    assert all(r.status == 200 for r in together + alone)
    assert set(spans) == {r.request_id for r in together}
    last_start = max(start for start, _ in spans.values())
    first_finish = min(finish for _, finish in spans.values())
    assert last_start < first_finish, f"all four must run at the same time on one generator: {spans}"
    # Batched, each reply is the one the same prompt gets when it runs alone.
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(len(r.chunks) > 20 for r in together)


# ---------------------------------------------------------------- chunked prefill

LONG_PROMPT = "Tell me about " + " ".join(f"the river number {i} and its stones" for i in range(15))


async def test_chunked_prefill_gives_the_reply_a_single_pass_gives(tiny_model):
    """A prompt prefilled 16 tokens at a time, next to a short one, decodes to the same text
    as with each prompt in one pass (float32 tiny model, greedy)."""
    samplings = [greedy(max_new_tokens=40)] * 2
    replies = {}
    for chunk in (0, 16):
        engine = create_engine(settings(tiny_model, slots=2, prefill_chunk_tokens=chunk))
        try:
            replies[chunk] = await concurrently(engine, [LONG_PROMPT, PROMPTS[0]], samplings)
        finally:
            engine.close()
    assert replies[16][0].prompt_tokens > 10 * 16, "the long prompt takes many chunks"
    assert [r.outcome() for r in replies[16]] == [r.outcome() for r in replies[0]]


def test_a_running_stream_gets_a_token_after_every_chunk_of_a_long_prompt(tiny_model):
    """The decode thread's own order of emissions: while a 320-token prompt is prefilled in
    chunks of 16, the running sequence gets a token between chunks; in one pass, none."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = list(range(5, 325))

    def tokens_of_the_running_sequence_during_the_prefill(chunk: int) -> int:
        events: list[str] = []
        errors: list[BaseException | None] = []
        scheduler = BatchScheduler(model, "cpu", slots=2, chunk_tokens=chunk)

        def sequence(name: str, prompt_ids: list[int], tokens: int) -> tuple[DecodeRequest, threading.Event]:
            done = threading.Event()

            def finish(error: BaseException | None) -> None:
                errors.append(error)
                done.set()

            request = DecodeRequest(prompt_ids, tokens, greedy(tokens), emit=lambda _: events.append(name), finish=finish)
            return request, done

        try:
            (running, running_done), (joining, joining_done) = sequence("a", [1, 2, 3], 2000), sequence("b", prompt, 1)
            scheduler.submit(running)
            deadline = time.monotonic() + 30
            while events.count("a") < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            events.append("submitted")
            scheduler.submit(joining)
            assert joining_done.wait(30)
            running.cancel.set()
            assert running_done.wait(30)
            assert errors == [None, None]
        finally:
            scheduler.stop()
        start, first = events.index("submitted"), events.index("b")
        return events[start:first].count("a")

    assert tokens_of_the_running_sequence_during_the_prefill(16) >= len(prompt) // 16 - 2
    assert tokens_of_the_running_sequence_during_the_prefill(0) <= 1


async def test_closing_the_sequential_decoder_ends_the_running_and_the_waiting_request(tiny_model):
    """Neither the request being generated nor one queued behind it is left waiting forever."""
    engine = create_engine(settings(tiny_model, slots=1))
    hi = [ChatMessage(role="user", content="Hi")]
    running = engine.start(hi, greedy(max_new_tokens=4000), threading.Event())
    waiting = engine.start(hi, greedy(max_new_tokens=10), threading.Event())

    async def read(generation) -> BaseException | None:
        try:
            async for _ in generation:
                if generation is running:
                    engine.close()  # while the first is mid-reply and the second queued
        except RuntimeError as exc:
            return exc
        return None

    errors = await asyncio.wait_for(asyncio.gather(read(running), read(waiting)), 30)
    assert [str(e) for e in errors] == ["the generator is shutting down"] * 2
    assert running.completion_tokens < 4000
