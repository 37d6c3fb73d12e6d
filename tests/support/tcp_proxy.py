"""A round-robin TCP proxy for tests: a stand-in for the load balancer in front of API pods.

Each new client connection goes to the next backend in turn; a backend that refuses the
connection (a pod that was killed or not yet started) is skipped, as a load balancer's
health check would. Bytes are forwarded untouched (no HTTP parsing), and when either side
closes or dies the other side is closed too, so a client sees its connection drop exactly
when the pod behind it goes away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import TracebackType

from tests.support.processes import free_port

_CHUNK = 65536


class TcpProxy:
    """Listens on a free loopback port (:attr:`url`) and forwards to ``backends``
    (``(host, port)`` pairs). Runs its own event loop in a daemon thread, so sync and
    async tests alike use it: ``with TcpProxy([(host, port), ...]) as proxy: ...``."""

    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        if not backends:
            raise ValueError("a proxy needs at least one backend")
        #: Where new connections go, in turn; may be changed while the proxy runs (pods come and go).
        self.backends = list(backends)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{self.port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpProxy:
        """Listen (returns once connections are accepted)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Stop listening, close every open connection and end the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        # Let each connection's task see its close, so that none is left pending when
        # the loop stops.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._server.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the next backend that accepts one, or None when none does."""
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                return await asyncio.open_connection(*backend)
            except OSError:
                continue  # refused: that backend is down
        return None

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            backend = await self._connect()
            if backend is None:
                return  # closing the client's connection is all a dead cluster can say
            backend_reader, backend_writer = backend
            self._writers.add(backend_writer)
            try:
                # Whichever direction ends first (EOF or an error) ends the connection.
                pipes = [
                    asyncio.create_task(self._pipe(client_reader, backend_writer)),
                    asyncio.create_task(self._pipe(backend_reader, client_writer)),
                ]
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                self._writers.discard(backend_writer)
                backend_writer.close()
        finally:
            self._writers.discard(client_writer)
            client_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # a reset is an end like EOF; the caller closes both sides
