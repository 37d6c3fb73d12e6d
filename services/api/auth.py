"""Who may use the API: optional API keys, checked by an ASGI middleware.

With no key configured (``API_KEYS`` and ``API_KEYS_FILE`` empty) everyone may.
With keys, every request needs ``Authorization: Bearer <key>``, except the
public paths: health, readiness, metrics (scraped from inside the cluster) and
the web page's static files (the page itself asks for a key and sends it).
A missing or wrong key gets 401 with the same body either way; on ``/v1``
routes in OpenAI's error shape, so OpenAI clients raise ``AuthenticationError``.

Keys are compared in constant time (``hmac.compare_digest`` over SHA-256
digests, against every key, so neither the position nor the length of a match
shows in the timing). They are never logged; :func:`trace_sanitized_headers`
keeps OpenTelemetry from recording them even when header capture is turned on.

Use in your own app::

    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys.from_settings(settings), tenants=chat_stream.generation.tenants)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.bearer import bearer_token
from services.api.openai_compat import OPENAI_PREFIX, openai_error_body
from services.api.settings import ApiSettings
from services.api.tenants import Tenants

logger = logging.getLogger(__name__)

#: Paths that never need a key: probes, metrics, and the web page's own files.
PUBLIC_PATHS = frozenset({"/healthz", "/acceptingz", "/readyz", "/metrics", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)

#: Request headers that carry credentials; OpenTelemetry redacts them if told to capture headers.
SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")

_UNAUTHORIZED_MESSAGE = "a valid API key is required: send it as `Authorization: Bearer <key>`"


class ApiKeysError(ValueError):
    """The configured key file cannot be read."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_keys(text: str, separator: str) -> list[str]:
    keys = []
    for item in text.split(separator):
        item = item.strip()
        if item and not item.startswith("#"):
            keys.append(item)
    return keys


class ApiKeys:
    """The accepted keys: fixed ones, plus those of a file (one per line, ``#``
    comments allowed) that is re-read whenever it changes, so a rotated Kubernetes
    Secret takes effect without a restart."""

    def __init__(self, keys: Iterable[str] = (), file: str | Path | None = None) -> None:
        self._fixed = [_digest(k) for k in keys if k]
        self._file = Path(file) if file else None
        self._file_stamp: tuple[int, int] | None = None
        self._file_keys: list[bytes] = []
        if self._file is not None:
            try:
                self._reload(os.stat(self._file))
            except OSError as exc:
                raise ApiKeysError(f"API_KEYS_FILE {str(self._file)!r} cannot be read: {exc.strerror}") from None
            if not self._fixed and not self._file_keys:
                logger.warning("API_KEYS_FILE %s holds no key: every protected request will get 401", self._file)

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ApiKeys:
        """Keys from ``API_KEYS`` (comma-separated) and ``API_KEYS_FILE``."""
        return cls(_parse_keys(settings.api_keys.get_secret_value(), ","), settings.api_keys_file or None)

    @property
    def enabled(self) -> bool:
        """True when requests need a key (some key, or a key file, is configured)."""
        return bool(self._fixed) or self._file is not None

    def _reload(self, stat: os.stat_result) -> None:
        assert self._file is not None
        self._file_keys = [_digest(k) for k in _parse_keys(self._file.read_text(), "\n")]
        self._file_stamp = (stat.st_mtime_ns, stat.st_ino)

    def _current(self) -> list[bytes]:
        if self._file is not None:
            try:
                stat = os.stat(self._file)
                if (stat.st_mtime_ns, stat.st_ino) != self._file_stamp:
                    self._reload(stat)
            except OSError as exc:
                # Keep the last keys read: a Secret being swapped may vanish for a moment.
                logger.warning("re-reading API_KEYS_FILE failed (%s); keeping the previous keys", exc.strerror)
        return self._fixed + self._file_keys

    def verify(self, presented: str) -> bool:
        """True when ``presented`` is one of the keys; constant time in which one."""
        candidate = _digest(presented)
        found = False
        for key in self._current():
            found |= hmac.compare_digest(candidate, key)
        return found


def is_public(path: str) -> bool:
    """Paths served without a key."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class ApiKeyMiddleware:
    """ASGI middleware: 401 for requests without a valid key, unless the path is public.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``), so streaming responses
    and disconnect detection pass through untouched.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys, tenants: Tenants | None = None) -> None:
        self.app = app
        self.keys = keys
        self.tenants = tenants or Tenants()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A tenant's keys are API keys too; once any key exists, a request without
        # one could otherwise escape its tenant's caps as `default`.
        if scope["type"] != "http" or is_public(scope["path"]) or not (self.keys.enabled or self.tenants.has_keys):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and (self.keys.verify(token) or self.tenants.knows(token)):
            await self.app(scope, receive, send)
            return
        await _unauthorized(scope["path"], send)


async def _unauthorized(path: str, send: Send) -> None:
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        body = openai_error_body(401, "invalid_api_key", _UNAUTHORIZED_MESSAGE)
    else:
        body = json.dumps({"error": "unauthorized", "message": _UNAUTHORIZED_MESSAGE}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def trace_sanitized_headers() -> list[str]:
    """Header names OpenTelemetry must redact: those set in
    ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS`` plus the ones that
    carry credentials. (Headers are not captured at all unless
    ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST`` asks for them.)"""
    configured = os.environ.get("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "")
    names = [n.strip() for n in configured.split(",") if n.strip()]
    return names + [h for h in SENSITIVE_HEADERS if h not in names]
