"""OpenAI-compatible front door: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Existing OpenAI clients (the ``openai`` package, LangChain, curl scripts) point
their base URL at ``http://host:8000/v1`` and work unchanged. Requests take the
same path as ``/chat_stream`` (``generation``: admit → enqueue → relay → finish
and callback); only the request contract and the wire format differ:

* streaming (``"stream": true``): server-sent ``data:`` chunks of
  ``chat.completion.chunk`` objects, ending with ``data: [DONE]``; with
  ``stream_options.include_usage`` one more chunk carries the token counts;
* otherwise one ``chat.completion`` JSON object, sent when generation is done;
* errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

The API is stateless here: the client sends the whole conversation each time
(no session cookie, no stored history).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.api import metrics
from services.api.errors import ApiError
from services.api.framing import Framer
from services.api.generation import GenerationRequest, GenerationService
from services.api.outcome import Callback
from services.api.settings import ApiSettings
from services.api.validation import describe_validation_errors, load_json_object, read_body
from services.common.contract import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    ChatMessage,
    SamplingParams,
    StreamEvent,
    Temperature,
    TopP,
    new_request_id,
)

#: Every route of this module lives under this prefix.
OPENAI_PREFIX = "/v1"


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """An error in OpenAI's shape, as JSON bytes."""
    error = {"message": message, "type": error_type(status), "param": param, "code": code}
    return json.dumps({"error": error}, ensure_ascii=False).encode()


class OpenAIError(ApiError):
    """An :class:`ApiError` answered in OpenAI's error shape; ``param`` names the
    offending request field, when there is one."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(status, code, message)
        self.param = param


def openai_error_response(error: ApiError) -> Response:
    """The HTTP response for ``error`` in OpenAI's shape (keeps e.g. ``Retry-After``)."""
    param = error.param if isinstance(error, OpenAIError) else None
    return Response(
        openai_error_body(error.status, error.code, error.message, param),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


# ---------------------------------------------------------------- the request contract


class TextPart(BaseModel):
    """One part of a multi-part message content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One message of ``messages``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as plain text (parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions``: the fields this service honours.

    Other OpenAI fields (``user``, ``presence_penalty``, ``logit_bias``, ...) are
    accepted and ignored, as many clients send them by default.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Echoed in the reply; this service serves one model.")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # The contract's own ranges: a value the generator would refuse must be a 400 here,
    # not a job that is dropped (top_p=0, which OpenAI allows, is refused as vLLM does).
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1)

    def sampling(self) -> SamplingParams:
        """The generator's sampling parameters for this request."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=[s for s in stop if s],
            seed=self.seed,
        )


def parse_completion_request(body: bytes) -> ChatCompletionRequest:
    """Parse and check a raw body; raises :class:`OpenAIError` 400 on bad input
    (OpenAI answers invalid parameters with 400, and its clients expect it)."""
    data = load_json_object(body, "a JSON chat completion request", non_object_status=400)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise OpenAIError(
            400,
            "invalid_request",
            describe_validation_errors(errors),
            param=".".join(map(str, errors[0]["loc"])) if errors else None,
        ) from None
    if request.n not in (None, 1):
        raise OpenAIError(400, "unsupported_parameter", "n: only n=1 is supported", param="n")
    stop = request.sampling().stop
    if len(stop) > MAX_STOP_STRINGS:
        raise OpenAIError(
            400, "invalid_request", f"stop: at most {MAX_STOP_STRINGS} sequences are allowed", param="stop"
        )
    if any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise OpenAIError(
            400,
            "invalid_request",
            f"stop: each sequence may have at most {MAX_STOP_STRING_CHARS} characters",
            param="stop",
        )
    return request


# ---------------------------------------------------------------- wire formats


def _finish_reason(reason: str) -> str:
    # "cancelled" only happens when the client left, so nobody reads it; OpenAI has
    # no such value.
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _OpenAIFramer(Framer):
    """What both OpenAI formats share: identity of the completion, error shape."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model

    def error_response(self, status: int, code: str, message: str) -> tuple[bytes, str]:
        return openai_error_body(status, code, message), "application/json"


class CompletionFramer(_OpenAIFramer):
    """Non-streaming: one ``chat.completion`` object, sent when generation is done
    (nothing goes out before, so any error is a proper HTTP error)."""

    media_type = "application/json"

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        super().__init__(completion_id, created, model)
        self._parts: list[str] = []

    def token(self, event: StreamEvent) -> bytes:
        self._parts.append(event.text)
        return b""

    def done(self, event: StreamEvent) -> bytes:
        completion = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self._parts), "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish_reason(event.finish_reason),
                }
            ],
            "usage": _usage(event.prompt_tokens, event.completion_tokens),
        }
        return json.dumps(completion, ensure_ascii=False).encode()


class ChunkFramer(_OpenAIFramer):
    """Streaming: ``data: <chat.completion.chunk>`` events, then ``data: [DONE]``.

    The first chunk carries the assistant role. An error after it is sent as
    ``data: {"error": {...}}`` (OpenAI's clients raise it) with no ``[DONE]``.
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(completion_id, created, model)
        self._include_usage = include_usage
        self._role_sent = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return self._event(chunk)

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def _role(self) -> bytes:
        if self._role_sent:
            return b""
        self._role_sent = True
        return self._chunk({"role": "assistant", "content": ""})

    def token(self, event: StreamEvent) -> bytes:
        return self._role() + self._chunk({"content": event.text})

    def done(self, event: StreamEvent) -> bytes:
        body = self._role() + self._chunk({}, _finish_reason(event.finish_reason))
        if self._include_usage:
            body += self._event(
                {
                    "id": self.completion_id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": _usage(event.prompt_tokens, event.completion_tokens),
                }
            )
        return body + b"data: [DONE]\n\n"

    def error(self, code: str, message: str, cursor: str = "") -> bytes | None:
        return b"data: " + openai_error_body(500, code, message) + b"\n\n"


# ---------------------------------------------------------------- the endpoints


class OpenAICompat:
    """The OpenAI-compatible endpoints over a process's shared :class:`GenerationService`.

    ``add_openai_routes(app, compat)`` adds them to an app; a user's own app may
    call the handlers from routes of its own instead.
    """

    def __init__(self, generation: GenerationService, settings: ApiSettings | None = None) -> None:
        self.generation = generation
        self.settings = settings or generation.settings
        self.created = int(time.time())

    async def chat_completions(self, request: Request, callback: Callback | None = None) -> Response:
        """Answer ``POST /v1/chat/completions``, streaming or not.

        ``callback(request, message)`` fires exactly once after the response ended,
        as for ``/chat_stream``; rejected requests get an error and no callback.
        """
        try:
            # The whole conversation comes with each request: a limit of its own, larger
            # than /chat_stream's MAX_BODY_BYTES.
            body = await read_body(request, self.settings.openai_max_body_bytes)
            completion = parse_completion_request(body)
            request_id = new_request_id()
            ticket = await self.generation.admit(request_id, request)
        except ApiError as error:
            metrics.count_refused(error.status)
            return openai_error_response(error)

        sent = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in completion.messages]
        # The operator's system prompt comes first, and a client's own system message
        # follows it, unless ALLOW_CLIENT_SYSTEM_PROMPT lets the client's replace it.
        client_replaces = self.settings.allow_client_system_prompt and any(m.role == "system" for m in sent)
        messages = list(sent)
        if self.settings.system_prompt and not client_replaces:
            messages.insert(0, ChatMessage("system", self.settings.system_prompt))
        model = completion.model or self.settings.model_name
        completion_id = f"chatcmpl-{request_id}"
        framer: Framer
        headers: list[tuple[bytes, bytes]] = []
        if completion.stream:
            include_usage = bool(completion.stream_options and completion.stream_options.include_usage)
            framer = ChunkFramer(completion_id, int(time.time()), model, include_usage)
            headers = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        else:
            framer = CompletionFramer(completion_id, int(time.time()), model)
        # The callback's view: the last user message is the input, what precedes it
        # the history (the client sent the whole conversation).
        last_user = max((i for i, m in enumerate(sent) if m.role == "user"), default=len(sent))
        return self.generation.respond(
            request,
            GenerationRequest(
                request_id,
                messages,
                completion.sampling(),
                user_input=sent[last_user].content if last_user < len(sent) else "",
                prior_turns=tuple(sent[:last_user]),
            ),
            ticket,
            framer=framer,
            # Headers go out with the first token, so that an error before it (queue
            # timeout, prompt too long) is still an HTTP status the client raises on.
            send_headers_early=False,
            headers=headers,
            callback=callback,
        )

    def model_card(self) -> dict[str, Any]:
        """The one model this service serves, as a ``model`` object."""
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "chatstream"}

    def models(self) -> Response:
        """``GET /v1/models``."""
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    def model(self, model_id: str) -> Response:
        """``GET /v1/models/{model_id}``: the model, or 404 for any other id."""
        if model_id != self.settings.model_name:
            return openai_error_response(
                OpenAIError(404, "model_not_found", f"the model {model_id!r} does not exist", param="model")
            )
        return JSONResponse(self.model_card())


def add_openai_routes(app: FastAPI, compat: OpenAICompat, callback: Callback | None = None) -> None:
    """Add the routes under ``/v1`` to ``app``: chat completions, models, and an
    OpenAI-shaped 404 for anything else there."""

    @app.post(OPENAI_PREFIX + "/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await compat.chat_completions(request, callback=callback)

    @app.get(OPENAI_PREFIX + "/models")
    async def models() -> Response:
        return compat.models()

    @app.get(OPENAI_PREFIX + "/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        return compat.model(model_id)

    @app.api_route(
        OPENAI_PREFIX + "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unknown(request: Request) -> Response:
        return openai_error_response(
            OpenAIError(404, "not_found", f"unknown route: {request.method} {request.url.path}")
        )
