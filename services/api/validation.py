"""The request contract of ``/chat_stream``: reject bad input before it costs anything."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.api.errors import ApiError


class ChatStreamRequest(BaseModel):
    """Body of ``POST /chat_stream`` (the ChatStream 0.3 contract)."""

    model_config = ConfigDict(extra="ignore")

    user_input: str = Field("", description="The user's message. May be empty only with regenerate=true.")
    regenerate: bool = Field(False, description="Drop the last reply and generate it again.")


def parse_chat_request(body: bytes, max_input_chars: int) -> ChatStreamRequest:
    """Parse and check a raw request body; raises :class:`ApiError` (4xx) on bad input."""
    if not body.strip():
        raise ApiError(400, "invalid_request", "the request body is empty; send JSON like {\"user_input\": \"Hello\"}")
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object")
    try:
        request = ChatStreamRequest.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            422,
            "invalid_request",
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
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
