"""The FastAPI app that ``python -m services.api`` serves.

It is built only from the public pieces a user would use in their own app:
``ChatStream``, the health checks and the metrics endpoint, the OpenAI-compatible
routes, the web page, and the API-key and CORS middlewares.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route

from services.api.auth import ApiKeyMiddleware, ApiKeys
from services.api.chat_stream import ChatStream
from services.api.generation_params import GenerationParamsUpdate
from services.api.health import accepting, liveness, readiness
from services.api.metrics import metrics_response
from services.api.openai_compat import OpenAICompat, add_openai_routes
from services.api.settings import ApiSettings, Environment
from services.api.validation import ChatStreamRequest
from services.api.web import add_web_page

logger = logging.getLogger(__name__)


#: The route reads its body itself (ChatStream's API takes the raw request), so its
#: contract is declared here for the OpenAPI schema and the tools that read it.
CHAT_STREAM_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatStreamRequest.model_json_schema()}},
    },
    "responses": {
        "200": {
            "description": "The reply, streamed: plain text deltas, SSE events, or ChatStream framing.",
            "content": {"text/plain": {}, "text/event-stream": {}},
        },
        "4XX": {"description": "Bad input, full queue: JSON {error, message}.", "content": {"application/json": {}}},
    },
}


#: Like the chat route, the settings route reads its body itself.
GENERATION_PARAMS_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerationParamsUpdate.model_json_schema()}},
    },
    "responses": {
        "200": {
            "description": "The session's settings after the change, as GET returns them.",
            "content": {"application/json": {}},
        },
        "4XX": {
            "description": "Bad input (422 names each bad field), cross-site (403), not JSON (415).",
            "content": {"application/json": {}},
        },
    },
}


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the service's app (OpenTelemetry instrumentation is added by the caller).

    With ``API_INTERNAL_PORT`` set, ``/metrics``, ``/healthz`` and ``/readyz`` are
    not routes of this app but of ``app.state.internal_app``, which
    ``python -m services.api`` serves on that port: an ingress that exposes the API
    then exposes neither the metrics nor the probes.

    Raises ``ValueError`` for unusable settings (e.g. an unreadable ``API_KEYS_FILE``).
    """
    settings = settings or ApiSettings()
    keys = ApiKeys.from_settings(settings)
    if settings.environment is Environment.PRODUCTION and not keys.enabled:
        # Only with ALLOW_ANONYMOUS=true (the settings refuse it otherwise).
        logger.warning("ENVIRONMENT=production with ALLOW_ANONYMOUS: anyone who reaches the API may use it")
    chat_stream = ChatStream(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chat_stream.watch_for_shutdown()
        yield
        await chat_stream.close()

    app = FastAPI(title="chatstream", lifespan=lifespan)

    @app.post("/chat_stream", openapi_extra=CHAT_STREAM_OPENAPI)
    async def chat_stream_route(request: Request) -> Response:
        return await chat_stream.handle_chat_stream_request(request)

    @app.get("/chat_stream/{request_id}")
    async def resume_route(request: Request, request_id: str) -> Response:
        return await chat_stream.handle_resume_request(request, request_id)

    @app.delete("/chat_stream/{request_id}", status_code=204)
    async def cancel_route(request: Request, request_id: str) -> Response:
        return await chat_stream.handle_cancel_request(request, request_id)

    @app.post("/clear_context")
    async def clear_context(request: Request) -> Response:
        return await chat_stream.clear_context(request)

    @app.get("/generation_params")
    async def get_generation_params(request: Request) -> Response:
        return await chat_stream.get_generation_params(request)

    @app.post("/generation_params", openapi_extra=GENERATION_PARAMS_OPENAPI)
    async def set_generation_params(request: Request) -> Response:
        return await chat_stream.set_generation_params(request)

    @app.get("/load")
    async def load(request: Request) -> Response:
        return await chat_stream.get_load(request)

    async def healthz(request: Request) -> Response:
        return await liveness(chat_stream.generation.reader.stalls(settings.stream_reader_stall_seconds))

    async def readyz(request: Request) -> Response:
        return await readiness(chat_stream.redis, chat_stream.accepting)

    async def acceptingz(request: Request) -> Response:
        return await accepting(chat_stream.accepting)

    async def metrics(request: Request) -> Response:
        return await metrics_response(chat_stream.redis, chat_stream.generation.admission.semaphore)

    operations = [
        Route("/healthz", healthz),
        Route("/acceptingz", acceptingz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    if settings.api_internal_port:
        # /load too, without a key: KEDA's metrics-api trigger reads its demand here.
        app.state.internal_app = Starlette(routes=[*operations, Route("/load", load)])
    else:
        app.router.routes.extend(operations)

    add_openai_routes(app, OpenAICompat(chat_stream.generation, settings))
    add_web_page(app)

    # The last middleware added runs first: CORS answers preflights (which carry no
    # key) before the key check, and its headers reach 401s too.
    app.add_middleware(ApiKeyMiddleware, keys=keys, tenants=chat_stream.generation.tenants)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(settings.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "accept"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    return app
