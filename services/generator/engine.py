"""Engines turn a conversation into a stream of text deltas.

``TransformersEngine`` runs a causal LM from ``from_pretrained`` (local directory
or hub id) in a worker thread, so the event loop stays free for heartbeats and
cancellation checks while the model computes. ``SyntheticEngine`` produces a
fixed reply at a fixed rate with no model, for benchmarks and fault drills.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.contract import ChatMessage, FinishReason, HistoryWindow, SamplingParams
from services.generator.detokenizer import IncrementalDetokenizer
from services.generator.prompt import InputTooLong, fit_conversation
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)


class GenerationError(Exception):
    """A request the engine cannot serve; ``code`` is sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling parameters with the generator's defaults filled in."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: list[str]
    seed: int | None = None

    @classmethod
    def resolve(cls, params: SamplingParams, settings: GeneratorSettings) -> ResolvedSampling:
        """Apply defaults and the hard cap from settings."""
        max_new = params.max_new_tokens if params.max_new_tokens is not None else settings.max_new_tokens
        return cls(
            max_new_tokens=min(max_new, settings.max_new_tokens_limit),
            temperature=settings.temperature if params.temperature is None else params.temperature,
            top_p=settings.top_p if params.top_p is None else params.top_p,
            top_k=settings.top_k if params.top_k is None else params.top_k,
            repetition_penalty=settings.repetition_penalty
            if params.repetition_penalty is None
            else params.repetition_penalty,
            stop=list(params.stop) or list(settings.stop),
            seed=params.seed,
        )


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
    ) -> Generation:
        """Begin generating; setting ``cancel`` stops it at the next token. The
        ``history`` turns of ``messages`` may be dropped, oldest first, to fit the
        model's context."""
        ...

    def close(self) -> None:
        """Release threads and memory."""
        ...


class SyntheticEngine:
    """Benchmark and fault-drill backend: echoes the last user message word by word,
    repeated up to ``max_new_tokens`` words, at ``synthetic_tokens_per_second``.
    Never the default."""

    context_length = 0  # no model, no window

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


_DONE = object()


class TransformersEngine:
    """Runs a Hugging Face causal LM, one ``model.generate`` per request in a thread."""

    def __init__(self, settings: GeneratorSettings) -> None:
        from services.generator.model_loader import load_model

        self.model_id = settings.model_id
        self.model, self.tokenizer, self.device = load_model(settings)
        self._context_limit = _context_limit(self.model.config)
        # One thread: requests on one worker run one after another (GENERATOR_SLOTS
        # of continuous batching is a separate engine).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (0 = its config names none)."""
        return self._context_limit

    def start(
        self,
        messages: list[ChatMessage],
        sampling: ResolvedSampling,
        cancel: threading.Event,
        history: HistoryWindow = HistoryWindow(),
    ) -> Generation:
        # The history gives way to the reply: the prompt keeps the newest turns that
        # leave room for max_new_tokens.
        budget = self._context_limit - sampling.max_new_tokens if self._context_limit else None
        try:
            prompt = fit_conversation(
                self.tokenizer, messages, history, budget=budget, context_limit=self._context_limit
            )
        except InputTooLong as exc:
            raise GenerationError("prompt_too_long", str(exc)) from None
        if prompt.history_turns < history.turns:
            logger.info("the prompt keeps %d of %d history turns", prompt.history_turns, history.turns)
        prompt_ids = prompt.ids
        max_new = sampling.max_new_tokens
        if self._context_limit:
            max_new = min(max_new, self._context_limit - len(prompt_ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        generation: Generation
        stopped_by_string = threading.Event()

        def run() -> None:
            try:
                self._generate_blocking(prompt_ids, sampling, max_new, cancel, loop, queue)
            except BaseException as exc:  # handed to the event loop, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        async def deltas() -> AsyncIterator[str]:
            generation.prompt_tokens = len(prompt_ids)
            detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            eos_ids = eos_token_ids(self.model, self.tokenizer)
            saw_eos = False
            future = loop.run_in_executor(self._executor, run)
            try:
                while (item := await queue.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    if saw_eos or detok.stopped:
                        continue
                    generation.completion_tokens += 1
                    if item in eos_ids:
                        saw_eos = True
                        cancel.set()
                        continue
                    text = detok.push(item)
                    if detok.stopped:
                        stopped_by_string.set()
                        cancel.set()
                    if text:
                        yield text
                tail = detok.flush()
                if tail:
                    yield tail
            finally:
                # The thread must not outlive the request: make it stop and wait.
                cancel.set()
                await asyncio.shield(future)
            if saw_eos or stopped_by_string.is_set():
                generation.finish_reason = FinishReason.STOP
            elif generation.completion_tokens < max_new and cancel.is_set():
                generation.finish_reason = FinishReason.CANCELLED
            else:
                generation.finish_reason = FinishReason.LENGTH

        generation = Generation(deltas(), prompt.history_turns)
        return generation

    def _generate_blocking(
        self,
        prompt_ids: list[int],
        sampling: ResolvedSampling,
        max_new: int,
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class _Streamer(BaseStreamer):
            """Hands each new token id to the event loop as soon as it is sampled."""

            def __init__(self) -> None:
                self._prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self._prompt_seen:  # generate() first puts the prompt itself
                    self._prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(queue.put_nowait, int(token_id))

            def end(self) -> None:
                pass

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        input_ids = torch.tensor([prompt_ids], device=self.device)
        do_sample = sampling.temperature > 0
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new,
            do_sample=do_sample,
            repetition_penalty=sampling.repetition_penalty,
            streamer=_Streamer(),
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
        if do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if do_sample and sampling.seed is not None:
            # Seed the global generator for this request only: fork_rng restores the
            # previous state afterwards (one request runs at a time on this thread).
            devices = [self.device] if str(self.device).startswith("cuda") else []
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(sampling.seed)
                self.model.generate(**kwargs)
            return
        with torch.inference_mode():
            self.model.generate(**kwargs)

    def close(self) -> None:
        """Stop the generation thread pool."""
        self._executor.shutdown(wait=False, cancel_futures=True)


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
