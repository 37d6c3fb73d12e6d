"""Running one generation job: the life of a request inside a generator pod."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.asyncio import Redis

from services.common.contract import (
    GENERATOR_HEARTBEAT_SECONDS,
    EventType,
    FinishReason,
    GenerationJob,
    StreamEvent,
    cancel_key,
)
from services.common.telemetry import extract_context
from services.generator.engine import Engine, GenerationError, ResolvedSampling
from services.generator.publisher import StreamPublisher
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("services.generator")


class JobRunner:
    """Runs generation jobs on one engine and publishes their events."""

    def __init__(self, engine: Engine, redis: Redis, settings: GeneratorSettings) -> None:
        self._engine = engine
        self._redis = redis
        self._settings = settings

    async def run(self, job: GenerationJob) -> str:
        """Generate the reply to ``job`` into its stream; returns the finish reason
        (or ``error:<code>``). Never raises for a failed generation: the failure is
        published to the client as an ``error`` event instead."""
        with tracer.start_as_current_span(
            "generate", context=extract_context(job.trace_context), kind=SpanKind.CONSUMER
        ) as span:
            span.set_attribute("chat.request_id", job.request_id)
            span.set_attribute("chat.worker", self._settings.worker_id)
            span.set_attribute("gen_ai.request.model", self._engine.model_id)
            if await self._redis.exists(cancel_key(job.request_id)):
                # The client left while the job was queued: do no work at all.
                span.set_attribute("chat.finish_reason", FinishReason.CANCELLED.value)
                return FinishReason.CANCELLED.value
            publisher = StreamPublisher(self._redis, job.request_id, self._settings.worker_id)
            await publisher.start()
            cancel = threading.Event()
            watcher = asyncio.create_task(self._watch(job.request_id, cancel, publisher))
            logger.info("request %s started", job.request_id)
            try:
                outcome = await self._generate(job, cancel, publisher, span)
                logger.info("request %s finished: %s", job.request_id, outcome)
                return outcome
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _generate(
        self, job: GenerationJob, cancel: threading.Event, publisher: StreamPublisher, span: trace.Span
    ) -> str:
        sampling = ResolvedSampling.resolve(job.sampling, self._settings)
        started = time.perf_counter()
        try:
            generation = self._engine.start(job.messages, sampling, cancel)
            async for delta in generation:
                if generation.first_token_at is None:
                    generation.first_token_at = time.perf_counter()
                    span.add_event("first_token")
                await publisher.token(delta)
        except GenerationError as exc:
            logger.info("request %s rejected by the engine: %s", job.request_id, exc.message)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            await publisher.publish(StreamEvent(EventType.ERROR, code=exc.code, message=exc.message))
            return f"error:{exc.code}"
        except Exception as exc:
            logger.exception("generation failed for request %s", job.request_id)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            await publisher.publish(
                StreamEvent(EventType.ERROR, code="generation_failed", message=f"generation failed: {exc}")
            )
            return "error:generation_failed"
        if generation.first_token_at is not None:
            span.set_attribute("chat.time_to_first_token_ms", (generation.first_token_at - started) * 1000)
        span.set_attribute("gen_ai.usage.input_tokens", generation.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", generation.completion_tokens)
        span.set_attribute("chat.finish_reason", generation.finish_reason.value)
        await publisher.publish(
            StreamEvent(
                EventType.DONE,
                finish_reason=generation.finish_reason.value,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            )
        )
        return generation.finish_reason.value

    async def _watch(self, request_id: str, cancel: threading.Event, publisher: StreamPublisher) -> None:
        """Until the job ends: stop it when the API asks, and keep the stream alive."""
        key = cancel_key(request_id)
        last_touch = time.monotonic()
        while not cancel.is_set():
            await asyncio.sleep(self._settings.cancel_check_seconds)
            try:
                if await self._redis.exists(key):
                    logger.info("request %s cancelled by the API", request_id)
                    cancel.set()
                    return
                now = time.monotonic()
                if now - publisher.last_write >= GENERATOR_HEARTBEAT_SECONDS:
                    await publisher.heartbeat()
                if now - last_touch >= GENERATOR_HEARTBEAT_SECONDS * 10:
                    await publisher.touch()
                    last_touch = now
            except Exception:
                logger.exception("checking request %s for cancellation failed", request_id)
