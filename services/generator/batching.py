"""Continuous batching: many generations share one decode loop, so a pod serves
``GENERATOR_SLOTS`` streams at once for little more than the cost of one.

One thread owns the model. Each step it admits waiting requests and prefills their
prompts (those that arrived together in one left-padded pass, a long one alone), at
most ``PREFILL_CHUNK_TOKENS`` prompt tokens per step (chunked
prefill: a long prompt takes several steps, so the streams already running get a
token after every chunk instead of waiting for the whole prompt); a prompt's
key/value cache joins the batch once it is complete. Then it drops the sequences
that finished or were cancelled and runs a single forward pass for every running
sequence. Sequences of different lengths share the batch through left padding: the
KV cache of each layer is one ``[batch, heads, length, dim]`` tensor whose shorter
rows are padded on the left, an attention mask hides the padding, and explicit
position ids give each row its own position. Each sequence picks its next token
with its own sampling parameters, and the token goes to its own ``Generation``
immediately. Everything above the token ids (incremental detokenizing, stop strings,
end-of-sequence, finish reasons) is the engine's (:class:`~services.generator.engine.TransformersEngine`):
this is one of its two decoders (``services.generator.decoding``).

A prompt that shares a prefix with a conversation that left the batch earlier
starts from that prefix's cached keys and values (``services.generator.prefix_cache``)
and prefills only the rest, in chunks like any other prompt.

Why not transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``,
the engine behind ``transformers serve``)? Evaluated with transformers 5.23 on this
2-core CPU and SmolLM2-135M: it does stream per request (``register_result_handler``),
can cancel one request (``cancel_request``), runs on CPU (paged ``sdpa``/``eager``),
and its greedy output matched ``generate``. But it does not fit this service:

* ``repetition_penalty`` is not supported (its processor is dropped with a warning),
  and our default is 1.1;
* greedy vs sampling (``do_sample``) is fixed per manager, so a greedy request and
  a sampled one cannot share a batch; temperature/top-k/top-p are per request only
  if the manager was created with non-default values for them;
* a cancelled request gets no final output, so its stream would never learn it ended;
* on this CPU it was slower than our sequential path: 8 concurrent requests of 32
  tokens gave about 44 tokens/s in aggregate, which one sequential stream nearly
  matches, so the throughput goal could not be met with it here.

This scheduler keeps the model's own attention (sdpa) and ``DynamicCache``, so it
works wherever the model runs, CPU or GPU. In float32, batched greedy decoding
gives exactly the sequential path's text. In bfloat16 (the default model's saved
dtype) a sequence alone in the batch still matches exactly, but with several rows
the matrix kernels round differently, and where two candidate tokens are nearly
tied greedy text can diverge from the sequential one: ``model.generate`` on a
padded batch diverges in the same places, and vLLM and TGI make no such promise
either. Models whose cache is not a plain per-layer key/value tensor
(sliding-window or hybrid attention layers) are rejected at start: run them with
``GENERATOR_SLOTS=1``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from services.generator.decoding import DecodeRequest, cache_from_layers, layers_of
from services.generator.prefix_cache import PrefixCache
from services.generator.sampling import logits_processors

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request inside the batch: its tokens so far and its own prefill state."""

    request: DecodeRequest
    generated: list[int] = field(default_factory=list)
    _processors: Any = field(default=None, init=False, repr=False)  # built on first use, in the decode thread
    _generator: Any = field(default=None, init=False, repr=False)  # this request's own RNG when seeded
    cache: Any = field(default=None, init=False, repr=False)  # its own KV cache while its prompt is prefilled
    prefilled: int = field(default=0, init=False)  # prompt tokens in that cache
    looked_up: bool = field(default=False, init=False)  # the prefix cache has been asked
    ended: bool = field(default=False, init=False)

    @property
    def prompt_ids(self) -> list[int]:
        """The request's prompt."""
        return self.request.prompt_ids

    @property
    def finished(self) -> bool:
        """Stopped, at end-of-sequence, or at its token limit: leaves at the next step."""
        if self.request.stopped or len(self.generated) >= self.request.max_new_tokens:
            return True
        return bool(self.generated) and self.generated[-1] in self.request.eos_ids

    def choose(self, logits: Any) -> int:
        """Pick the next token from this sequence's ``[1, vocab]`` float logits, with
        the same processors, in the same order, as ``model.generate`` applies."""
        import torch

        sampling = self.request.sampling
        if self._processors is None:
            self._processors = logits_processors(sampling)
        if self._processors:
            ids = torch.tensor([self.prompt_ids + self.generated], device=logits.device)
            logits = self._processors(ids, logits)
        if not sampling.greedy:
            if sampling.seed is not None and self._generator is None:
                self._generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
            token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=self._generator)
        else:
            token = torch.argmax(logits, dim=-1)
        return int(token.reshape(-1)[0])

    def accept(self, token_id: int) -> None:
        """Record a decoded token and hand it to the request's stream at once."""
        self.generated.append(token_id)
        self.request.emit(token_id)

    def end(self, error: BaseException | None = None) -> None:
        """Leave the batch: the engine learns that the request is done, once."""
        if not self.ended:
            self.ended = True
            self.request.finish(error)


class BatchScheduler:
    """The decode loop: one thread, one model, up to ``slots`` sequences per step."""

    def __init__(
        self, model: Any, device: Any, slots: int, chunk_tokens: int = 0, prefix_cache: PrefixCache | None = None
    ) -> None:
        """``chunk_tokens``: most prompt tokens prefilled between two decode steps (0: no limit)."""
        _check_supported(model)
        self._model = model
        self._device = device
        self._slots = slots
        self._chunk_tokens = chunk_tokens
        self._prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self._waiting: deque[Sequence] = deque()
        self._prefilling: deque[Sequence] = deque()  # admitted, prompt not complete yet: slots of their own
        self._wakeup = threading.Condition()
        self._stopping = False
        self._batch = _Batch(self._prefix_cache)
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    @property
    def prefix_cache(self) -> PrefixCache:
        """The conversations' key/value caches new prompts start from."""
        return self._prefix_cache

    def submit(self, request: DecodeRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        sequence = Sequence(request)
        with self._wakeup:
            if self._stopping:
                sequence.end(RuntimeError("the generator is shutting down"))
                return
            self._waiting.append(sequence)
            self._wakeup.notify()

    def close(self) -> None:
        """The decoder's ``close``: :meth:`stop`."""
        self.stop()

    def stop(self) -> None:
        """End the loop; sequences still waiting or running fail with an error."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        """Sequences in the batch right now (for tests and metrics)."""
        return len(self._batch.sequences)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self._prefilling and not self._batch.sequences:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    admitted = []
                    while self._waiting and len(self._batch.sequences) + len(self._prefilling) + len(admitted) < self._slots:
                        admitted.append(self._waiting.popleft())
                try:
                    self._prefilling.extend(admitted)
                    self._prefill()
                    self._batch.evict_finished()
                    if self._batch.sequences:
                        self._step()
                        self._batch.evict_finished()
                except Exception as exc:
                    # A bug here must not leave requests waiting forever on a dead loop.
                    logger.exception("the decode loop failed; ending the %d sequences in the batch", self.running)
                    for sequence in {*admitted, *self._prefilling, *self._batch.sequences}:
                        sequence.end(exc)
                    self._batch, self._prefilling = _Batch(self._prefix_cache), deque()
        error = RuntimeError("the generator is shutting down")
        with self._wakeup:
            waiting, self._waiting = list(self._waiting), deque()
        for sequence in [*self._batch.sequences, *self._prefilling, *waiting]:
            sequence.end(error)
        self._batch, self._prefilling = _Batch(self._prefix_cache), deque()

    def _prefill(self) -> None:
        """Prefill the admitted prompts in order, up to the step's token budget; a sequence
        whose prompt is complete picks its first token and joins the batch. Whole prompts
        that fit the budget together go through the model in one pass (left-padded, as the
        batch is), so requests arriving together do not wait for each other's prefill."""
        budget = self._chunk_tokens or None
        while self._prefilling and budget != 0:
            group = self._whole_prompts_within(budget)
            if len(group) > 1:
                self._prefill_together(group)
                if budget is not None:
                    budget -= sum(len(s.prompt_ids) for s in group)
                continue
            sequence = self._prefilling[0]
            if sequence.request.stopped:
                self._prefilling.popleft()
                sequence.end()
                continue
            self._resume_from_prefix_cache(sequence)
            remaining = len(sequence.prompt_ids) - sequence.prefilled
            take = remaining if budget is None else min(remaining, budget)
            try:
                logits = self._prefill_chunk(sequence, take)
            except Exception as exc:
                logger.exception("prefill failed for a sequence of %d prompt tokens", len(sequence.prompt_ids))
                self._prefilling.popleft()
                sequence.cache = None
                sequence.end(exc)
                continue
            if budget is not None:
                budget -= take
            if sequence.prefilled < len(sequence.prompt_ids):
                return  # the budget ran out inside this prompt: the rest after the next decode step
            self._prefilling.popleft()
            cache, sequence.cache = sequence.cache, None
            sequence.accept(sequence.choose(logits))
            self._batch.join([sequence], cache, _ones_mask(len(sequence.prompt_ids), cache.layers[0].keys.device))

    def _resume_from_prefix_cache(self, sequence: Sequence) -> None:
        """Start ``sequence``'s cache from the longest cached prefix of its prompt, if any
        (asked once per sequence)."""
        if sequence.looked_up or not self._prefix_cache.enabled:
            return
        sequence.looked_up = True
        layers, reused = self._prefix_cache.lookup(sequence.request.cache_salt, sequence.prompt_ids)
        if reused:
            sequence.cache = cache_from_layers(self._model, layers)
            sequence.prefilled = reused

    def _whole_prompts_within(self, budget: int | None) -> list[Sequence]:
        """The waiting prompts at the head of the line, not started, not stopped and with
        nothing in the prefix cache, whose tokens fit ``budget`` together (no limit: all of
        them)."""
        group: list[Sequence] = []
        used = 0
        for sequence in self._prefilling:
            self._resume_from_prefix_cache(sequence)
            length = len(sequence.prompt_ids)
            if sequence.prefilled or sequence.request.stopped or (budget is not None and used + length > budget):
                break
            group.append(sequence)
            used += length
        return group

    def _prefill_together(self, group: list[Sequence]) -> None:
        """One forward pass over several whole prompts, left-padded to the longest; their
        rows of the cache join the batch together."""
        import torch
        from transformers import DynamicCache

        for _ in group:
            self._prefilling.popleft()
        width = max(len(s.prompt_ids) for s in group)
        input_ids = torch.zeros((len(group), width), dtype=torch.long, device=self._device)
        mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(group):
            length = len(sequence.prompt_ids)
            input_ids[row, width - length :] = torch.tensor(sequence.prompt_ids, device=self._device)
            mask[row, width - length :] = 1
        # As model.generate positions a left-padded batch: padding gets a position it never attends from.
        position_ids = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        try:
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=DynamicCache(config=self._model.config),
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :].float()
            for row, sequence in enumerate(group):
                sequence.accept(sequence.choose(logits[row : row + 1]))
        except Exception as exc:
            logger.exception("prefill failed for %d prompts of up to %d tokens", len(group), width)
            for sequence in group:
                sequence.end(exc)
            return
        self._batch.join(group, out.past_key_values, mask)

    def _prefill_chunk(self, sequence: Sequence, take: int) -> Any:
        """Run the next ``take`` prompt tokens of ``sequence`` into its own cache; the
        float logits of the last one."""
        import torch
        from transformers import DynamicCache

        if sequence.cache is None:
            sequence.cache = DynamicCache(config=self._model.config)
        start = sequence.prefilled
        input_ids = torch.tensor([sequence.prompt_ids[start : start + take]], device=self._device)
        out = self._model(
            input_ids=input_ids,
            # The whole row so far: the cache's tokens and this chunk, none of them padding.
            attention_mask=_ones_mask(start + take, self._device),
            past_key_values=sequence.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        sequence.cache = out.past_key_values
        sequence.prefilled = start + take
        return out.logits[:, -1, :].float()

    def _step(self) -> None:
        """One forward pass for every sequence in the batch, one new token each."""
        import torch

        batch = self._batch
        try:
            last = torch.tensor([[s.generated[-1]] for s in batch.sequences], device=self._device)
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.sequences), 1))], dim=1)
            out = self._model(
                input_ids=last,
                attention_mask=mask,
                position_ids=mask.sum(dim=1, keepdim=True) - 1,
                past_key_values=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            batch.mask = mask
            logits = out.logits[:, -1, :].float()
            for row, sequence in enumerate(batch.sequences):
                sequence.accept(sequence.choose(logits[row : row + 1]))
        except Exception as exc:
            # The shared cache may be half-updated: no sequence in it can go on.
            logger.exception("decode step failed; ending the %d sequences in the batch", len(batch.sequences))
            for sequence in batch.sequences:
                sequence.end(exc)
            self._batch = _Batch(self._prefix_cache)


class _Batch:
    """The running sequences and their shared, left-padded KV cache and mask.

    Invariant: row ``i`` of every cache tensor and of ``mask`` belongs to
    ``sequences[i]``; each row holds its prompt and all its generated tokens but
    the last, which is the input of the next step. A row that leaves is kept in the
    prefix cache.
    """

    def __init__(self, prefix_cache: PrefixCache) -> None:
        self._prefix_cache = prefix_cache
        self.sequences: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None

    def join(self, sequences: list[Sequence], cache: Any, new_mask: Any) -> None:
        """Add prefilled sequences (their cache rows and mask, left-padded among themselves),
        padding the shorter of batch and newcomers on the left."""
        import torch

        if not self.sequences:
            self.sequences, self.cache, self.mask = list(sequences), cache, new_mask
            return
        width = max(self.mask.shape[1], new_mask.shape[1])
        for ours, theirs in zip(self.cache.layers, cache.layers, strict=True):
            ours.keys = torch.cat([_pad_left(ours.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            ours.values = torch.cat([_pad_left(ours.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(new_mask, width, 1)])
        self.sequences.extend(sequences)

    def evict_finished(self) -> None:
        """Drop finished and cancelled sequences and the padding no one needs any more."""
        finished = [s.finished for s in self.sequences]  # once: a cancel may land meanwhile
        if not any(finished):
            return
        keep = [i for i, done in enumerate(finished) if not done]
        leaving = [s for s, done in zip(self.sequences, finished) if done]
        if self._prefix_cache.enabled:
            for row, done in enumerate(finished):
                if done:
                    self._keep_prefix(row)
        if keep:
            import torch

            rows = torch.tensor(keep, device=self.mask.device)
            self.mask = self.mask.index_select(0, rows)
            start = int(self.mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every row
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, rows)[:, :, start:]
                layer.values = layer.values.index_select(0, rows)[:, :, start:]
            self.sequences = [self.sequences[i] for i in keep]
        else:
            self.sequences, self.cache, self.mask = [], None, None
        for sequence in leaving:
            sequence.end()

    def _keep_prefix(self, row: int) -> None:
        """Put row ``row``'s tokens and cache (past its left padding) in the prefix cache."""
        sequence = self.sequences[row]
        start = int(self.mask[row].nonzero()[0])
        tokens = (sequence.prompt_ids + sequence.generated)[: self.mask.shape[1] - start]
        self._prefix_cache.store(sequence.request.cache_salt, tokens, layers_of(self.cache, row, start))


def _ones_mask(length: int, device: Any) -> Any:
    """The attention mask of one unpadded row."""
    import torch

    return torch.ones((1, length), dtype=torch.long, device=device)


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """Zero-pad ``tensor`` at the start of ``dim`` to ``width``."""
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _check_supported(model: Any) -> None:
    """Refuse models whose KV cache is not one plain key/value tensor per layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    unsupported = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if not layers or unsupported:
        raise ValueError(
            f"continuous batching supports full-attention key/value caches only, and this model uses "
            f"{', '.join(unsupported) or 'no per-layer cache'}: set GENERATOR_SLOTS=1 to run it sequentially"
        )
