"""Conversation history in Redis, identified by a signed session cookie.

Every API pod reads the same Redis, so a conversation continues on whichever
pod the next request lands on. The cookie carries only a random id, signed
(HMAC-SHA-256 with a timestamp) so that a client cannot forge or guess another
client's session, and a cookie older than the session's TTL is refused by the
server whatever the browser keeps. Sessions may live in a Redis of their own
(``SESSION_REDIS_URL``), whose memory limit and eviction never touch admission
or the token streams.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import NamedTuple

from itsdangerous import BadSignature, TimestampSigner
from redis.asyncio import Redis
from starlette.requests import Request

from services.common.contract import ChatMessage, session_key

#: Stored turns per session; older ones are trimmed (only the most recent are sent
#: to the model anyway). HISTORY_MAX_BYTES bounds the same list in bytes.
MAX_STORED_TURNS = 200

# KEYS: the session list; ARGV: the new turn (JSON), max turns, max bytes, TTL (s),
# and "1" to replace the last turn instead of appending. One script, so that the
# trim sees exactly the list it bounds. The newest turn is always kept: its size
# is already bounded by MAX_INPUT_CHARS and the generator's token limit.
_RECORD_TURN = """
if ARGV[5] == '1' then
  if redis.call('LLEN', KEYS[1]) == 0 then return 0 end
  redis.call('LSET', KEYS[1], -1, ARGV[1])
else
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
local turns = redis.call('LRANGE', KEYS[1], 0, -1)
local total = 0
for _, turn in ipairs(turns) do total = total + #turn end
local dropped = 0
local max_bytes = tonumber(ARGV[3])
while total > max_bytes and dropped < #turns - 1 do
  dropped = dropped + 1
  total = total - #turns[dropped]
end
if dropped > 0 then redis.call('LTRIM', KEYS[1], dropped, -1) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return dropped
"""


class Turn(NamedTuple):
    """One exchange: the user's message and the assistant's reply; a pair, so
    ``user, assistant = turn`` works (the callback's ``request.state.chat.history``)."""

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

    def __init__(
        self,
        redis: Redis,
        secrets_newest_first: list[str],
        cookie_name: str,
        ttl_seconds: int,
        *,
        max_bytes: int,
        always_secure: bool = False,
    ) -> None:
        self._redis = redis
        # itsdangerous verifies with every key and signs with the last one.
        self._signer = TimestampSigner(
            list(reversed(secrets_newest_first)),
            salt="chatstream-session",
            key_derivation="hmac",
            digest_method=hashlib.sha256,
        )
        self.cookie_name = cookie_name
        self._ttl = ttl_seconds
        self._max_bytes = max_bytes
        self._always_secure = always_secure
        self._record = redis.register_script(_RECORD_TURN)

    @property
    def redis(self) -> Redis:
        """The Redis the sessions live in."""
        return self._redis

    def session_id(self, request: Request) -> tuple[str, bool]:
        """The request's session id and whether it is new (no valid cookie: none,
        a forged or foreign signature, or one older than the session's TTL)."""
        raw = request.cookies.get(self.cookie_name)
        if raw:
            try:
                return self._signer.unsign(raw, max_age=self._ttl).decode(), False
            except BadSignature:  # SignatureExpired is one
                pass
        return secrets.token_urlsafe(24), True

    def set_cookie_header(self, session_id: str, request: Request) -> str:
        """The ``Set-Cookie`` value for a session, freshly timestamped: sent with
        every reply, so a session in use never expires and an idle one does.

        ``Secure`` when the request came over HTTPS, and always in production or
        with SESSION_COOKIE_SECURE (behind a TLS-terminating ingress the scheme
        the app sees is ``http``)."""
        value = self._signer.sign(session_id).decode()
        attrs = [f"{self.cookie_name}={value}", "Path=/", "HttpOnly", "SameSite=Lax", f"Max-Age={self._ttl}"]
        if self._always_secure or request.url.scheme == "https":
            attrs.append("Secure")
        return "; ".join(attrs)

    async def history(self, session_id: str, last: int) -> list[Turn]:
        """The ``last`` most recent turns, oldest first."""
        if last <= 0:
            return []
        raw = await self._redis.lrange(session_key(session_id), -last, -1)
        return [Turn.from_json(r) for r in raw]

    async def append(self, session_id: str, turn: Turn) -> None:
        """Record a finished exchange, dropping the oldest ones beyond the limits."""
        await self._write(session_id, turn, replace=False)

    async def replace_last(self, session_id: str, turn: Turn) -> None:
        """Replace the last exchange (after a regenerate)."""
        await self._write(session_id, turn, replace=True)

    async def _write(self, session_id: str, turn: Turn, *, replace: bool) -> None:
        await self._record(
            keys=[session_key(session_id)],
            args=[turn.to_json(), MAX_STORED_TURNS, self._max_bytes, self._ttl, "1" if replace else "0"],
        )

    async def clear(self, session_id: str) -> None:
        """Forget the whole conversation."""
        await self._redis.delete(session_key(session_id))
