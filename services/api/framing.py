"""Wire formats of ``/chat_stream``: how token deltas become bytes.

* plain text (default): the deltas themselves, chunked; ``curl -N`` shows the
  reply as it grows. An error after the first byte aborts the response (no final
  chunk), which every HTTP client reports as an incomplete body.
* SSE (``Accept: text/event-stream``): JSON events ``queued`` (position while
  waiting for a permit), ``token``, ``done`` (finish reason, usage, and the
  history turns the prompt kept), ``error``.
* ChatStream 0.3 (setting): each chunk is the whole reply so far followed by
  ``<::EOS::>``, for existing ChatStream web clients.
"""

from __future__ import annotations

import json
from typing import Any

from services.api.errors import ApiError
from services.common.contract import StreamEvent

CHATSTREAM_EOS = "<::EOS::>"


class Framer:
    """Encodes one response. ``error`` returns bytes to send, or None when the
    format has no way to say it in-band and the response must be aborted."""

    media_type = "text/plain; charset=utf-8"

    def token(self, delta: str) -> bytes:
        """Bytes for one text delta."""
        raise NotImplementedError

    def done(self, event: StreamEvent) -> bytes:
        """Bytes that end a successful response (``event`` is the ``done`` entry)."""
        return b""

    def queued(self, position: int) -> bytes:
        """Bytes that tell a waiting client its queue position (nothing for plain text,
        which sees nothing until the first token)."""
        return b""

    def error(self, code: str, message: str) -> bytes | None:
        """Bytes that report an error in-band, or None to abort the response."""
        return None

    def error_response(self, status: int, code: str, message: str) -> tuple[bytes, str]:
        """Body and content type of an error that happens before any byte was sent
        (an ordinary HTTP error with ``status``): ``{"error": code, "message": ...}``."""
        response = ApiError(status, code, message).to_response()
        return bytes(response.body), "application/json"


class PlainTextFramer(Framer):
    """Plain text deltas."""

    def token(self, delta: str) -> bytes:
        return delta.encode()


class ChatStreamFramer(Framer):
    """ChatStream 0.3's cumulative framing."""

    def __init__(self) -> None:
        self._text = ""

    def token(self, delta: str) -> bytes:
        self._text += delta
        return (self._text + CHATSTREAM_EOS).encode()


class SseFramer(Framer):
    """Server-sent events with a JSON payload per event."""

    media_type = "text/event-stream; charset=utf-8"

    @staticmethod
    def event(name: str, data: dict[str, Any]) -> bytes:
        """One SSE event."""
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def token(self, delta: str) -> bytes:
        return self.event("token", {"text": delta})

    def queued(self, position: int) -> bytes:
        return self.event("queued", {"position": position})

    def done(self, event: StreamEvent) -> bytes:
        data: dict[str, Any] = {
            "finish_reason": event.finish_reason,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
        }
        if event.history_turns is not None:
            data["history_turns"] = event.history_turns
        return self.event("done", data)

    def error(self, code: str, message: str) -> bytes | None:
        return self.event("error", {"code": code, "message": message})
