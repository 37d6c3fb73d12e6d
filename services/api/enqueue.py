"""Handing a generation job to the generator pods, and taking it back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job as arq_envelope
from arq.utils import timestamp_ms
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common.contract import (
    GENERATE_FUNCTION,
    QUEUE_NAME,
    STREAM_TTL_SECONDS,
    WAKE_CHANNEL,
    GenerationJob,
    affinity_key,
    cancel_key,
    conversation_digest,
    prefix_holder_key,
    serialize_job,
)
from services.common.lua import redis_now
from services.common.telemetry import inject_context

tracer = trace.get_tracer("services.api")

# What arq's enqueue_job writes (the job key unless it or its result exists, the
# queue entry), the job's first claim for the generator that holds its
# conversation's cache (prefix affinity: ``services.generator.worker``), the
# request's registration when it comes along, and the wake-up, in one script call:
# arq's own enqueue takes three round trips (WATCH, EXISTS, MULTI/EXEC) and the
# others one each, all on the way to the first token.
# KEYS: job, result, queue, prefix holder, affinity[, record, readers]
# ARGV: job, expires ms, score, job id, wake channel[, record ttl s, readers px, fields...]
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
local holder = redis.call('GET', KEYS[4])
if holder then
""" + redis_now() + """
  redis.call('PSETEX', KEYS[5], ARGV[2], holder .. ' ' .. math.floor(now * 1000))
end
if #KEYS > 5 then
  redis.call('HSET', KEYS[6], unpack(ARGV, 8))
  redis.call('EXPIRE', KEYS[6], ARGV[6])
  redis.call('SET', KEYS[7], '1', 'PX', ARGV[7])
end
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""


@dataclass(frozen=True)
class Registration:
    """The writes that make a new request resumable (``services.api.resume``): its
    record, and that a client reads it."""

    record_key: str
    fields: dict[str, str]
    record_ttl_seconds: int
    readers_key: str
    readers_ttl_ms: int


class JobQueue:
    """The API side of the arq queue."""

    def __init__(self, arq: ArqRedis) -> None:
        if arq.job_serializer is not serialize_job:
            # arq would pickle the job, and generators reject pickles (unpickling runs code).
            raise ValueError(
                "the job queue's ArqRedis must serialize jobs as JSON: create it with "
                "services.common.redis_client.connect_arq"
            )
        self._arq = arq
        self._script = arq.register_script(_ENQUEUE)

    async def enqueue(self, job: GenerationJob, registration: Registration | None = None) -> None:
        """Enqueue ``job`` (arq job id = request id) with the current trace context and
        the conversation it continues, with ``registration`` if given, and wake idle
        workers so it starts within milliseconds."""
        with tracer.start_as_current_span("job.enqueue", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("chat.request_id", job.request_id)
            continues = conversation_digest(job.tenant, job.messages[:-1])
            payload = dataclasses.replace(job, trace_context=inject_context(), continues=continues).to_dict()
            now = timestamp_ms()
            keys = [
                job_key_prefix + job.request_id,
                result_key_prefix + job.request_id,
                QUEUE_NAME,
                prefix_holder_key(continues),
                affinity_key(job.request_id),
            ]
            args: list[str | int | bytes] = [
                arq_envelope(GENERATE_FUNCTION, (payload,), {}, None, now, serializer=serialize_job),
                self._arq.expires_extra_ms,
                now,
                job.request_id,
                WAKE_CHANNEL,
            ]
            if registration is not None:
                keys += [registration.record_key, registration.readers_key]
                args += [registration.record_ttl_seconds, registration.readers_ttl_ms]
                for name, value in registration.fields.items():
                    args += [name, value]
            if not await self._script(keys=keys, args=args):
                raise RuntimeError(f"a job with id {job.request_id} already exists")

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
