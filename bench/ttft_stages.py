"""Time to first token split into its stages, from Redis ``MONITOR`` (one clock for
every process: client, API, generator), at low load (one request at a time).

Stages per request: client sent → the API's first command (HTTP, routing); → the
job's wake-up (session, admission, registration, enqueue); → the generator's
``start`` entry (wake-up, claim); → its first token (the synthetic engine's token
interval); → the client has the token (reader, framing, HTTP). ``MONITOR`` slows
Redis a little, the same for every tree, so compare runs, not absolute figures.

    .venv/bin/python bench/ttft_stages.py --out /tmp/a.json                # this tree
    (cd OTHER_TREE && .venv/bin/python /path/to/bench/ttft_stages.py --out /tmp/b.json)
    .venv/bin/python bench/ttft_stages.py --compare /tmp/b.json /tmp/a.json  # medians side by side

Run inside the tree to measure (its ``services`` are started): that is how the
low-load regression of issue 15 was found (``bench/results/issue15-ab``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path.cwd()
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import redis  # noqa: E402

STAGES = ("to_api", "api_to_wake", "wake_to_start", "start_to_token", "token_to_client", "total")


def measure(out: Path, requests: int) -> None:
    from bench.relay_bench import Target
    from services.common.contract import GENERATORS_KEY
    from tests.support.processes import RedisServer, wait_until

    workdir = REPO / ".run" / "stages"
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir)
    env = {"REDIS_URL": server.url, "LOG_LEVEL": "WARNING", "OTEL_TRACES_EXPORTER": "none",
           "MAX_CONCURRENT_GENERATIONS": "5000", "MAX_QUEUE_SIZE": "5000", "GENERATOR_BACKEND": "synthetic",
           "SYNTHETIC_TOKENS_PER_SECOND": "20", "MAX_NEW_TOKENS": "5", "GENERATOR_SLOTS": "2000",
           "RESUME_GRACE_SECONDS": "0"}
    gen = subprocess.Popen([sys.executable, "-m", "services.generator"], cwd=REPO,
                           env={**os.environ, **env, "WORKER_ID": "stages-gen"},
                           stdout=open(workdir / "generator.log", "wb"), stderr=subprocess.STDOUT)
    wait_until(lambda: server.client.zcard(GENERATORS_KEY) >= 1, 60, "the generator to register")
    api = Target("mux", [sys.executable, "-m", "uvicorn", "--factory", "--no-access-log", "bench.apps:create"],
                 {**env, "BENCH_APP": "mux"}, workdir)
    lines: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def monitor() -> None:
        with redis.Redis.from_url(server.url).monitor() as m:
            for cmd in m.listen():
                lines.append((cmd["time"], str(cmd["client_address"]), cmd["command"]))
                if stop.is_set():
                    return

    threading.Thread(target=monitor, daemon=True).start()
    time.sleep(0.5)
    reqs = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(requests + 3):  # 3 warm-up requests
                sent = time.time()
                first = None
                async with client.stream("POST", api.url, json={"user_input": "a b c d e"}) as r:
                    rid = r.headers.get("x-request-id")
                    async for _ in r.aiter_text():
                        first = first or time.time()
                if i >= 3:
                    reqs.append({"rid": rid, "sent": sent, "first": first})
                await asyncio.sleep(0.3)

    try:
        asyncio.run(run())
        time.sleep(0.5)
        stop.set()
        server.client.ping()  # one more command, so the monitor thread sees stop
    finally:
        api.stop()
        gen.terminate()
        gen.wait(20)
        server.stop()
    out.write_text(json.dumps({"requests": reqs, "monitor": lines}))
    print(json.dumps(medians(out), indent=1))


def medians(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    mon = data["monitor"]
    found: dict[str, list[float]] = {k: [] for k in STAGES}
    for r in data["requests"]:
        rid, lo, hi = r["rid"], r["sent"], r["first"]
        ev = [(t, cmd) for t, c, cmd in mon if lo - 0.001 <= t <= hi + 0.003 and (c != "lua" or cmd.startswith("PUBLISH"))]
        first_api = min(t for t, cmd in ev if "session" in cmd)
        wake = next(t for t, cmd in ev if cmd.startswith("PUBLISH") and rid in cmd)
        start = next(t for t, cmd in ev if cmd.startswith("XADD chatstream:stream:" + rid))
        token = next(t for t, cmd in ev if cmd.startswith("EVALSHA") and ("stream:" + rid) in cmd and t > start)
        for name, value in zip(STAGES, (first_api - lo, wake - first_api, start - wake, token - start, hi - token, hi - lo)):
            found[name].append(value)
    return {k: round(statistics.median(v) * 1000, 3) for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="measure this tree; write the raw timeline here")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        a, b = (medians(p) for p in args.compare)
        print("| stage (median ms) | before | after | change |\n| --- | --- | --- | --- |")
        for k in STAGES:
            print(f"| {k} | {a[k]:.2f} | {b[k]:.2f} | {b[k] - a[k]:+.2f} |")
    elif args.out:
        measure(args.out, args.requests)
    else:
        parser.error("--out or --compare")


if __name__ == "__main__":
    main()
