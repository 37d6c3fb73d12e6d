"""How both services reach Redis: one place that builds every client, so that each
one follows a Sentinel failover and notices a dead connection the same way.

* With ``REDIS_SENTINELS`` the clients ask the sentinels for the primary of
  ``REDIS_SENTINEL_MASTER`` on every new connection, and drop a connection that
  finds a replica (the old primary, back after a failover): a failover is followed
  without a restart. ``REDIS_URL`` then gives only the database, user, password and
  TLS of the data connections.
* Every connection has TCP keepalive and ``TCP_USER_TIMEOUT``: a connection to a
  node that vanished (no FIN, no RST: a half-open connection) errors within about
  ``REDIS_KEEPALIVE_SECONDS`` + 3 s, whether it was idle or waiting for a reply.
* Ordinary commands have a read timeout (``REDIS_SOCKET_TIMEOUT_SECONDS``). Blocking
  reads time themselves (``services.api.stream_reader``: block time + this), and
  pub/sub listens in short polls (``services.common.pubsub``), since an idle channel
  is no fault.
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis as sync_redis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url

from services.common.contract import deserialize_job, serialize_job
from services.common.settings import CONNECT_TIMEOUT_SECONDS, CommonSettings

#: Keepalive probes, once they start, go this often, and this many unanswered ones
#: end the connection.
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_PROBES = 3

R = TypeVar("R", bound=Redis)


def keepalive_options(idle_seconds: float) -> dict[int, int]:
    """``socket_keepalive_options`` (Linux names where the platform has them)."""
    options: dict[int, int] = {}
    idle = max(1, round(idle_seconds))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        # Sent data unacknowledged this long also ends the connection: keepalive
        # only probes an idle one.
        ("TCP_USER_TIMEOUT", (idle + KEEPALIVE_INTERVAL_SECONDS * KEEPALIVE_PROBES) * 1000),
    ):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def connection_options(settings: CommonSettings) -> dict[str, Any]:
    """The options every data connection gets."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": settings.redis_socket_timeout_seconds,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(settings.redis_keepalive_seconds),
        "health_check_interval": 10,
    }


def _url_options(url: str) -> dict[str, Any]:
    """What REDIS_URL says besides the address (db, user, password, TLS), for the
    connections that find their address through the sentinels."""
    options = parse_url(url)
    out = {k: options[k] for k in ("db", "username", "password") if options.get(k) is not None}
    if urlsplit(url).scheme == "rediss":
        out["ssl"] = True
    return out


def _sentinel_options(settings: CommonSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": settings.redis_socket_timeout_seconds,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(settings.redis_keepalive_seconds),
    }
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        options["password"] = password
    return options


def connect(settings: CommonSettings, client_class: type[R] = Redis) -> R:  # type: ignore[assignment]
    """An asyncio client of the primary (through the sentinels when configured).
    Connections open lazily, so it can be created at import time."""
    options = connection_options(settings)
    if settings.redis_sentinels:
        sentinel = async_sentinel.Sentinel(
            settings.redis_sentinels, sentinel_kwargs=_sentinel_options(settings), **options
        )
        return sentinel.master_for(  # type: ignore[no-any-return]
            settings.redis_sentinel_master, redis_class=client_class, **_url_options(settings.redis_url)
        )
    return client_class.from_url(settings.redis_url, **options)  # type: ignore[no-any-return]


def connect_url(url: str, settings: CommonSettings) -> Redis:
    """An asyncio client of another Redis given by URL only (the session store's own,
    ``SESSIONS_REDIS_URL``), with the same connection options."""
    return Redis.from_url(url, **connection_options(settings))


def connect_arq(settings: CommonSettings) -> ArqRedis:
    """:func:`connect` that can also enqueue and run arq jobs; jobs are JSON, never pickle."""
    client = connect(settings, ArqRedis)
    client.job_serializer = serialize_job
    client.job_deserializer = deserialize_job
    return client


def connect_sync(settings: CommonSettings, timeout: float) -> sync_redis.Redis:
    """A blocking client with ``timeout`` on everything (the generator's probe)."""
    options = {**connection_options(settings), "socket_connect_timeout": timeout, "socket_timeout": timeout}
    if settings.redis_sentinels:
        sentinel_options = {**_sentinel_options(settings), "socket_connect_timeout": timeout, "socket_timeout": timeout}
        sentinel = sync_sentinel.Sentinel(settings.redis_sentinels, sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(settings.redis_sentinel_master, **_url_options(settings.redis_url))
    return sync_redis.Redis.from_url(settings.redis_url, **options)
