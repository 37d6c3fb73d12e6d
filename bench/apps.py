"""The API apps the relay benchmark serves (``uvicorn --factory bench.apps:create``).

``BENCH_APP`` picks one:

* ``mux``: the service as it is (``services.api.app.create_app``), reading every
  open stream through the multiplexing reader (``stream_reader.StreamReader``).
* ``relay``: the same app with the simple reader patched in: one blocking
  ``XREAD`` per request (``relay.read_events``), the design it replaced.
* ``inprocess``: the same app again, but the job is not enqueued: the synthetic
  engine runs inside the API process and its deltas go to the response through an
  in-memory queue. Admission and sessions still use Redis, so the difference to
  ``relay``/``mux`` is exactly the hop (enqueue → generator → stream → relay).

``bench.apps:timed`` serves ``create()``'s app and notes, for each resume
(``GET /chat_stream/{id}``), the API's own share of its latency (see ``timed``).

Generator settings (``SYNTHETIC_TOKENS_PER_SECOND``, ``MAX_NEW_TOKENS``) are read
from the same environment variables the generator pod reads.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from services.api import relay
from services.api.stream_reader import StreamReader
from services.api.app import create_app
from services.api.enqueue import JobQueue
from services.api.settings import ApiSettings
from services.common.contract import EventType, FinishReason, GenerationJob, StreamEvent


def create() -> FastAPI:
    """The app named by ``BENCH_APP``."""
    mode = os.environ.get("BENCH_APP", "mux")
    if mode == "relay":
        _replace_read_events(relay.read_events)
    elif mode == "inprocess":
        _generate_in_process()
    elif mode != "mux":
        raise ValueError(f"unknown BENCH_APP {mode!r}")
    return create_app(ApiSettings())


def timed() -> Callable[..., Awaitable[None]]:
    """``create()``'s app, writing a line per resume request to ``BENCH_TIMINGS_FILE``:
    milliseconds from the request reaching the app to its response headers, and to
    its first ``token`` event (the benchmark's client sees these plus its own costs:
    a new connection, sending, parsing)."""
    app = create()
    out = open(os.environ["BENCH_TIMINGS_FILE"], "a", buffering=1)  # noqa: SIM115 (the process's lifetime)

    async def timed_app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith("/chat_stream/"):
            return await app(scope, receive, send)
        arrived = time.perf_counter()
        headers_ms = 0.0

        async def timed_send(message: dict) -> None:
            nonlocal headers_ms
            if message["type"] == "http.response.start":
                headers_ms = (time.perf_counter() - arrived) * 1000
            await send(message)
            if message["type"] == "http.response.body" and headers_ms and b"event: token" in message.get("body", b""):
                out.write(f"{headers_ms:.3f} {(time.perf_counter() - arrived) * 1000:.3f}\n")
                headers_ms = 0.0  # the first token only

        await app(scope, receive, timed_send)

    return timed_app


class _ReplacedSubscription:
    """Stands in for a ``stream_reader.Subscription``: no doorbell, events from the replacement."""

    notify_key = ""

    def __init__(self, events: Callable[[float], AsyncIterator[StreamEvent]]) -> None:
        self._events = events

    def events(self, silence_limit: float, job_pending: object = None) -> AsyncIterator[StreamEvent]:
        """The replacement's events (it knows by itself when the job is gone)."""
        return self._events(silence_limit)

    def close(self) -> None:
        """The replacement cleans up when its iteration ends."""


def _replace_read_events(replacement: Callable[[object, str, float], AsyncIterator[StreamEvent]]) -> None:
    """Make the request path read its streams with ``replacement(redis, request_id,
    silence_limit)`` instead of the process's multiplexing reader."""

    async def subscribe(self: StreamReader, request_id: str) -> _ReplacedSubscription:
        return _ReplacedSubscription(lambda silence_limit: replacement(self.redis, request_id, silence_limit))

    StreamReader.subscribe = subscribe  # type: ignore[method-assign]


def _generate_in_process() -> None:
    from services.generator.engine import ResolvedSampling, SyntheticEngine
    from services.generator.settings import GeneratorSettings

    settings = GeneratorSettings(generator_backend="synthetic")
    engine = SyntheticEngine(settings)
    streams: dict[str, asyncio.Queue[StreamEvent]] = {}

    async def run(job: GenerationJob, out: asyncio.Queue[StreamEvent]) -> None:
        out.put_nowait(StreamEvent(EventType.START, worker="inprocess"))
        generation = engine.start(job.messages, ResolvedSampling.resolve(job.sampling, settings), threading.Event())
        async for delta in generation:
            out.put_nowait(StreamEvent(EventType.TOKEN, text=delta))
        finish = generation.finish_reason.value if isinstance(generation.finish_reason, FinishReason) else "length"
        out.put_nowait(
            StreamEvent(
                EventType.DONE,
                finish_reason=finish,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            )
        )

    tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self: JobQueue, job: GenerationJob, registration: object = None) -> None:
        # No resumption in-process (ChatStream's architecture): the registration goes nowhere.
        out = streams[job.request_id] = asyncio.Queue()
        task = asyncio.create_task(run(job, out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def read_events(redis: object, request_id: str, silence_limit: float) -> AsyncIterator[StreamEvent]:
        out = streams[request_id]
        try:
            while True:
                event = await out.get()
                yield event
                if event.is_terminal:
                    return
        finally:
            streams.pop(request_id, None)

    JobQueue.enqueue = enqueue  # type: ignore[method-assign]
    _replace_read_events(read_events)
