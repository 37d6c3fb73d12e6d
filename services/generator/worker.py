"""The arq worker of a generator pod: job intake, wake-ups and registration."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import time
from pathlib import Path
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from arq.worker import func
from redis.exceptions import RedisError

from services.common.contract import (
    GENERATE_FUNCTION,
    GENERATORS_KEY,
    QUEUE_NAME,
    WAKE_CHANNEL,
    GenerationJob,
    GeneratorInfo,
    JobRejected,
    SamplingDefaults,
    affinity_key,
    deserialize_job,
    serialize_job,
)
from services.common.lua import redis_now
from services.common.pubsub import listen_forever
from services.common.redis_client import connect_arq
from services.common.registry import register_generator, unregister_generator
from services.common.contract import GENERATIONS
from services.common.watchdog import Progress, Stall, stalls
from services.generator import metrics
from services.generator.engine import Engine
from services.generator.factory import create_engine
from services.generator.job import JobRunner
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)


#: How long ago a job must have been claimed before it can count as orphaned.
ORPHAN_AGE_MS = 30_000

# KEYS: queue, permit holders, generators, then per job: its in-progress key, its
# job key, its affinity key.
# ARGV: now (ms), in-progress TTL (ms), free slots, this worker's id, affinity wait
# (ms), then the job ids.
# Returns {claimed: job id, score, ...; orphaned: job id, ...; ms until a job left to
# another generator may be taken here, -1 if none}.
# A job that another worker holds (its in-progress key exists) is skipped, unless it
# was claimed over ORPHAN_AGE_MS ago and its request holds no live permit: then the
# worker that took it died (a failover can also lose arq's clean-up of a finished
# job) and nobody waits for it; it is removed here, or it would sit in the queue
# until its in-progress key expires (minutes), taking a place in every poll. (A job
# that just ended has released its permit a moment before arq's own clean-up: the
# age spares it.) A job's permit holder is its request id.
# Prefix affinity: a job whose conversation's cache another live generator holds (its
# affinity key: that worker's id and the enqueue time on Redis's clock) is left to
# that generator for the affinity wait after its enqueue; after that, or at once when
# the holder's registration has expired, any worker takes it. The wait is measured on
# Redis's clock, so skewed pod clocks cannot stretch it.
_CLAIM_JOBS = redis_now("now_s") + """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
local wait_ms = tonumber(ARGV[5])
local now_ms = math.floor(now_s * 1000)
local claimed, orphaned, soonest = {}, {}, -1
for i = 1, (#KEYS - 3) / 3 do
  local in_progress, job_key, affinity, job_id = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3], ARGV[i + 5]
  local left = redis.call('PTTL', in_progress)
  if left ~= -2 then
    local expires = redis.call('ZSCORE', KEYS[2], job_id)
    if left < tonumber(ARGV[2]) - ORPHAN_AGE_MS and (not expires or tonumber(expires) < now_s) then
      redis.call('ZREM', KEYS[1], job_id)
      redis.call('DEL', job_key, in_progress, affinity)
      orphaned[#orphaned + 1] = job_id
    end
  elseif #claimed < 2 * limit then
    local score = redis.call('ZSCORE', KEYS[1], job_id)
    if score and tonumber(score) <= now then
      local left_to_holder = 0
      local first = redis.call('GET', affinity)
      if first and wait_ms > 0 then
        local holder, since = string.match(first, '^(.*) (%d+)$')
        if holder and holder ~= ARGV[4] then
          local alive = redis.call('ZSCORE', KEYS[3], holder)
          if alive and tonumber(alive) > now_s then
            left_to_holder = tonumber(since) + wait_ms - now_ms
          end
        end
      end
      if left_to_holder > 0 then
        if soonest < 0 or left_to_holder < soonest then soonest = left_to_holder end
      else
        redis.call('PSETEX', in_progress, ARGV[2], '1')
        redis.call('DEL', affinity)
        claimed[#claimed + 1] = job_id
        claimed[#claimed + 1] = score
      end
    end
  end
end
return {claimed, orphaned, soonest}
""".replace("ORPHAN_AGE_MS", str(ORPHAN_AGE_MS))


#: The id of the job arq is starting in this task, for the deserializer's log line
#: and its check that the job is the request it names (arq passes it no id).
_starting_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("starting_job_id", default="")


def _deserialize_job(raw: bytes) -> dict[str, Any]:
    """arq's job deserializer here: JSON in the contract's schema, or the job is
    rejected before anything of it runs. arq then fails the job, which removes it
    from the queue; the worker goes on serving."""
    job_id = _starting_job_id.get()
    try:
        envelope = deserialize_job(raw)
        if envelope["a"][0].request_id != job_id:
            raise JobRejected("bad_schema", "request_id is not the job's id")
    except JobRejected as exc:
        metrics.JOBS_REJECTED.labels(reason=exc.reason).inc()
        logger.warning("rejected job %s without running it (%s): %s", job_id, exc.reason, exc.detail)
        raise
    return envelope


class WakeableWorker(Worker):
    """An arq worker that starts a new job within milliseconds of its enqueueing.

    arq polls its queue every ``poll_delay`` (0.5 s by default), which would add
    up to that much to every time-to-first-token. Here the API publishes on
    :data:`WAKE_CHANNEL` after each enqueue and a finishing job wakes its own
    worker, so the poll interval is only a fallback for a missed message.
    """

    def __init__(
        self, *args: Any, idle_poll_seconds: float, worker_id: str, affinity_wait_ms: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, poll_delay=0, **kwargs)
        self.idle_poll_seconds = idle_poll_seconds
        self.worker_id = worker_id
        self.affinity_wait_ms = affinity_wait_ms
        self.wake = asyncio.Event()
        self.drain_started = asyncio.Event()
        self._claim: Any = None
        #: Moves with every turn of the poll loop (a failed poll counts: Redis being
        #: down is not this pod's fault); the watchdog's view of job intake.
        self.progress = Progress("job loop", always_busy=True)
        #: What the watchdog found stuck, once it has: from then on the worker takes no
        #: job until it is restarted (its engine cannot be trusted again).
        self.stalled: list[Stall] = []

    async def _poll_iteration(self) -> None:
        self.wake.clear()
        try:
            await super()._poll_iteration()
        except (RedisError, OSError):
            # arq would let this end the worker; a Redis outage must not kill a pod
            # that is otherwise fine. Keep trying until Redis is back.
            logger.warning("polling the job queue failed; retrying", exc_info=True)
        self.progress.moved()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), self.idle_poll_seconds)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim and start the jobs a poll found, all claims in one round trip.

        arq claims one job at a time (WATCH, EXISTS, ZSCORE, MULTI/EXEC: four
        round trips each, one job after another); under load those waits on a busy
        event loop were most of a job's time from enqueue to start (traces: p90 58
        ms at 100 streams). The rule is arq's, applied atomically per job in Lua:
        a job is claimed by setting its in-progress key, only if no worker holds
        that key and the job is still queued and due.
        """
        if self.stalled:
            return  # the engine would never run them; other generators will
        free = self.max_jobs - self.job_counter
        # The queue lists running jobs too (arq removes a job when it ends), oldest
        # first: offer every waiting one, and let the script stop at the free slots.
        # (Cutting the list to the free slots first offered only the running jobs,
        # and a busy pod took no new job until one ended.)
        ids = [job_id.decode() for job_id in job_ids]
        ids = [job_id for job_id in ids if job_id not in self.tasks]
        if free <= 0 or not ids:
            return
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM_JOBS)
        keys = [self.queue_name, GENERATIONS.holders, GENERATORS_KEY]
        for job_id in ids:
            keys += [in_progress_key_prefix + job_id, job_key_prefix + job_id, affinity_key(job_id)]
        claimed, orphaned, soonest = await self._claim(
            keys=keys,
            args=[
                timestamp_ms(),
                int(self.in_progress_timeout_s * 1000),
                free,
                self.worker_id,
                self.affinity_wait_ms,
                *ids,
            ],
        )
        if soonest >= 0:
            # A job is left to the generator holding its conversation: if that one does
            # not take it within the wait, look again then and take it here.
            self.loop.call_later(soonest / 1000, self.wake.set)
        for job_id in orphaned:
            metrics.JOBS_ORPHANED.inc()
            logger.warning(
                "removed job %s from the queue: the worker running it is gone and so is its request's permit",
                job_id.decode() if isinstance(job_id, bytes) else job_id,
            )
        for job_id, score in zip(claimed[::2], claimed[1::2]):
            job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
            await self.sem.acquire()  # never waits: at most max_jobs - job_counter claims
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job, with the job's id known to :func:`_deserialize_job`."""
        _starting_job_id.set(job_id)  # each job runs in a task of its own: no reset needed
        await super().run_job(job_id, score)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        """SIGTERM/SIGINT (e.g. a Kubernetes scale-in): stop taking jobs, let the
        running streams finish for up to DRAIN_SECONDS (arq's job_completion_wait),
        then exit."""
        self.drain_started.set()
        super().handle_sig_wait_for_completion(signum)


async def _generate(ctx: dict[str, Any], job: GenerationJob) -> str:
    runner: JobRunner = ctx["runner"]
    try:
        return await runner.run(job)
    finally:
        ctx["wake"].set()  # a slot is free: look at the queue now, not at the next poll


async def _listen_for_wakeups(ctx: dict[str, Any]) -> None:
    wake: asyncio.Event = ctx["wake"]

    async def set_wake() -> None:
        wake.set()

    await listen_forever(ctx["redis"], WAKE_CHANNEL, set_wake)


def generator_info(settings: GeneratorSettings, engine: Engine) -> GeneratorInfo:
    """What this generator publishes with its registration: the model it serves and
    the defaults and limits it applies to a job (``ResolvedSampling.resolve``)."""
    model_id = engine.model_id
    if Path(model_id).is_dir():
        # Clients see this (GET /load): the directory's name, not the pod's paths.
        model_id = Path(model_id).name
    return GeneratorInfo(
        model_id=model_id,
        defaults=SamplingDefaults(
            # A default above the limit is capped like any request.
            max_new_tokens=min(settings.max_new_tokens, settings.max_new_tokens_limit),
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
        ),
        max_new_tokens_limit=settings.max_new_tokens_limit,
        context_length=engine.context_length,
    )


def _watch_for_stalls(runner: JobRunner, worker: WakeableWorker, limit: float) -> None:
    """The watchdog: once the engine or the job loop has been stuck past ``limit``,
    the worker stops taking jobs for good and every generation waiting on a stuck
    engine ends with an error (its client told, its permit released)."""
    if worker.stalled:
        return
    found = stalls([runner.progress, worker.progress], limit)
    if not found:
        return
    worker.stalled = found
    metrics.STALLED.set(1)
    ended = runner.end_stalled() if any(s.loop == runner.progress.name for s in found) else 0
    logger.error(
        "watchdog: %s; this generator takes no more jobs, ended %d running generations and withdraws its "
        "registration, so that its probes fail and it is restarted",
        "; ".join(map(str, found)),
        ended,
    )


async def _keep_registered(
    ctx: dict[str, Any], settings: GeneratorSettings, worker: WakeableWorker, info: GeneratorInfo
) -> None:
    while not worker.drain_started.is_set():
        _watch_for_stalls(ctx["runner"], worker, settings.generator_stall_seconds)
        try:
            if worker.stalled:
                # Withdrawn at every turn: the registration must stay gone, whatever
                # renewed it last.
                await unregister_generator(ctx["redis"], settings.worker_id)
            else:
                await register_generator(
                    ctx["redis"], settings.worker_id, settings.registration_ttl_seconds, settings.generator_slots, info
                )
        except Exception:
            logger.warning("renewing the generator registration failed", exc_info=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(worker.drain_started.wait(), settings.registration_ttl_seconds / 3)
    # A draining pod takes no new work: it stops counting as capacity at once.
    try:
        await unregister_generator(ctx["redis"], settings.worker_id)
    except Exception:
        logger.warning("unregistering the draining generator failed", exc_info=True)


def build_worker(settings: GeneratorSettings) -> WakeableWorker:
    """An arq worker for the generation function, configured from ``settings``.

    The model is loaded once in ``on_startup``, before the first job is taken.
    """
    engine_holder: dict[str, Any] = {}

    async def on_startup(ctx: dict[str, Any]) -> None:
        metrics.serve_metrics(settings.metrics_port)
        metrics.SLOTS.set(settings.generator_slots)
        started = time.perf_counter()
        engine = await asyncio.to_thread(create_engine, settings)
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - started)
        engine_holder["engine"] = engine
        ctx["runner"] = JobRunner(engine, ctx["redis"], settings)
        ctx["wake"] = worker.wake
        worker.progress.moved()  # loading the model was not the job loop being stuck
        ctx["background"] = [
            asyncio.create_task(_listen_for_wakeups(ctx)),
            asyncio.create_task(_keep_registered(ctx, settings, worker, generator_info(settings, engine))),
        ]
        logger.info("generator %s ready (model %s)", settings.worker_id, engine.model_id)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        for task in ctx.get("background", []):
            task.cancel()
        with contextlib.suppress(Exception):
            await unregister_generator(ctx["redis"], settings.worker_id)
        if "engine" in engine_holder:
            engine_holder["engine"].close()

    worker = WakeableWorker(
        functions=[
            # max_tries=1: a job is never silently re-run after its worker died,
            # since its client may already have received part of a reply.
            func(_generate, name=GENERATE_FUNCTION, max_tries=1, timeout=settings.job_timeout_seconds, keep_result=0)
        ],
        queue_name=QUEUE_NAME,
        # Our own pool: arq's would have neither keepalive nor read timeouts, and
        # follows a Sentinel failover only with its own settings.
        redis_pool=connect_arq(settings),
        job_serializer=serialize_job,
        job_deserializer=_deserialize_job,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.generator_slots,
        keep_result=0,
        health_check_interval=5,
        idle_poll_seconds=settings.idle_poll_seconds,
        worker_id=settings.worker_id,
        affinity_wait_ms=settings.prefix_affinity_wait_ms,
        job_completion_wait=settings.drain_seconds,
    )
    return worker
