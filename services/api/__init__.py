"""API pod: validates chat requests, enqueues generation jobs and relays token streams.

The public, reusable piece is :class:`services.api.chat_stream.ChatStream`.
"""

from services.api.chat_stream import ChatStream
from services.api.exchange import ChatExchange
from services.api.outcome import CallbackMessage

__all__ = ["CallbackMessage", "ChatExchange", "ChatStream"]
