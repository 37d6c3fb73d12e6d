"""Running one generation job: the life of a request inside a generator pod."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.asyncio import Redis

from services.common.contract import (
    GENERATOR_HEARTBEAT_SECONDS,
    PREFIX_HOLDER_TTL_SECONDS,
    ChatMessage,
    ErrorCode,
    EventType,
    GenerationJob,
    StreamEvent,
    conversation_digest,
    prefix_holder_key,
)
from services.common.logs import request_id_var
from services.common.telemetry import extract_context
from services.generator import metrics
from services.generator.engine import Engine, Generation, GenerationError
from services.generator.sampling import ResolvedSampling
from services.common.quota import TokenBudgets
from services.common.semaphore import FencedLease
from services.generator.publisher import UNREACHABLE, FencedWriter, LeaseLost, StreamPublisher
from services.generator.settings import GeneratorSettings
from services.common.watchdog import Progress

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("services.generator")


class JobRunner:
    """Runs generation jobs on one engine and publishes their events."""

    def __init__(self, engine: Engine, redis: Redis, settings: GeneratorSettings) -> None:
        self._engine = engine
        self._redis = redis
        self._settings = settings
        # One writer for every job of this process: the tokens of concurrent jobs
        # (a batch's decode step) share script calls.
        self._writer = FencedWriter(redis)
        self._budgets = TokenBudgets(redis)
        #: Moves with every token of any running generation: the watchdog's view of
        #: the engine (a hung device or a deadlock stops it while jobs wait on it).
        self.progress = Progress("engine")
        self._running: set[_Deltas] = set()

    async def run(self, job: GenerationJob) -> str:
        """Generate the reply to ``job`` into its stream; returns the finish reason
        (or ``error:<code>``). Never raises for a failed generation: the failure is
        published to the client as an ``error`` event instead."""
        with tracer.start_as_current_span(
            "generate", context=extract_context(job.trace_context), kind=SpanKind.CONSUMER
        ) as span:
            request_id_var.set(job.request_id)
            span.set_attribute("chat.request_id", job.request_id)
            span.set_attribute("chat.worker", self._settings.worker_id)
            span.set_attribute("chat.tenant", job.tenant or "default")
            span.set_attribute("gen_ai.request.model", self._engine.model_id)
            if job.lease is not None:
                span.set_attribute("chat.fencing_token", job.lease.fencing_token)
            publisher = StreamPublisher(
                self._redis,
                job.request_id,
                self._settings.worker_id,
                job.lease,
                self._writer,
                job.notify_key,
                job.readers_key,
                retry_seconds=self._settings.redis_retry_seconds,
            )
            refused = await publisher.should_stop()
            if refused:
                # The client left while the job was queued, or its permit is gone:
                # do no work at all.
                logger.info("request %s not started: %s", job.request_id, refused)
                span.set_attribute("chat.finish_reason", refused)
                return refused
            # The permit belongs to the generation from here: renewed by the watcher,
            # released once the terminal entry is written (or the job is cut short).
            lease = None
            if publisher.owns_lease and job.lease is not None:
                lease = FencedLease(self._redis, job.lease.holder_id, job.lease.fencing_token, job.lease.seconds)
            await publisher.start()
            metrics.ACTIVE_JOBS.inc()
            cancel = threading.Event()
            watcher = asyncio.create_task(self._watch(job.request_id, cancel, publisher, lease))
            logger.info("request %s started", job.request_id)
            try:
                terminal = await self._generate(job, cancel, publisher, span)
            except asyncio.CancelledError:
                # The worker is shutting down past its drain time: tell the client
                # instead of leaving it to notice the silence.
                logger.warning("request %s cut short by the generator's shutdown", job.request_id)
                with contextlib.suppress(Exception):
                    await publisher.publish_unfenced(
                        StreamEvent(EventType.ERROR, code=ErrorCode.GENERATOR_SHUTDOWN, message="the generator shut down")
                    )
                raise
            finally:
                metrics.ACTIVE_JOBS.dec()
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            outcome = terminal.finish_reason or f"error:{terminal.code}"
            metrics.JOBS.labels(outcome=outcome).inc()
            # Logged before the terminal entry is written: once the API reads it, the
            # permit goes to the next request, and this generation must be over by then.
            logger.info("request %s finished: %s (%d tokens)", job.request_id, outcome, terminal.completion_tokens)
            try:
                await publisher.publish(terminal)
            except LeaseLost:
                await publisher.publish_unfenced(_lease_lost_event())
            finally:
                if lease is not None:
                    await _release(lease, job.request_id)
            return outcome

    async def _generate(
        self, job: GenerationJob, cancel: threading.Event, publisher: StreamPublisher, span: trace.Span
    ) -> StreamEvent:
        sampling = ResolvedSampling.resolve(job.sampling, self._settings)
        started = time.perf_counter()
        generation: Generation | None = None
        reply: list[str] = []
        try:
            generation = self._engine.start(job.messages, sampling, cancel, job.history, cache_salt=job.tenant)
            produced = _Deltas()
            self._running.add(produced)
            producer = asyncio.create_task(self._produce(generation, produced, span, started, self.progress))
            stopped_early = True
            try:
                # Whatever the engine produced while the previous write was in flight
                # goes out as one entry: no wait is added when writes keep up, and a
                # fast engine (or a slow Redis) costs fewer writes, not a growing backlog.
                while texts := await produced.take():
                    await publisher.tokens(texts)
                    reply.extend(texts)
                    if publisher.cancelled:
                        # "abandoned": the API did not ask; nobody reads the reply any more.
                        reason = "abandoned" if publisher.abandoned else "cancelled"
                        logger.info("request %s stopping: %s", job.request_id, reason)
                        if publisher.abandoned:
                            metrics.JOBS_ABANDONED.inc()
                        break
                else:
                    stopped_early = False
            finally:
                if stopped_early:
                    # Cancelled, a failed write (lease lost, Redis gone) or shutdown: the
                    # engine stops at its next token; the write's failure is what counts.
                    cancel.set()
                    await produced.wait_unless_abandoned(producer)
                self._running.discard(produced)
                if produced.abandoned and not producer.done():
                    # The watchdog gave up on the engine: waiting for it would never end.
                    producer.cancel()
            if producer.cancelled() or not producer.done():
                raise EngineStalled()
            first_token_at = await producer
        except EngineStalled:
            logger.error("request %s ended: the engine stopped producing tokens", job.request_id)
            span.set_status(Status(StatusCode.ERROR, "engine stalled"))
            return StreamEvent(
                EventType.ERROR, code=ErrorCode.GENERATOR_STALLED, message="the generator stopped making progress and is restarting"
            )
        except GenerationError as exc:
            logger.info("request %s rejected by the engine: %s", job.request_id, exc.message)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            return StreamEvent(EventType.ERROR, code=exc.code, message=exc.message)
        except LeaseLost:
            logger.warning("request %s stopping: lease_lost", job.request_id)
            span.set_status(Status(StatusCode.ERROR, "lease lost"))
            return _lease_lost_event()
        except Exception as exc:
            logger.exception("generation failed for request %s", job.request_id)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            # The exception's text (paths, device errors) stays in the log and the trace.
            return StreamEvent(EventType.ERROR, code=ErrorCode.GENERATION_FAILED, message="generation failed")
        finally:
            # Before the terminal entry: the tenant's next request, admitted once the API
            # reads it, finds these tokens counted. Cut-short generations count too.
            if generation is not None:
                metrics.TENANT_TOKENS.labels(tenant=job.tenant or "default").inc(generation.completion_tokens)
                if job.quota is not None:
                    await self._charge(job, generation.completion_tokens)
        if first_token_at is not None:
            span.set_attribute("chat.time_to_first_token_ms", (first_token_at - started) * 1000)
        span.set_attribute("gen_ai.usage.input_tokens", generation.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", generation.completion_tokens)
        span.set_attribute("chat.finish_reason", generation.finish_reason.value)
        span.set_attribute("chat.history_turns", generation.history_turns)
        if self._engine.keeps_prefixes:
            await self._hold_prefix(job, "".join(reply))
        return StreamEvent(
            EventType.DONE,
            finish_reason=generation.finish_reason.value,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            history_turns=generation.history_turns,
        )

    def end_stalled(self) -> int:
        """The engine is stuck (the watchdog says): end every running generation now
        with a ``generator_stalled`` error, without waiting for the engine, so each
        client learns it and each permit comes back. Returns how many were ended."""
        running = list(self._running)
        for produced in running:
            produced.abandon()
        return len(running)

    async def _hold_prefix(self, job: GenerationJob, reply: str) -> None:
        """Claim the conversation this reply completes: the engine keeps its cache, and the
        next turn's job (which continues exactly these messages) comes here first.
        Written before the terminal entry, so that no next turn can be enqueued before it."""
        conversation = conversation_digest(job.tenant, [*job.messages, ChatMessage("assistant", reply)])
        try:
            await self._redis.set(prefix_holder_key(conversation), self._settings.worker_id, ex=PREFIX_HOLDER_TTL_SECONDS)
        except Exception:
            # Only a hint: the next turn then goes to any generator and prefills in full.
            logger.warning("recording that this generator holds %s's conversation failed", job.request_id, exc_info=True)

    async def _charge(self, job: GenerationJob, tokens: int) -> None:
        assert job.quota is not None
        try:
            await self._budgets.charge(job.quota.key, tokens, job.quota.tokens_per_minute)
        except Exception:
            logger.warning("charging %d tokens of %s to its tenant's quota failed", tokens, job.request_id, exc_info=True)

    @staticmethod
    async def _produce(
        generation: Generation, produced: _Deltas, span: trace.Span, started: float, progress: Progress
    ) -> float | None:
        """Run the engine's iteration into ``produced``; returns when the first token came."""
        first_token_at: float | None = None
        last_token_at = started
        try:
            with progress.working():
                async for delta in generation:
                    progress.moved()
                    now = time.perf_counter()
                    if first_token_at is None:
                        first_token_at = now
                        span.add_event("first_token")
                        metrics.TIME_TO_FIRST_TOKEN.observe(now - started)
                    else:
                        metrics.TIME_PER_TOKEN.observe(now - last_token_at)
                    last_token_at = now
                    metrics.TOKENS_GENERATED.inc()
                    produced.put(delta)
        finally:
            produced.close()
        return first_token_at

    async def _watch(
        self, request_id: str, cancel: threading.Event, publisher: StreamPublisher, lease: FencedLease | None
    ) -> None:
        """Until the job ends: stop it when the API asks, nobody reads any more or the
        lease is gone; keep the lease (when the job owns it) and the stream alive."""
        last_touch = last_renewal = time.monotonic()
        interval = self._settings.cancel_check_seconds
        unreachable = False  # logged once per outage, not every interval
        while not cancel.is_set():
            await asyncio.sleep(interval)
            try:
                now = time.monotonic()
                if lease is not None and now - last_renewal >= lease.seconds / 3:
                    if not await lease.renew():
                        raise LeaseLost(f"the lease of {request_id} expired")
                    last_renewal = now
                # While tokens flow, each write has just checked both, atomically: no
                # extra round trip is needed until the stream goes quiet.
                if now - publisher.last_checked >= interval:
                    reason = await publisher.should_stop()
                    if reason:
                        logger.info("request %s stopping: %s", request_id, reason)
                        if reason == "abandoned":
                            metrics.JOBS_ABANDONED.inc()
                        cancel.set()
                        return
                    now = time.monotonic()
                    if now - publisher.last_write >= GENERATOR_HEARTBEAT_SECONDS:
                        await publisher.heartbeat()
                if now - last_touch >= GENERATOR_HEARTBEAT_SECONDS * 10:
                    await publisher.touch()
                    last_touch = now
                if unreachable:
                    logger.info("request %s: Redis is reachable again", request_id)
                    unreachable = False
            except LeaseLost:
                cancel.set()
                return
            except UNREACHABLE as exc:
                # Retried every interval: the lease outlives an outage shorter than
                # two thirds of it (it was renewed at most a third ago).
                if not unreachable:
                    logger.warning("request %s: Redis unreachable (%s); retrying", request_id, exc)
                    unreachable = True
            except Exception:
                logger.exception("checking request %s for cancellation failed", request_id)


class EngineStalled(Exception):
    """The watchdog gave up on the engine while this generation waited for it."""


class _Deltas:
    """Text deltas the engine produced and the publisher has not written yet."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._closed = False
        self._ready = asyncio.Event()
        #: Set by :meth:`abandon`: ``take`` raises :class:`EngineStalled`.
        self.abandoned = False
        self._abandoned = asyncio.Event()

    def put(self, text: str) -> None:
        self._texts.append(text)
        self._ready.set()

    def close(self) -> None:
        """No more deltas: ``take`` returns what is left, then []."""
        self._closed = True
        self._ready.set()

    def abandon(self) -> None:
        """Stop waiting for the engine: the next (or current) ``take`` raises."""
        self.abandoned = True
        self._abandoned.set()
        self._ready.set()

    async def wait_unless_abandoned(self, producer: asyncio.Task[Any]) -> None:
        """Wait for ``producer`` to end, or for :meth:`abandon`, whichever comes first
        (never raises the producer's error: its outcome is read later)."""
        abandoned = asyncio.ensure_future(self._abandoned.wait())
        try:
            await asyncio.wait({producer, abandoned}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned.cancel()

    async def take(self) -> list[str]:
        """Every delta not taken yet, waiting for at least one; [] once closed and empty.
        Raises :class:`EngineStalled` once abandoned."""
        while not self._texts and not self._closed and not self.abandoned:
            self._ready.clear()
            await self._ready.wait()
        if self.abandoned:
            raise EngineStalled()
        texts, self._texts = self._texts, []
        return texts


def _lease_lost_event() -> StreamEvent:
    return StreamEvent(
        EventType.ERROR, code=ErrorCode.LEASE_LOST, message="the request's generation permit expired; generation stopped"
    )


async def _release(lease: FencedLease, request_id: str) -> None:
    """Give the job's permit back; if that fails its lease expires by itself."""
    try:
        await lease.release()
    except Exception:
        logger.warning("releasing the permit of %s failed; its lease will expire", request_id, exc_info=True)
