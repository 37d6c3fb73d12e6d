"""Shutting an API pod down without breaking a stream (rolling updates).

On SIGTERM the pod *drains*: ``/acceptingz`` answers 503 at once (the readiness
probe), new requests and resumes get 503 ``shutting_down`` with ``Connection:
close`` (a keep-alive client then reconnects through the Service, to another
pod), and every open SSE stream whose generation runs is ended at an event
boundary with an ``event: reconnect``. Its client resumes on another pod after
the last event it got (``GET /chat_stream/{id}`` with ``Last-Event-ID``), while the
generation, which owns its permit, goes on. Streams that cannot be resumed by
their client (plain text, the OpenAI routes, or ``RESUME_GRACE_SECONDS=0``) are
left to finish; uvicorn waits for them, and Kubernetes bounds the wait with the
pod's ``terminationGracePeriodSeconds``. Last, the pod waits out the grace of the
streams it handed off, so that it fires the callback of a request no client
came back for.

The server (uvicorn) owns SIGTERM: :meth:`Drain.install` chains a handler in front
of the server's own, so draining starts the moment the signal arrives, in
``python -m services.api`` and in a user's app run by uvicorn alike.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


class Drain:
    """Whether this process is shutting down; set once, never cleared."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._installed = False

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def start(self, reason: str) -> None:
        """Begin draining (idempotent)."""
        if not self._event.is_set():
            logger.info("draining (%s): new requests get 503, SSE streams are handed to other pods", reason)
            self._event.set()

    async def wait(self) -> None:
        """Returns once draining has begun."""
        await self._event.wait()

    def install(self) -> None:
        """Start draining on SIGTERM, before the server's own handler runs. Call it
        from the event loop's thread once the server runs (its lifespan startup, or
        any request): a process whose SIGTERM nobody handles just dies, and there is
        nothing to chain to then."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return  # no server handles SIGTERM (the default action kills the process)
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self.start, "SIGTERM")
            previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._installed = True
