"""The FastAPI app that ``python -m services.api`` serves.

It is built only from the public pieces a user would use in their own app:
``ChatStream`` and the health checks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import Response

from services.api.chat_stream import ChatStream
from services.api.health import liveness, readiness
from services.api.outcome import CallbackMessage
from services.api.settings import ApiSettings

logger = logging.getLogger("services.api.requests")


def log_outcome(request: Request, message: CallbackMessage) -> None:
    """Default callback: one log line per finished request."""
    logger.info("chat_stream %s finished: %s", getattr(request.state, "request_id", "-"), message.value)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the service's app (OpenTelemetry instrumentation is added by the caller)."""
    chat_stream = ChatStream(settings or ApiSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await chat_stream.close()

    app = FastAPI(title="chatstream", lifespan=lifespan)

    @app.post("/chat_stream")
    async def chat_stream_route(request: Request) -> Response:
        return await chat_stream.handle_chat_stream_request(request, callback=log_outcome)

    @app.post("/clear_context")
    async def clear_context(request: Request) -> Response:
        return await chat_stream.clear_context(request)

    @app.get("/healthz")
    async def healthz() -> Response:
        return await liveness()

    @app.get("/readyz")
    async def readyz() -> Response:
        return await readiness(chat_stream.redis)

    return app
