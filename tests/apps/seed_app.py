"""A user's own FastAPI app with the ChatStream article's three route patterns,
ported literally (plain; intercepting the body and passing ``request_body``; a
``callback=callback_func``), plus the OpenAI routes with the same callback.

Where the article's callback reads the conversation from ChatStream's in-process
session, ours reads the finished exchange from ``request.state.chat`` and stores
it (here: as JSON in a Redis list the tests read, with the sync client a plain
``def`` callback would use).

Run with ``python -m uvicorn tests.apps.seed_app:app``.
"""

from __future__ import annotations

import dataclasses
import json

import redis
from fastapi import FastAPI, Request
from starlette.responses import Response

from services.api import ChatStream
from services.api.openai_compat import OpenAICompat, add_openai_routes

#: Redis list of the exchanges the callbacks saw, as JSON, one per callback call.
EXCHANGES_KEY = "test:exchanges"

chat_stream = ChatStream()
app = FastAPI()
store = redis.Redis.from_url(chat_stream.settings.redis_url)


def callback_func(request, message):
    # When generation has ended: store the exchange the way a user's app would.
    chat = request.state.chat
    record = {"message": str(message), "path": request.url.path, **dataclasses.asdict(chat)}
    store.rpush(EXCHANGES_KEY, json.dumps(record))


@app.post("/chat_stream")
async def stream_api(request: Request):
    # handling FastAPI/Starlette's Request
    response = await chat_stream.handle_chat_stream_request(request)
    return response


@app.post("/chat_stream_intercept")
async def stream_api_intercept(request: Request):
    # Intercepting the request: the body is consumed here, so it is passed on.
    request_body = await request.body()
    data = json.loads(request_body)
    user_input = data["user_input"]
    regenerate = data["regenerate"]
    print(f"user_input:{user_input} regenerate:{regenerate}")
    response = await chat_stream.handle_chat_stream_request(request, request_body, callback=callback_func)
    return response


@app.post("/chat_stream_callback")
async def stream_api_callback(request: Request):
    response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)
    return response


@app.get("/chat_stream/{request_id}")
async def resume_api(request: Request, request_id: str):
    # Resuming takes the same callback: whichever connection sees the end fires it, once.
    return await chat_stream.handle_resume_request(request, request_id, callback=callback_func)


@app.delete("/chat_stream/{request_id}")
async def cancel(request: Request, request_id: str) -> Response:
    return await chat_stream.handle_cancel_request(request, request_id)


@app.post("/generation_params")
async def set_generation_params(request: Request):
    return await chat_stream.set_generation_params(request)


add_openai_routes(app, OpenAICompat(chat_stream.generation), callback=callback_func)


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}
