"""The API key a request presents (``Authorization: Bearer <key>``): what the key
check (``auth``), the tenants (``tenants``) and the owner of a resumable request
(``resume``) are decided by."""

from __future__ import annotations

from starlette.types import Scope


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
