"""A user's own FastAPI app that serves a ChatStream 0.3-style web client from the
same origin as the routes it calls (the session cookie must come along), laid out
the way ChatStream's ``append_apis`` lays them out: the page at ``/``, its script
at ``/chatstream.js``, ``POST /chat_stream`` and ``POST /clear_context``.

Run with ``RESPONSE_FORMAT=chatstream python -m uvicorn tests.apps.chatstream_client_app:app``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

from services.api import ChatStream

PAGE = Path(__file__).parent / "chatstream_client"

chat_stream = ChatStream()
app = FastAPI()


@app.post("/chat_stream")
async def stream_api(request: Request):
    return await chat_stream.handle_chat_stream_request(request)


@app.post("/clear_context")
async def clear_context(request: Request):
    return await chat_stream.clear_context(request)


@app.get("/")
async def index():
    return FileResponse(PAGE / "index.html")


@app.get("/chatstream.js")
async def script():
    return FileResponse(PAGE / "chatstream.js", media_type="text/javascript")


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}
