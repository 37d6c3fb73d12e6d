"""Network partitions for real: a generator in a network namespace whose link to
Redis drops every packet without closing a socket (``tests/support/netns.py``).
Nothing errors by itself there: only timeouts, keepalive and leases can notice."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from services.common.contract import stream_key
from services.common.semaphore import GENERATIONS
from tests.conftest import Stack, synthetic_generator_env
from tests.support import netns
from tests.support.client import stream_chat
from tests.support.processes import Generator, RedisServer, eventually

pytestmark = pytest.mark.skipif(bool(netns.available()), reason=netns.available() or "available")

#: Short timeouts, so that the test takes seconds (the defaults are in docs/configuration.md).
QUICK = {"REDIS_SOCKET_TIMEOUT_SECONDS": "1", "REDIS_RETRY_SECONDS": "2", "REDIS_KEEPALIVE_SECONDS": "1"}


@pytest.fixture
def cut_off(workdir):
    namespace = netns.Namespace(0)
    server = RedisServer(workdir, args=("--bind", "127.0.0.1", namespace.host_ip, "--protected-mode", "no"))
    yield namespace, server
    namespace.heal()
    server.close()
    namespace.close()


async def test_a_generator_cut_off_from_redis_loses_its_stream_within_the_silence_limit_and_serves_again(cut_off, workdir, request):
    namespace, server = cut_off
    stack = Stack(server, workdir, request.node.name[:40])
    try:
        env = stack.env(
            {
                **synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="100"),
                **QUICK,
                "REDIS_URL": f"redis://{namespace.host_ip}:{server.port}/0",
            }
        )
        generator = Generator(f"{stack.name}-gen", env, workdir, server.client, prefix=namespace.prefix)
        stack.services.append(generator)
        api = stack.api({**QUICK, "LEASE_SECONDS": "3"})
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
            open_stream = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "cut off"}, sse=True))
            await eventually(lambda: "started" in generator.log(), 10, "the stream to start")
            await asyncio.sleep(0.5)
            namespace.cut()
            cut_at = time.monotonic()
            reply = await asyncio.wait_for(open_stream, 15)
            detected = time.monotonic() - cut_at
            name, data = reply.sse_events()[-1]
            # The API hears nothing from the generator: GENERATOR_SILENCE_SECONDS (2.5 s).
            assert name == "error" and data["code"] == "generator_lost", reply.sse_events()[-3:]
            assert detected < 4.5, detected
            # The permit comes back (taken from the lost generator: fencing makes that safe).
            await eventually(lambda: server.client.zcard(GENERATIONS.holders) == 0, 5, "the permit back")
            entries = server.client.xlen(stream_key(reply.request_id))

            await asyncio.sleep(1.0)
            namespace.heal()
            healed_at = time.monotonic()
            # The cut-off generation writes nothing more: its permit is someone else's now.
            await asyncio.sleep(3.0)
            assert server.client.xlen(stream_key(reply.request_id)) == entries
            # And the same generator process serves again, without a restart.
            after = await asyncio.wait_for(stream_chat(client, "/chat_stream", {"user_input": "healed"}, sse=True), 30)
            served = time.monotonic() - healed_at
        assert after.sse_events()[-1][0] == "done", after.sse_events()[-3:]
        assert generator.alive()
        print(f"partition noticed after {detected:.2f}s; a request after the heal done {served:.2f}s after it")
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()

