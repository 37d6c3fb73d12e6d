"""Handing a generation job to the generator pods, and taking it back."""

from __future__ import annotations

import dataclasses

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common.contract import (
    GENERATE_FUNCTION,
    QUEUE_NAME,
    STREAM_TTL_SECONDS,
    WAKE_CHANNEL,
    GenerationJob,
    cancel_key,
    serialize_job,
)
from services.common.telemetry import inject_context

tracer = trace.get_tracer("services.api")


class JobQueue:
    """The API side of the arq queue."""

    def __init__(self, arq: ArqRedis) -> None:
        if arq.job_serializer is not serialize_job:
            # arq would pickle the job, and generators reject pickles (unpickling runs code).
            raise ValueError(
                "the job queue's ArqRedis must serialize jobs as JSON: create it with "
                "services.common.redis_client.arq_redis_from_url"
            )
        self._arq = arq

    async def enqueue(self, job: GenerationJob) -> None:
        """Enqueue ``job`` (arq job id = request id) with the current trace context,
        and wake idle workers so it starts within milliseconds."""
        with tracer.start_as_current_span("job.enqueue", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("chat.request_id", job.request_id)
            payload = dataclasses.replace(job, trace_context=inject_context()).to_dict()
            queued = await self._arq.enqueue_job(
                GENERATE_FUNCTION, payload, _job_id=job.request_id, _queue_name=QUEUE_NAME
            )
            if queued is None:
                raise RuntimeError(f"a job with id {job.request_id} already exists")
            await self._arq.publish(WAKE_CHANNEL, job.request_id)

    async def is_pending(self, request_id: str) -> bool:
        """Whether the request's job still waits in the queue or runs: arq deletes
        the job's key when it finishes, fails or is rejected."""
        return bool(await self._arq.exists(job_key_prefix + request_id))

    async def withdraw(self, request_id: str) -> bool:
        """Stop a request's generation wherever it is.

        Returns True when the job was still waiting in the queue and has been
        removed, so it will never run. Otherwise the generator running it sees the
        cancel key at its next check and stops.
        """
        async with self._arq.pipeline(transaction=True) as pipe:
            pipe.set(cancel_key(request_id), b"1", ex=STREAM_TTL_SECONDS)
            pipe.zrem(QUEUE_NAME, request_id)
            pipe.delete(job_key_prefix + request_id)
            _, removed, _ = await pipe.execute()
        return bool(removed)
