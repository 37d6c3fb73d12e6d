"""Listening to a Redis pub/sub channel for as long as a process lives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

logger = logging.getLogger(__name__)

#: Longest wait for a message in one read.
POLL_SECONDS = 1.0


async def listen_forever(redis: Redis, channel: str, on_message: Callable[[], Awaitable[None]]) -> None:
    """Await ``on_message()`` for every message on ``channel`` until cancelled.

    Used only for wake-ups that have a polling fallback, so a lost subscription
    (Redis restarting, say) is logged and retried, never fatal.
    """
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            while True:
                # Short polls, not listen(): an idle channel is no fault, and each
                # poll's read honours a timeout (keepalive finds a dead connection).
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_SECONDS)
                if message is not None:
                    await on_message()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("subscription to %s lost; relying on polling until it is back", channel, exc_info=True)
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
