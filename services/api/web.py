"""The browser chat page: static files served at ``/`` (no build step).

The page talks to ``/chat_stream`` with ``Accept: text/event-stream`` and to
``/clear_context``, so it shares their session cookie and admission queue. A reply
whose connection drops is resumed with ``GET /chat_stream/{request_id}`` after the
last event shown (``Last-Event-ID``), on whichever pod answers. When the API needs a
key, the page asks for it and sends it as a bearer token, on resumption too.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: The page loads only its own files and talks only to its own origin.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def add_web_page(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its assets under ``/static/``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)
