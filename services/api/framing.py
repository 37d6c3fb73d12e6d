"""Wire formats of ``/chat_stream``: how token deltas become bytes.

* plain text (default): the deltas themselves, chunked; ``curl -N`` shows the
  reply as it grows. An error after the first byte aborts the response (no final
  chunk), which every HTTP client reports as an incomplete body.
* SSE (``Accept: text/event-stream``): JSON events ``queued`` (position while
  waiting for a permit), ``token``, ``done`` (finish reason, usage, and the
  history turns the prompt kept), ``error``; ``reconnect`` when a shutting-down
  pod ends the stream (resume it: ``GET /chat_stream/{id}``, ``Last-Event-ID``).
* ChatStream 0.3 (setting): each chunk is the whole reply so far followed by
  ``<::EOS::>``, for existing ChatStream web clients, with error bodies in the
  shape those clients read (see :class:`ChatStreamFramer`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from services.api.errors import ApiError
from services.common.contract import StreamEvent

CHATSTREAM_EOS = "<::EOS::>"
#: ChatStream 0.3 names each streamed reply in this header (its clients may send the
#: id back, e.g. with feedback); here it is the request id.
CHATSTREAM_MESSAGE_ID_HEADER = "x-chatstream-last-generated-message-id"
#: The one code ChatStream 0.3 gives every server-side failure (HTTP 500 there).
CHATSTREAM_SERVER_ERROR = "internal_server_error"
#: ChatStream 0.3's answer to ``POST /clear_context``.
CHATSTREAM_CONTEXT_CLEARED = {"success": True, "message": "Context successfully cleared"}


class Framer:
    """Encodes one response. ``error`` returns bytes to send, or None when the
    format has no way to say it in-band and the response must be aborted."""

    media_type = "text/plain; charset=utf-8"

    def opening(self) -> bytes:
        """Bytes that start the response body, before any event."""
        return b""

    def token(self, event: StreamEvent) -> bytes:
        """Bytes for one ``token`` event (its ``text`` is the delta)."""
        raise NotImplementedError

    def done(self, event: StreamEvent) -> bytes:
        """Bytes that end a successful response (``event`` is the ``done`` entry)."""
        return b""

    def queued(self, position: int) -> bytes:
        """Bytes that tell a waiting client its queue position (nothing for plain text,
        which sees nothing until the first token)."""
        return b""

    def error(self, code: str, message: str, cursor: str = "") -> bytes | None:
        """Bytes that report an error in-band, or None to abort the response
        (``cursor``: the stream entry of a generator's error, '' for the API's own)."""
        return None

    def handoff(self) -> bytes | None:
        """Bytes that end the response of a draining pod and tell the client to resume
        elsewhere, or None when this format's clients cannot resume by themselves
        (the response then goes on to its end)."""
        return None

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        """Response headers this format adds to a streamed reply."""
        return []

    def http_error(self, error: ApiError) -> JSONResponse:
        """The HTTP response for an error before any byte was sent:
        ``{"error": code, "message": ...}``."""
        return error.to_response()

    def error_response(self, status: int, code: str, message: str) -> tuple[bytes, str]:
        """Body and content type of :meth:`http_error` for a generation that failed
        before its first byte (an ordinary HTTP error with ``status``)."""
        response = self.http_error(ApiError(status, code, message))
        return bytes(response.body), "application/json"


class PlainTextFramer(Framer):
    """Plain text deltas."""

    def token(self, event: StreamEvent) -> bytes:
        return event.text.encode()


class OffsetFramer(Framer):
    """A plain-text reply resumed at a byte offset: the wrapped framer's body less
    its first ``offset`` bytes (those the client already has)."""

    def __init__(self, framer: Framer, offset: int) -> None:
        self._framer = framer
        self._skip = offset
        self.media_type = framer.media_type

    def _cut(self, body: bytes) -> bytes:
        if self._skip:
            skipped = min(self._skip, len(body))
            self._skip -= skipped
            body = body[skipped:]
        return body

    def token(self, event: StreamEvent) -> bytes:
        return self._cut(self._framer.token(event))

    def done(self, event: StreamEvent) -> bytes:
        return self._cut(self._framer.done(event))

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return self._framer.headers(request_id)

    def http_error(self, error: ApiError) -> JSONResponse:
        return self._framer.http_error(error)


class ChatStreamFramer(Framer):
    """ChatStream 0.3's cumulative framing, headers and error bodies.

    ChatStream's clients (the web UI in its repository and ChatStreamJs) show
    the text of each read as the whole reply, and sort a failed request by HTTP
    status alone (4xx: client error, 5xx: server error), then read
    ``err.json.error`` (the code) and ``err.json.detail`` (a sentence).
    ChatStream 0.3 itself only ever answered ``too_many_requests`` (also our code
    for a full queue) and ``internal_server_error`` for any server-side failure,
    so every 5xx carries that code here; our own code and message stay in
    ``code`` and ``message``, and ``detail`` is that message (a 422's
    field-by-field list is in the default format only).
    """

    def __init__(self) -> None:
        self._text = ""

    def token(self, event: StreamEvent) -> bytes:
        self._text += event.text
        return (self._text + CHATSTREAM_EOS).encode()

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return [(CHATSTREAM_MESSAGE_ID_HEADER.encode(), request_id.encode())]

    def http_error(self, error: ApiError) -> JSONResponse:
        body = {
            "error": CHATSTREAM_SERVER_ERROR if error.status >= 500 else error.code,
            "detail": error.message,
            "code": error.code,
            "message": error.message,
        }
        return JSONResponse(body, status_code=error.status, headers=error.headers)


class SseFramer(Framer):
    """Server-sent events with a JSON payload per event.

    Every event that comes from the request's stream carries its cursor as the SSE
    ``id:``, so a client that lost the connection resumes right after the last event
    it got (``GET /chat_stream/{request_id}`` with ``Last-Event-ID``); ``retry:``
    tells ``EventSource`` how soon to reconnect."""

    media_type = "text/event-stream; charset=utf-8"

    #: Milliseconds an ``EventSource`` waits before it reconnects.
    RETRY_MS = 1000

    @staticmethod
    def event(name: str, data: dict[str, Any], cursor: str = "") -> bytes:
        """One SSE event (with ``id: cursor`` when given)."""
        head = f"id: {cursor}\n" if cursor else ""
        return f"{head}event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def opening(self) -> bytes:
        return f"retry: {self.RETRY_MS}\n\n".encode()

    def token(self, event: StreamEvent) -> bytes:
        return self.event("token", {"text": event.text}, event.cursor)

    def queued(self, position: int) -> bytes:
        return self.event("queued", {"position": position})

    def done(self, event: StreamEvent) -> bytes:
        data: dict[str, Any] = {
            "finish_reason": event.finish_reason,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
        }
        if event.history_turns is not None:
            data["history_turns"] = event.history_turns
        return self.event("done", data, event.cursor)

    def error(self, code: str, message: str, cursor: str = "") -> bytes | None:
        return self.event("error", {"code": code, "message": message}, cursor)

    def handoff(self) -> bytes | None:
        # No id: the client's Last-Event-ID stays the last event of the reply it has.
        return self.event("reconnect", {"reason": "shutting_down", "retry_ms": self.RETRY_MS})
