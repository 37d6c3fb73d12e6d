"""Engines turn a conversation into a stream of text deltas.

``TransformersEngine`` serves a causal LM from ``from_pretrained`` (local directory
or hub id): it owns the chat template, detokenizing, stop strings, end-of-sequence
and finish reasons, and drives a decoder (``services.generator.decoding``) that
computes token ids in a thread of its own, so the event loop stays free for
heartbeats and cancellation checks. ``SyntheticEngine`` produces a fixed reply at
a fixed rate with no model, for benchmarks and fault drills.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.contract import ChatMessage, ErrorCode, FinishReason, HistoryWindow
from services.generator.decoding import DecodeRequest, Decoder
from services.generator.detokenizer import IncrementalDetokenizer
from services.generator.prompt import InputTooLong, fit_conversation
from services.generator.sampling import ResolvedSampling
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)


class GenerationError(Exception):
    """A request the engine cannot serve; ``code`` is sent to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Generation:
    """One generation in progress: ``async for delta in generation`` yields text;
    after the iteration ends, ``finish_reason`` and the token counts are set.
    ``history_turns``: the history turns of the conversation the prompt kept."""

    def __init__(self, deltas: AsyncIterator[str], history_turns: int = 0) -> None:
        self._deltas = deltas
        self.finish_reason: FinishReason = FinishReason.LENGTH
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.history_turns = history_turns

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas


class Engine(Protocol):
    """What the worker needs from an engine."""

    model_id: str

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (0 = unknown), published with the registration."""
        ...

    def start(
        self,
        messages: list[ChatMessage],
        sampling: ResolvedSampling,
        cancel: threading.Event,
        history: HistoryWindow = HistoryWindow(),
        cache_salt: str = "",
    ) -> Generation:
        """Begin generating; setting ``cancel`` stops it at the next token. The
        ``history`` turns of ``messages`` may be dropped, oldest first, to fit the
        model's context. ``cache_salt`` (the tenant) partitions the prefix cache."""
        ...

    @property
    def keeps_prefixes(self) -> bool:
        """Whether a finished conversation's key/value cache is kept for its next turn."""
        ...

    def close(self) -> None:
        """Release threads and memory."""
        ...


class SyntheticEngine:
    """Benchmark and fault-drill backend: echoes the last user message word by word,
    repeated up to ``max_new_tokens`` words, at ``synthetic_tokens_per_second``.
    Never the default."""

    context_length = 0  # no model, no window
    keeps_prefixes = False

    def __init__(self, settings: GeneratorSettings) -> None:
        self.model_id = "synthetic"
        self._interval = 1.0 / settings.synthetic_tokens_per_second
        self._fail_after = settings.synthetic_fail_after_tokens
        self._stall_after = settings.synthetic_stall_after_tokens

    def start(
        self,
        messages: list[ChatMessage],
        sampling: ResolvedSampling,
        cancel: threading.Event,
        history: HistoryWindow = HistoryWindow(),
        cache_salt: str = "",
    ) -> Generation:
        """No context limit: every history turn is kept."""
        words = (messages[-1].content.split() if messages else []) or ["..."]
        generation: Generation

        async def deltas() -> AsyncIterator[str]:
            generation.prompt_tokens = sum(len(m.content.split()) for m in messages)
            next_at = time.monotonic()
            for i in range(sampling.max_new_tokens):
                if cancel.is_set():
                    generation.finish_reason = FinishReason.CANCELLED
                    return
                if i == self._fail_after:
                    raise RuntimeError(f"synthetic fault drill: failing after {i} tokens")
                if i == self._stall_after:
                    # Deaf to the cancel flag too: a hung device answers nothing.
                    await asyncio.Event().wait()
                next_at += self._interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                generation.completion_tokens += 1
                yield (" " if i else "") + words[i % len(words)]
            generation.finish_reason = FinishReason.LENGTH

        generation = Generation(deltas(), history.turns)
        return generation

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class _Finished:
    """The decoder is done with the request (``error``: why it failed)."""

    error: BaseException | None


class TransformersEngine:
    """A Hugging Face causal LM behind a decoder: sequential (``model.generate``) or
    continuous batching, chosen by ``services.generator.factory``."""

    def __init__(self, model_id: str, model: Any, tokenizer: Any, decoder: Decoder) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.decoder = decoder
        self._context_limit = _context_limit(model.config)
        self._eos_ids = frozenset(eos_token_ids(model, tokenizer))

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (0 = its config names none)."""
        return self._context_limit

    @property
    def keeps_prefixes(self) -> bool:
        """Whether the decoder keeps finished conversations' caches (``PREFIX_CACHE_MB`` > 0)."""
        return self.decoder.prefix_cache.enabled

    def start(
        self,
        messages: list[ChatMessage],
        sampling: ResolvedSampling,
        cancel: threading.Event,
        history: HistoryWindow = HistoryWindow(),
        cache_salt: str = "",
    ) -> Generation:
        # The history gives way to the reply: the prompt keeps the newest turns that
        # leave room for max_new_tokens.
        budget = self._context_limit - sampling.max_new_tokens if self._context_limit else None
        try:
            prompt = fit_conversation(
                self.tokenizer, messages, history, budget=budget, context_limit=self._context_limit
            )
        except InputTooLong as exc:
            raise GenerationError(ErrorCode.PROMPT_TOO_LONG, str(exc)) from None
        if prompt.history_turns < history.turns:
            logger.info("the prompt keeps %d of %d history turns", prompt.history_turns, history.turns)
        prompt_ids = prompt.ids
        max_new = sampling.max_new_tokens
        if self._context_limit:
            max_new = min(max_new, self._context_limit - len(prompt_ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | _Finished] = asyncio.Queue()

        def post(item: int | _Finished) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody waits for this request any more
                request.halt.set()

        request = DecodeRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=sampling,
            emit=post,
            finish=lambda error: post(_Finished(error)),
            eos_ids=self._eos_ids,
            cancel=cancel,
            cache_salt=cache_salt,
        )
        generation: Generation

        async def deltas() -> AsyncIterator[str]:
            generation.prompt_tokens = len(prompt_ids)
            detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            saw_eos = False
            item: int | _Finished | None = None
            self.decoder.submit(request)
            try:
                while not isinstance(item := await queue.get(), _Finished):
                    if saw_eos or detok.stopped:
                        continue
                    generation.completion_tokens += 1
                    if item in self._eos_ids:
                        saw_eos = True
                        request.halt.set()
                        continue
                    text = detok.push(item)
                    if detok.stopped:
                        request.halt.set()
                    if text:
                        yield text
                if item.error is not None:
                    raise item.error
                tail = detok.flush()
                if tail:
                    yield tail
            finally:
                if not isinstance(item, _Finished):
                    # The consumer left early: the sequence must not outlive the request.
                    request.halt.set()
                    await asyncio.shield(_finished(queue))
            if saw_eos or detok.stopped:
                generation.finish_reason = FinishReason.STOP
            elif generation.completion_tokens < max_new and cancel.is_set():
                generation.finish_reason = FinishReason.CANCELLED
            else:
                generation.finish_reason = FinishReason.LENGTH

        generation = Generation(deltas(), prompt.history_turns)
        return generation

    def close(self) -> None:
        """Stop the decoder: what still runs ends with an error."""
        self.decoder.close()


async def _finished(queue: asyncio.Queue[int | _Finished]) -> None:
    while not isinstance(await queue.get(), _Finished):
        pass


def _context_limit(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a sequence, from the generation config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
