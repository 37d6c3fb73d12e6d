"""``python -m services.generator.probe``: is this generator registered and alive?

Kubernetes runs it as the generator pod's exec probe. A worker renews its entry in
the :data:`~services.common.contract.GENERATORS_KEY` sorted set (scored by the Redis
time at which it expires) only after its model is loaded and while its event loop
runs, so "registered and unexpired" means "up and able to take jobs".

Exit status: 0 alive; 1 not registered or expired; 2 Redis unreachable (0 instead
with ``--liveness``: restarting a generator, and reloading its model, cannot fix Redis).
"""

from __future__ import annotations

import argparse
import os
import sys

import redis
from redis.exceptions import RedisError

from services.common.contract import GENERATORS_KEY
from services.common.redis_client import connect_sync
from services.generator.settings import GeneratorSettings

ALIVE, NOT_REGISTERED, REDIS_UNREACHABLE = 0, 1, 2


def registration_expires_in(client: redis.Redis, worker_id: str) -> float | None:
    """Seconds until ``worker_id``'s registration expires (negative when it already has),
    by Redis's own clock; ``None`` when it is not registered at all."""
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zscore(GENERATORS_KEY, worker_id)
        (seconds, micros), score = pipe.execute()
    if score is None:
        return None
    return float(score) - (seconds + micros / 1e6)


def check(settings: GeneratorSettings, *, liveness: bool = False, timeout: float = 3.0) -> tuple[int, str]:
    """The probe's exit status and a one-line reason, for the worker ``settings`` describe."""
    client = connect_sync(settings, timeout)
    try:
        remaining = registration_expires_in(client, settings.worker_id)
    except (RedisError, OSError) as exc:
        status = ALIVE if liveness else REDIS_UNREACHABLE
        return status, f"redis unreachable ({exc}); {'assuming alive' if liveness else 'not ready'}"
    finally:
        client.close()
    if remaining is None:
        return NOT_REGISTERED, f"generator {settings.worker_id!r} is not registered"
    if remaining <= 0:
        return NOT_REGISTERED, f"registration of {settings.worker_id!r} expired {-remaining:.1f}s ago"
    return ALIVE, f"generator {settings.worker_id!r} registered, expires in {remaining:.1f}s"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, check, print the reason; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m services.generator.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--liveness", action="store_true", help="treat an unreachable Redis as alive (exit 0) instead of exit 2"
    )
    args = parser.parse_args(argv)
    if not os.environ.get("WORKER_ID"):
        # The default worker id contains the process id, so a probe process would check a name nobody uses.
        print("WORKER_ID is not set: the probe must check the same name the worker registers", file=sys.stderr)
        return NOT_REGISTERED
    status, reason = check(GeneratorSettings(), liveness=args.liveness)
    print(reason, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
