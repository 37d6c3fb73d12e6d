"""The finished exchange, as a user's callback sees it in ``request.state.chat``.

ChatStream's callback reads the conversation from its in-process session to act
on the finished exchange (store it, bill it, log it). Ours lives in Redis and in
a generator pod, so the API hands the callback what happened instead: one frozen
:class:`ChatExchange` per request, set just before ``callback(request, message)``.

    async def store(request, message):
        chat = request.state.chat
        await db.save(chat.session_id, chat.user_input, chat.reply, chat.usage.completion_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from services.api.sessions import Turn
from services.common.contract import ChatMessage


@dataclass(frozen=True)
class Usage:
    """Tokens of the exchange. ``prompt_tokens`` is ``None`` when the generation did
    not finish (the generator reports it at the end); ``completion_tokens`` is then
    the tokens the client was sent."""

    prompt_tokens: int | None
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds, measured by the API pod from the moment it accepted the request.
    ``None`` for a stage the request never reached."""

    queue_wait: float | None
    time_to_first_token: float | None
    total: float


#: ``/chat_stream``'s history is (user, assistant) pairs; the OpenAI routes' is the
#: request's own messages.
History = Union[tuple[Turn, ...], tuple[ChatMessage, ...]]


@dataclass(frozen=True)
class ChatExchange:
    """What one request asked and got, whatever its outcome.

    * ``reply``: exactly the text the client was sent (the whole reply on
      ``success``; what had gone out before a disconnect or an error).
    * ``finish_reason``: ``stop`` or ``length`` from the generator, ``cancelled``
      when the client left, ``error`` with ``error`` set to the code the client got.
    * ``history``: for ``/chat_stream`` the session's turns before this one that
      were sent to the generator (at most ``HISTORY_MAX_TURNS``), and
      ``history_turns_used`` how many of the newest the prompt kept (``None``
      when the generation did not finish); for the OpenAI routes the request's
      messages before its last user message, and ``history_turns_used`` ``None``.
    * ``regenerate``: the request replaced the session's last reply.
    """

    request_id: str
    session_id: str | None
    user_input: str
    reply: str
    finish_reason: str
    usage: Usage
    history: History
    history_turns_used: int | None
    regenerate: bool
    timings: Timings
    error: str | None = None
