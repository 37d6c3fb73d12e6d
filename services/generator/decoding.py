"""Decoders turn a prompt's token ids into new token ids; the engine does the rest.

:class:`~services.generator.engine.TransformersEngine` owns everything above token
ids once: the chat template, incremental detokenizing, stop strings,
end-of-sequence and finish reasons. It hands each request to a decoder as a
:class:`DecodeRequest` and is called back from the decoder's own thread with every
token and once at the end. Two decoders implement :class:`Decoder`:
:class:`SequentialDecoder` (``model.generate``, one request after another,
``GENERATOR_SLOTS=1``) and :class:`~services.generator.batching.BatchScheduler`
(continuous batching). Each runs one thread for all its requests: no thread waits
per request.

Two signals stop a sequence, and they mean different things: ``cancel`` is the
client's (the API asked to stop, the finish reason is ``cancelled``); ``halt`` is
the engine's (the reply is complete: a stop string matched or end-of-sequence was
read, or nobody consumes the tokens any more).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.generator.prefix_cache import LayerKV, PrefixCache
from services.generator.sampling import ResolvedSampling

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeRequest:
    """One sequence to decode. ``emit`` and ``finish`` are called from the decoder's
    thread: ``emit`` with each new token id as soon as it is chosen, ``finish`` exactly
    once when the decoder is done with the request (with the error, if it failed)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: ResolvedSampling
    emit: Callable[[int], None]
    finish: Callable[[BaseException | None], None]
    #: The decoder stops by itself after one of these.
    eos_ids: frozenset[int] = frozenset()
    #: The client's stop (finish reason ``cancelled``).
    cancel: threading.Event = field(default_factory=threading.Event)
    #: The engine's stop: the reply is complete, or nobody reads it any more.
    halt: threading.Event = field(default_factory=threading.Event)
    #: Prefix-cache partition (the tenant): a prompt reuses only its own partition's cache.
    cache_salt: str = ""

    @property
    def stopped(self) -> bool:
        """Cancelled by the client or halted by the engine."""
        return self.cancel.is_set() or self.halt.is_set()


class Decoder(Protocol):
    """What the engine needs from a decoder."""

    def submit(self, request: DecodeRequest) -> None:
        """Start decoding ``request``; returns at once."""
        ...

    def close(self) -> None:
        """Stop; requests still running or waiting finish with an error."""
        ...

    @property
    def prefix_cache(self) -> PrefixCache:
        """The finished conversations' caches it resumes from (disabled: capacity 0)."""
        ...


class SequentialDecoder:
    """``model.generate``, one request at a time on one thread, resuming from the
    prefix cache when a prompt shares a cached prefix."""

    def __init__(self, model: Any, device: Any, pad_token_id: int | None, prefix_cache: PrefixCache | None = None) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self._prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._closed = False
        self._running: DecodeRequest | None = None
        self._interrupted: DecodeRequest | None = None  # the one running when the decoder closed

    @property
    def prefix_cache(self) -> PrefixCache:
        """The conversations' key/value caches this decoder resumes from."""
        return self._prefix_cache

    def submit(self, request: DecodeRequest) -> None:
        """Queue ``request`` behind the one running."""
        if self._closed:
            request.finish(RuntimeError("the generator is shutting down"))
            return
        future = self._executor.submit(self._run, request)
        # A request still waiting when the decoder closes never runs: it must still end.
        future.add_done_callback(
            lambda done: request.finish(RuntimeError("the generator is shutting down")) if done.cancelled() else None
        )

    def close(self) -> None:
        """Refuse new requests and fail the waiting ones; the running one stops at its next token."""
        self._closed = True
        running = self._running
        if running is not None:
            self._interrupted = running
            running.halt.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, request: DecodeRequest) -> None:
        error: BaseException | None = None
        self._running = request
        try:
            if not request.stopped:
                self._generate(request)
        except BaseException as exc:  # handed to the engine, which raises it in the request's task
            logger.exception("generation failed for a prompt of %d tokens", len(request.prompt_ids))
            error = exc
        finally:
            self._running = None
            if error is None and self._interrupted is request:
                error = RuntimeError("the generator is shutting down")
            request.finish(error)

    def _generate(self, request: DecodeRequest) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class _Streamer(BaseStreamer):
            """Hands each new token id on as soon as it is sampled."""

            def __init__(self) -> None:
                self._prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self._prompt_seen:  # generate() first puts the prompt itself
                    self._prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    request.emit(int(token_id))

            def end(self) -> None:
                pass

        class _Stopped(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), request.stopped, dtype=torch.bool, device=input_ids.device)

        sampling = request.sampling
        model = self._model
        input_ids = torch.tensor([request.prompt_ids], device=self._device)
        cached, reused = self._prefix_cache.lookup(request.cache_salt, request.prompt_ids)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=request.max_new_tokens,
            do_sample=not sampling.greedy,
            repetition_penalty=sampling.repetition_penalty,
            streamer=_Streamer(),
            stopping_criteria=StoppingCriteriaList([_Stopped()]),
            eos_token_id=sorted(request.eos_ids) or None,
            pad_token_id=self._pad_token_id,
            return_dict_in_generate=True,
        )
        if reused:
            kwargs["past_key_values"] = cache_from_layers(model, cached)
        if sampling.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        with torch.inference_mode():
            if not sampling.greedy and sampling.seed is not None:
                # Seed the global generator for this request only: fork_rng restores the
                # previous state afterwards (one request runs at a time on this thread).
                devices = [self._device] if str(self._device).startswith("cuda") else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(sampling.seed)
                    out = model.generate(**kwargs)
            else:
                out = model.generate(**kwargs)
        if self._prefix_cache.enabled and out.past_key_values is not None:
            # The cache holds every token but the last one generated (never fed back).
            tokens = out.sequences[0].tolist()[: out.past_key_values.get_seq_length()]
            self._prefix_cache.store(request.cache_salt, tokens, layers_of(out.past_key_values))


def cache_from_layers(model: Any, layers: list[LayerKV]) -> Any:
    """A ``DynamicCache`` holding ``layers`` (one ``[batch, heads, length, dim]`` key and
    value tensor per layer), ready to be extended."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def layers_of(cache: Any, row: int = 0, start: int = 0) -> list[LayerKV]:
    """Copies of one row's keys and values from column ``start`` on (past its left
    padding), each ``[1, heads, length, dim]``: the prefix cache's entry for that row."""
    return [
        (layer.keys[row : row + 1, :, start:].clone(), layer.values[row : row + 1, :, start:].clone())
        for layer in cache.layers
    ]
