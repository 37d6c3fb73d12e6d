"""Resume benchmark: what resuming a stream costs the next token (issue 15's target:
≤ 5 ms p50 against an uninterrupted stream).

One API pod, redis-server and a synthetic generator at ``--rate`` tokens/s, on
loopback. Each of ``--streams`` SSE requests (``--concurrency`` at a time) is read
for ``--drop-after`` tokens; then the client drops the connection, waits
``--pause`` seconds (so that the next entries are already in Redis), and resumes
with ``GET /chat_stream/{id}`` and ``Last-Event-ID`` on a new connection. Recorded
per stream, in the same run:

* ``resume_first_event``: from sending the resume request to its first token
  event, i.e. the delay a resumed client adds on top of what it already missed
  (a new connection, the owner check, the readers key, the read from the cursor);
* ``delivery``: for the tokens of the same streams before the drop, from the entry's
  write (its Redis Stream id is Redis's clock in ms, the same machine's) to its
  arrival: what an uninterrupted stream waits for a token that is there;
* ``gap``: the ordinary inter-token gap before the drop;
* ``resume_connect`` (the client's new TCP connection) and ``server_headers`` /
  ``server_first_event`` (from the resume reaching the API app to its headers and
  first token event, noted by ``bench.apps:timed``): where the time goes.

"Resume adds" = ``resume_first_event`` p50 − ``delivery`` p50: how much later than
on an uninterrupted stream a resumed client gets a token that is waiting for it.

Writes ``bench/results/<--name>.json`` and ``.md``.

    .venv/bin/python bench/resume_latency.py        # 20 at a time: resume.md, ~1 minute
    .venv/bin/python bench/resume_latency.py --streams 30 --concurrency 1 --name resume-one-stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import ssl
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.support.processes import ApiServer, Generator, RedisServer  # noqa: E402

SSE = {"accept": "text/event-stream"}


def _events(buffer: str) -> tuple[list[tuple[str, str]], str]:
    """Complete SSE blocks of ``buffer`` as (event name, id), and the rest."""
    *blocks, rest = buffer.split("\n\n")
    out = []
    for block in blocks:
        name = event_id = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("id: "):
                event_id = line[4:]
        if name:
            out.append((name, event_id))
    return out, rest


#: One TLS context for every client: building one (what httpx does per client
#: otherwise) takes ~30 ms of CPU here, a stall every other stream's clock would see.
_TLS = ssl.create_default_context()


async def one_stream(base_url: str, args: argparse.Namespace) -> dict[str, float]:
    # A client per stream: its own session cookie, as separate users have.
    async with httpx.AsyncClient(base_url=base_url, timeout=30, verify=_TLS) as client:
        last_at = 0.0
        gaps: list[float] = []
        delivery: list[float] = []
        seen, last_id, request_id = 0, "", ""
        async with client.stream("POST", "/chat_stream", json={"user_input": "a b c d"}, headers=SSE) as response:
            request_id = response.headers["x-request-id"]
            buffer = ""
            async for chunk in response.aiter_text():
                buffer += chunk
                events, buffer = _events(buffer)
                for name, event_id in events:
                    if name != "token":
                        continue
                    now = time.perf_counter()
                    delivery.append(time.time() - int(event_id.split("-")[0]) / 1000)
                    if seen:
                        gaps.append(now - last_at)
                    last_at, last_id, seen = now, event_id, seen + 1
                if seen >= args.drop_after:
                    break  # the connection drops here
        await asyncio.sleep(args.pause)
        resume_sent = time.perf_counter()
        resumed_at = connected_at = 0.0

        async def trace(name: str, info: dict) -> None:
            nonlocal connected_at
            if name == "connection.connect_tcp.complete":
                connected_at = time.perf_counter()

        async with client.stream(
            "GET", f"/chat_stream/{request_id}", headers={**SSE, "last-event-id": last_id},
            extensions={"trace": trace},
        ) as response:
            assert response.status_code == 200, response.status_code
            resume_headers = time.perf_counter() - resume_sent
            buffer = ""
            async for chunk in response.aiter_text():
                buffer += chunk
                events, buffer = _events(buffer)
                if any(name == "token" for name, _ in events):
                    resumed_at = time.perf_counter()
                    break
        return {
            "resume_first_event": resumed_at - resume_sent,
            "resume_headers": resume_headers,
            # The client's new TCP connection (a dropped one is gone): in the two above.
            "resume_connect": connected_at - resume_sent if connected_at else 0.0,
            "delivery": statistics.median(delivery),
            "gap": statistics.median(gaps),
        }


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": statistics.median(values) * 1000,
        "p90_ms": values[int(0.9 * (len(values) - 1))] * 1000,
        "p99_ms": values[int(0.99 * (len(values) - 1))] * 1000,
    }


async def run(base_url: str, args: argparse.Namespace) -> list[dict[str, float]]:
    limit = asyncio.Semaphore(args.concurrency)

    async def bounded() -> dict[str, float]:
        async with limit:
            return await one_stream(base_url, args)

    await one_stream(base_url, args)  # warm-up (imports, pools)
    return await asyncio.gather(*(bounded() for _ in range(args.streams)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream")
    parser.add_argument("--drop-after", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between the drop and the resume")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="resume", help="results file name, without extension")
    args = parser.parse_args()

    workdir = REPO / ".cache" / "bench-resume"
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir)
    env = {"REDIS_URL": server.url, "LOG_LEVEL": "WARNING", "OTEL_TRACES_EXPORTER": "none"}
    generator = Generator(
        "bench-gen",
        {**env, "GENERATOR_BACKEND": "synthetic", "SYNTHETIC_TOKENS_PER_SECOND": str(args.rate),
         "MAX_NEW_TOKENS": "200", "GENERATOR_SLOTS": str(args.concurrency + 1)},
        workdir,
        server.client,
    )
    timings = workdir / "server-timings.txt"
    timings.unlink(missing_ok=True)
    api = ApiServer(
        "bench-api",
        {**env, "MAX_CONCURRENT_GENERATIONS": str(args.concurrency + 1), "BENCH_TIMINGS_FILE": str(timings)},
        workdir,
        app="bench.apps:timed",
        factory=True,
    )
    try:
        rows = asyncio.run(run(api.base_url, args))
    finally:
        api.stop()
        generator.stop()
        server.close()
    # The API's own share, from the app's side (the warm-up's resume is the first line).
    server_rows = [line.split() for line in timings.read_text().splitlines()[1:]]
    result = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **{key: quantiles([row[key] for row in rows]) for key in rows[0]},
        "server_headers": quantiles([float(h) / 1000 for h, _ in server_rows]),
        "server_first_event": quantiles([float(t) / 1000 for _, t in server_rows]),
    }
    added = result["resume_first_event"]["p50_ms"] - result["delivery"]["p50_ms"]
    result["resume_added_p50_ms"] = added
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Resume latency",
        "",
        f"{args.streams} streams, {args.concurrency} at a time, {args.rate:g} tokens/s, dropped after "
        f"{args.drop_after} tokens, resumed {args.pause:g} s later on a new connection ({result['machine']}).",
        "",
        "| measure | p50 ms | p90 ms | p99 ms |",
        "| --- | --- | --- | --- |",
    ]
    for key in ("resume_first_event", "resume_headers", "resume_connect", "server_headers",
                "server_first_event", "delivery", "gap"):
        q = result[key]
        lines.append(f"| {key} | {q['p50_ms']:.2f} | {q['p90_ms']:.2f} | {q['p99_ms']:.2f} |")
    lines += ["", f"Resume adds {added:.2f} ms p50 to the next token: resume request → first token, less "
              "what an uninterrupted stream waits for a token (entry written → received; ms resolution).",
              "`resume_connect`: the client's new TCP connection; `server_*`: from the resume request reaching "
              "the API app to its response headers and to its first token event (the API's own share)."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
