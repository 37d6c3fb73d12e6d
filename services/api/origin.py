"""Refusing cross-site requests to the routes a session cookie authenticates.

``/chat_stream`` and ``/clear_context`` act on the conversation of whoever's
cookie comes with the request, so another site must not be able to make a
visitor's browser send them (cross-site request forgery). Two checks, each
enough against today's browsers and together robust to older ones:

* the body must be declared JSON: a cross-site page can send a form or
  ``text/plain`` without asking, but a JSON ``Content-Type`` makes the browser ask
  first (a CORS preflight), which only origins in ``CORS_ALLOW_ORIGINS`` pass;
* ``Sec-Fetch-Site`` (or, without it, ``Origin``) must say the request comes from
  the API's own origin, or from an origin in that same allow-list.

Clients that are not browsers send neither header and are not affected.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from services.api.errors import ApiError


def is_json_content_type(value: str) -> bool:
    """``application/json`` or a ``+json`` type, with any parameters."""
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def check_same_origin(request: Request, allowed_origins: frozenset[str]) -> None:
    """Raise :class:`ApiError` 415 unless the request is declared JSON, and 403 when
    a browser says it comes from another site that ``allowed_origins`` does not
    name (``*``: any)."""
    if not is_json_content_type(request.headers.get("content-type", "")):
        raise ApiError(415, "unsupported_media_type", "send the request with Content-Type: application/json")
    origin = request.headers.get("origin")
    if origin is not None and ("*" in allowed_origins or origin in allowed_origins):
        return
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        same = fetch_site in ("same-origin", "none")  # "none": the user typed it or used a bookmark
    elif origin is not None:
        same = origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")
    else:
        return
    if not same:
        raise ApiError(
            403,
            "cross_site_request",
            "this route is not available to other sites; list their origin in CORS_ALLOW_ORIGINS to allow it",
        )
