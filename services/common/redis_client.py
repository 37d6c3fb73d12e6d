"""How both services reach Redis."""

from __future__ import annotations

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import Redis

from services.common.contract import deserialize_job, serialize_job


def arq_redis_from_url(url: str) -> ArqRedis:
    """An asyncio Redis client for ``url`` that can also enqueue arq jobs.

    Connections open lazily, so it can be created at import time. The connect
    timeout is bounded so that a Redis that is down surfaces as an error within
    seconds instead of hanging a request.
    """
    redis = ArqRedis.from_url(url, socket_connect_timeout=2.0, health_check_interval=10)
    # from_url passes no arguments to ArqRedis itself; jobs are JSON, never pickle.
    redis.job_serializer = serialize_job
    redis.job_deserializer = deserialize_job
    return redis


def redis_from_url(url: str) -> Redis:
    """A plain asyncio Redis client for ``url`` (say, the session store), with the
    same bounded connect timeout as :func:`arq_redis_from_url`."""
    return Redis.from_url(url, socket_connect_timeout=2.0, health_check_interval=10)


def arq_settings_from_url(url: str) -> RedisSettings:
    """arq's connection settings for the same ``url``."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 1
    return settings
