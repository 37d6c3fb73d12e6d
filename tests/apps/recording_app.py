"""A user's own FastAPI app, written the way the ChatStream article shows, whose
callbacks record every (request id, message) in Redis for the tests to read.

Run with ``python -m uvicorn tests.apps.recording_app:app``.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request

from services.api import CallbackMessage, ChatStream

#: Redis list of "<request id> <message>" strings, one per callback call.
CALLBACKS_KEY = "test:callbacks"

chat_stream = ChatStream()
app = FastAPI()


async def record(request: Request, message: CallbackMessage) -> None:
    await chat_stream.redis.rpush(CALLBACKS_KEY, f"{request.state.request_id} {message}")


@app.post("/chat_stream")
async def stream_api(request: Request):
    # Intercept the body first, as the article does; then it must be passed on.
    request_body = await request.body()
    json.loads(request_body)
    return await chat_stream.handle_chat_stream_request(request, request_body, callback=record)


@app.post("/chat_stream_sync_callback")
async def stream_api_sync(request: Request):
    def record_sync(request: Request, message: CallbackMessage) -> None:
        # A plain function works too; it may not block, so it only schedules the write.
        import asyncio

        asyncio.get_running_loop().create_task(record(request, message))

    return await chat_stream.handle_chat_stream_request(request, callback=record_sync)


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}
