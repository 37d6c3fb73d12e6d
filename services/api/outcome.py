"""How a request ended, and the user's callback that hears about it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Union

from starlette.requests import Request

logger = logging.getLogger(__name__)


class CallbackMessage(str, Enum):
    """The message passed to ``callback(request, message)``: exactly one per request.

    It is a ``str`` subclass, so ChatStream-style comparisons with plain strings
    (``message == "success"``) keep working.
    """

    SUCCESS = "success"
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"

    def __str__(self) -> str:
        return self.value


Callback = Callable[[Request, CallbackMessage], Union[None, Awaitable[None]]]


async def invoke_callback(callback: Callback | None, request: Request, message: CallbackMessage) -> None:
    """Call a sync or async callback; its failure is logged, never raised into the
    server (the response has already ended)."""
    if callback is None:
        return
    try:
        result = callback(request, message)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("the chat_stream callback raised for message %s", message.value)
