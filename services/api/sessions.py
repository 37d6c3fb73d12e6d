"""Conversation history in Redis, identified by a signed session cookie.

Every API pod reads the same Redis, so a conversation continues on whichever
pod the next request lands on. The cookie carries only a random id, signed so
that a client cannot forge or guess another client's session.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, Signer
from redis.asyncio import Redis
from starlette.requests import Request

from services.common.contract import ChatMessage, session_key

#: Stored turns per session; older ones are trimmed (only the most recent are sent
#: to the model anyway).
MAX_STORED_TURNS = 200


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message and the assistant's reply."""

    user: str
    assistant: str

    def to_json(self) -> str:
        """Stored form."""
        return json.dumps({"user": self.user, "assistant": self.assistant}, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Turn:
        """Inverse of :meth:`to_json`."""
        data = json.loads(raw)
        return cls(user=data["user"], assistant=data["assistant"])


def turns_to_messages(turns: list[Turn], system_prompt: str = "") -> list[ChatMessage]:
    """Chat-template messages for a history."""
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    for turn in turns:
        messages.append(ChatMessage("user", turn.user))
        messages.append(ChatMessage("assistant", turn.assistant))
    return messages


class SessionStore:
    """Reads and writes histories; signs and verifies session ids."""

    def __init__(self, redis: Redis, secret: str, cookie_name: str, ttl_seconds: int) -> None:
        self._redis = redis
        self._signer = Signer(secret, salt="chatstream-session")
        self.cookie_name = cookie_name
        self._ttl = ttl_seconds

    def session_id(self, request: Request) -> tuple[str, bool]:
        """The request's session id and whether it is new (no valid cookie)."""
        raw = request.cookies.get(self.cookie_name)
        if raw:
            try:
                return self._signer.unsign(raw).decode(), False
            except BadSignature:
                pass
        return secrets.token_urlsafe(24), True

    def set_cookie_header(self, session_id: str, secure: bool) -> str:
        """The ``Set-Cookie`` value for a session."""
        value = self._signer.sign(session_id).decode()
        attrs = [f"{self.cookie_name}={value}", "Path=/", "HttpOnly", "SameSite=Lax", f"Max-Age={self._ttl}"]
        if secure:
            attrs.append("Secure")
        return "; ".join(attrs)

    async def history(self, session_id: str, last: int) -> list[Turn]:
        """The ``last`` most recent turns, oldest first."""
        if last <= 0:
            return []
        raw = await self._redis.lrange(session_key(session_id), -last, -1)
        return [Turn.from_json(r) for r in raw]

    async def append(self, session_id: str, turn: Turn) -> None:
        """Record a finished exchange."""
        key = session_key(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, turn.to_json())
            pipe.ltrim(key, -MAX_STORED_TURNS, -1)
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def replace_last(self, session_id: str, turn: Turn) -> None:
        """Replace the last exchange (after a regenerate)."""
        key = session_key(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lset(key, -1, turn.to_json())
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def clear(self, session_id: str) -> None:
        """Forget the whole conversation."""
        await self._redis.delete(session_key(session_id))
