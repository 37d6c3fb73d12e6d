"""The request contract of ``/chat_stream``: reject bad input before it costs anything."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect, Request

from services.api.errors import ApiError


#: An oversized body up to this size is read (and dropped) before the 413 is sent:
#: a client that writes its whole body before reading (Python's urllib, many scripts)
#: would otherwise see its connection reset, the server closing with unread data,
#: instead of the 413. Larger ones are answered at once, without reading them.
DRAIN_MAX_BYTES = 8 * 1024 * 1024

#: The longest the API spends reading a body it refuses.
DRAIN_SECONDS = 5.0


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed
    ``max_bytes``: from ``Content-Length`` before reading anything, or while
    reading a chunked body, so an oversized upload is never buffered whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        if int(declared) <= DRAIN_MAX_BYTES:
            await _drain(request, int(declared))
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            await _drain(request, DRAIN_MAX_BYTES - len(body))
            raise _too_large(len(body), max_bytes)
    return bytes(body)


async def _drain(request: Request, limit: int) -> None:
    """Read and drop up to ``limit`` more bytes of the body, for at most
    ``DRAIN_SECONDS`` (a lingering close, as nginx does), so the 413 reaches a
    client that reads only once it has sent everything."""
    read = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in request.stream():
                read += len(chunk)
                if read >= limit:
                    return
    except (TimeoutError, ClientDisconnect, RuntimeError):  # RuntimeError: nothing was left to read
        return


def check_body_size(body: bytes, max_bytes: int) -> None:
    """413 for a body the route already read."""
    if len(body) > max_bytes:
        raise _too_large(len(body), max_bytes)


def _too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is {size}+ bytes; at most {max_bytes} are accepted")


class ChatStreamRequest(BaseModel):
    """Body of ``POST /chat_stream`` (the ChatStream 0.3 contract)."""

    # Unknown fields are refused (422 naming them): a typo like "regenrate" must not
    # be silently ignored.
    model_config = ConfigDict(extra="forbid")

    user_input: str = Field(
        "",
        description="The user's message. May be empty or null (as ChatStream's clients send it) only to regenerate.",
    )
    regenerate: bool = Field(False, description="Drop the last reply and generate it again.")

    @field_validator("user_input", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        # ChatStream's own clients (its web UI, ChatStreamJs) regenerate with
        # {"user_input": null, "regenerate": true}.
        return "" if value is None else value


def load_json_object(body: bytes, example: str, *, non_object_status: int = 422) -> dict[str, Any]:
    """Decode a body that must be one JSON object; :class:`ApiError` 400 when it is
    empty or not JSON (non-UTF-8 bytes included), ``non_object_status`` when it is
    JSON but not an object. ``example`` completes "send ..." in the empty-body error."""
    if not body.strip():
        raise ApiError(400, "invalid_request", f"the request body is empty; send {example}")
    try:
        data: Any = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: it is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # Where, not the parser's own words: the client finds its mistake from this.
        raise ApiError(
            400, "invalid_json", f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(non_object_status, "invalid_request", "the request body must be a JSON object")
    return data


def describe_validation_errors(errors: list[Any]) -> str:
    """pydantic's errors as one line a user can act on: ``field: problem; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)


def parse_chat_request(body: bytes, max_input_chars: int) -> ChatStreamRequest:
    """Parse and check a raw request body; raises :class:`ApiError` (4xx) on bad input."""
    data = load_json_object(body, 'JSON like {"user_input": "Hello"}')
    try:
        request = ChatStreamRequest.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            422,
            "invalid_request",
            describe_validation_errors(exc.errors()),
            detail=json.loads(exc.json(include_url=False)),
        ) from None
    if not request.regenerate and not request.user_input.strip():
        raise ApiError(422, "invalid_request", "user_input: must not be empty")
    if len(request.user_input) > max_input_chars:
        raise ApiError(
            422,
            "input_too_long",
            f"user_input: {len(request.user_input)} characters, at most {max_input_chars} allowed",
        )
    return request
