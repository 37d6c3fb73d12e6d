"""Relay benchmark: what the Redis hop costs a streaming client, against the
in-process baseline and ChatStream 0.3.0 itself, from 1 to many concurrent streams.

Targets, all served by uvicorn on loopback and driven by the same client in the
same run:

* ``inprocess``: this service's app with the synthetic engine running inside the
  API process (no enqueue, no generator, no stream) — ChatStream's architecture.
* ``chatstream``: ``chatstream==0.3.0`` with its echo mock at the same token rate,
  in ``bench/.venv-chatstream`` (created here on first use).
* ``mux``: this service as it is — API + redis-server + a synthetic generator,
  every open stream read by the multiplexing reader (``services/api/stream_reader.py``).
* ``relay``: the same with the simple reader it replaced patched in (one
  blocking ``XREAD`` per request; ``bench/apps.py``).

Per request the client records time to first byte (headers), time to first
token, every inter-token gap, total time and outcome. Per load level it also
records the API process's CPU time and Redis's command counts
(``INFO commandstats``). Writes ``bench/results/relay.json``, ``relay.md`` and
``relay.png``.

    .venv/bin/python bench/relay_bench.py          # or: make bench  (~5 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402

from services.common.contract import GENERATORS_KEY  # noqa: E402
from bench.venvs import ensure_venv  # noqa: E402
from tests.support.processes import RedisServer, free_port, wait_until  # noqa: E402

CHATSTREAM_VENV = REPO / "bench" / ".venv-chatstream"
CHATSTREAM_PACKAGES = ["torch==2.13.0", "chatstream==0.3.0", "uvicorn", "httpx", "psutil"]
CHATSTREAM_EOS = "<::EOS::>"
WORDS = "abcdefghijklmnopqrstuvwxyz"
#: A level fails when its p99 inter-token gap exceeds the token interval by more than this.
ADDED_GAP_LIMIT_MS = 50.0


@dataclass
class RequestResult:
    """What the client saw of one request (times in seconds from sending it)."""

    ttfb: float | None = None
    ttft: float | None = None
    total: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    outcome: str = "ok"


def prompt(tokens: int) -> str:
    """A prompt of ``tokens`` one-letter words: both mocks echo it as ``tokens`` tokens."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


class TokenCounter:
    """Counts the tokens received so far from the raw body (deltas, or ChatStream's
    cumulative "whole reply<::EOS::>" chunks)."""

    def __init__(self, cumulative: bool) -> None:
        self.cumulative = cumulative
        self.buffer = ""
        self.count = 0

    def feed(self, data: str) -> int:
        self.buffer += data
        if not self.cumulative:
            self.count += sum(1 for c in data if not c.isspace())
            return self.count
        end = self.buffer.rfind(CHATSTREAM_EOS)
        if end >= 0:
            start = self.buffer.rfind(CHATSTREAM_EOS, 0, end)
            start = 0 if start < 0 else start + len(CHATSTREAM_EOS)
            self.count = len(self.buffer[start:end].split())
            self.buffer = self.buffer[end:]
        return self.count


async def one_request(
    client: httpx.AsyncClient, url: str, tokens: int, cumulative: bool, stop_after: int | None = None
) -> RequestResult:
    """One streamed request; ``stop_after``: leave after that many tokens (the reply
    length is a server setting, so short low-load requests hang up early)."""
    result = RequestResult()
    counter = TokenCounter(cumulative)
    sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json={"user_input": prompt(tokens)}) as response:
            result.ttfb = time.perf_counter() - sent
            if response.status_code != 200:
                result.outcome = f"http_{response.status_code}"
                await response.aread()
                return result
            async for chunk in response.aiter_text():
                now = time.perf_counter()
                before = counter.count
                after = counter.feed(chunk)
                for _ in range(after - before):
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.gaps.append(now - last)
                    last = now
                if stop_after is not None and counter.count >= stop_after:
                    result.tokens = tokens
                    result.total = time.perf_counter() - sent
                    return result
            result.tokens = counter.count
            result.total = time.perf_counter() - sent
            if result.tokens < tokens:
                result.outcome = "short"
    except (httpx.HTTPError, OSError) as exc:
        result.outcome = type(exc).__name__
    return result


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class Target:
    """One server under test (and the processes behind it)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path, cumulative: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/chat_stream"
        self.cumulative = cumulative
        self._log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [*args, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)
        wait_until(self._healthy, 90, f"{name} /healthz")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see its log")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def command_usec(client: redis.Redis) -> dict[str, int]:
    """Microseconds Redis spent in each command so far (a script's inner calls count twice:
    in the script and in the command)."""
    return {name.removeprefix("cmdstat_"): int(stats["usec"]) for name, stats in client.info("commandstats").items()}


async def run_level(
    target: Target, concurrency: int, tokens: int, rate: float, ramp: float, rds: redis.Redis, extra: list[psutil.Process]
) -> dict[str, Any]:
    """``concurrency`` streams started evenly over ``ramp`` seconds, all running at once."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    budget = ramp + tokens / rate * 3 + 15
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        calls_before, rcpu_before, usec_before = command_calls(rds), redis_cpu(rds), command_usec(rds)
        cpu_before, extra_before = target.cpu(), [p.cpu_times() for p in extra]
        started = time.perf_counter()

        async def staggered(i: int) -> RequestResult:
            await asyncio.sleep(ramp * i / concurrency)
            return await one_request(client, target.url, tokens, target.cumulative)

        tasks = [asyncio.create_task(staggered(i)) for i in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=budget)
        for task in pending:
            task.cancel()
        results = [t.result() if t in done else RequestResult(outcome="timeout") for t in tasks]
        elapsed = time.perf_counter() - started
        cpu = target.cpu() - cpu_before
        extra_cpu = sum(
            (a.user + a.system) - (b.user + b.system) for p, b in zip(extra, extra_before) for a in [p.cpu_times()]
        )
        calls_after, rcpu_after, usec_after = command_calls(rds), redis_cpu(rds), command_usec(rds)
    gaps = [g for r in results for g in r.gaps]
    received = sum(r.tokens for r in results)
    calls = {k: v - calls_before.get(k, 0) for k, v in calls_after.items() if v - calls_before.get(k, 0) > 0}
    usec = {k: v - usec_before.get(k, 0) for k, v in usec_after.items() if v - usec_before.get(k, 0) > 0}
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    ttft = [r.ttft for r in results if r.ttft is not None]
    ttfb = [r.ttfb for r in results if r.ttfb is not None]
    interval_ms = 1000 / rate
    level = {
        "concurrency": concurrency,
        "requests": len(results),
        "outcomes": outcomes,
        "tokens": received,
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(received / elapsed, 1),
        "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99))},
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99))},
        "gap_ms": {"p50": ms(pct(gaps, 50)), "p99": ms(pct(gaps, 99)), "max": ms(max(gaps) if gaps else None)},
        "total_ms": {"p50": ms(pct([r.total for r in results if r.total], 50))},
        "api_cpu_seconds": round(cpu, 3),
        "api_cpu_ms_per_1000_tokens": round(cpu / received * 1e6, 2) if received else None,
        "generator_cpu_seconds": round(extra_cpu, 3),
        "redis_cpu_seconds": round(rcpu_after - rcpu_before, 3),
        "redis_calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "redis_calls_per_token": round(sum(calls.values()) / received, 3) if received else None,
        "redis_usec_per_token_by_command": {
            k: round(v / received, 2) for k, v in sorted(usec.items(), key=lambda kv: -kv[1])[:8]
        } if received else {},
        "redis_cpu_usec_per_token": round((rcpu_after - rcpu_before) / received * 1e6, 2) if received else None,
        # XREAD is the only command the relay itself issues per token; the rest is the
        # generator's fenced XADD (a Lua script: TIME, ZSCORE, HGET, XADD), its cancel
        # checks, arq and admission.
        "xread_per_token": round(calls.get("xread", 0) / received, 4) if received else None,
    }
    p99 = level["gap_ms"]["p99"]
    level["ok"] = bool(outcomes.get("ok", 0) == len(results) and p99 is not None and p99 - interval_ms <= ADDED_GAP_LIMIT_MS)
    return level


async def low_load(target: Target, requests: int, tokens: int) -> dict[str, Any]:
    """One request at a time: the hop's cost to the first token with nothing else running."""
    results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        await one_request(client, target.url, tokens, target.cumulative, stop_after=tokens)  # warm-up
        for _ in range(requests):
            results.append(await one_request(client, target.url, tokens, target.cumulative, stop_after=tokens))
            await asyncio.sleep(0.05)  # let the hung-up request's cleanup finish first
    ttft = [r.ttft for r in results if r.ttft is not None]
    ttfb = [r.ttfb for r in results if r.ttfb is not None]
    gaps = [g for r in results for g in r.gaps]
    return {
        "requests": requests,
        "ok": sum(r.outcome == "ok" for r in results),
        "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99))},
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)), "mean": ms(statistics.fmean(ttft)) if ttft else None},
        "gap_ms": {"p50": ms(pct(gaps, 50)), "p99": ms(pct(gaps, 99))},
    }


def ensure_chatstream_venv() -> Path | None:
    return ensure_venv(CHATSTREAM_VENV, CHATSTREAM_PACKAGES, "chatstream, uvicorn, psutil")


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample the API process with py-spy (if installed) while a level runs."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return None
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--format", "raw",
         "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def summarize_profile(raw: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of the hottest functions in py-spy's collapsed stacks."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + n
    share = lambda d: [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"samples": total, "self_percent": share(self_counts), "inclusive_percent": share(incl_counts)}


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def compare(results: dict[str, Any], name: str, base: str, rate: float) -> dict[str, Any]:
    """``name`` against ``base``: extra milliseconds and ratios."""
    a, b = results[name], results[base]
    out: dict[str, Any] = {
        "extra_ttft_ms_low_load": {q: sub(a["low_load"]["ttft_ms"][q], b["low_load"]["ttft_ms"][q]) for q in ("p50", "p99")},
        "ttft_ratio_low_load": {q: ratio(a["low_load"]["ttft_ms"][q], b["low_load"]["ttft_ms"][q]) for q in ("p50", "p99")},
        "levels": {},
    }
    base_levels = {lvl["concurrency"]: lvl for lvl in b["levels"]}
    for lvl in a["levels"]:
        other = base_levels.get(lvl["concurrency"])
        if other is None:
            continue
        out["levels"][lvl["concurrency"]] = {
            "extra_gap_ms": {q: sub(lvl["gap_ms"][q], other["gap_ms"][q]) for q in ("p50", "p99")},
            "extra_ttft_ms": {q: sub(lvl["ttft_ms"][q], other["ttft_ms"][q]) for q in ("p50", "p99")},
            "cpu_per_1000_tokens_ratio": ratio(lvl["api_cpu_ms_per_1000_tokens"], other["api_cpu_ms_per_1000_tokens"]),
        }
    return out


def summary(result: dict[str, Any], rate: float) -> dict[str, Any]:
    """Capacity figures of one target."""
    passing = [lvl for lvl in result["levels"] if lvl["ok"]]
    best = max(passing, key=lambda lvl: lvl["concurrency"]) if passing else None
    cpu = [lvl["api_cpu_ms_per_1000_tokens"] for lvl in result["levels"] if lvl["api_cpu_ms_per_1000_tokens"]]
    heaviest = max(result["levels"], key=lambda lvl: lvl["tokens"]) if result["levels"] else None
    cpu_heavy = heaviest["api_cpu_ms_per_1000_tokens"] if heaviest else None
    return {
        "max_concurrency_within_gap_limit": best["concurrency"] if best else 0,
        "tokens_per_second_at_that_level": best["tokens_per_second"] if best else 0,
        "api_cpu_ms_per_1000_tokens_at_heaviest_level": cpu_heavy,
        "api_cpu_ms_per_1000_tokens_min": min(cpu) if cpu else None,
        "projected_tokens_per_second_per_core": round(1e6 / cpu_heavy) if cpu_heavy else None,
        "projected_streams_per_core_at_rate": round(1e6 / cpu_heavy / rate) if cpu_heavy else None,
        "redis_calls_per_token_at_heaviest_level": heaviest["redis_calls_per_token"] if heaviest else None,
        "xread_per_token_at_heaviest_level": heaviest["xread_per_token"] if heaviest else None,
    }


def plot(results: dict[str, Any], rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in results.items():
        levels = result["levels"]
        if not levels:
            continue
        xs = [lvl["concurrency"] for lvl in levels]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            axes[0].plot(xs, [lvl["gap_ms"][q] for lvl in levels], style, label=f"{name} {q}")
            axes[1].plot(xs, [lvl["ttft_ms"][q] for lvl in levels], style, label=f"{name} {q}")
    interval = 1000 / rate
    axes[0].axhline(interval + ADDED_GAP_LIMIT_MS, color="red", lw=0.8, label=f"limit (+{ADDED_GAP_LIMIT_MS:g} ms)")
    axes[0].set_title(f"Inter-token gap at the client ({rate:g} tokens/s per stream)")
    axes[1].set_title("Time to first token")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    cfg, results = report["config"], report["results"]
    interval = 1000 / cfg["rate"]
    lines = [
        "# Relay benchmark",
        "",
        f"{report['machine']} — {cfg['rate']:g} tokens/s per stream, {cfg['tokens']} tokens per reply, "
        f"levels {cfg['levels']}; load average before the run {report['loadavg_before']}. "
        "Client, servers, Redis and generator share this machine, so absolute times are context; "
        "compare targets within one run.",
        "",
        "## Low load (one request at a time)",
        "",
        "| target | TTFB p50 | TTFT p50 | TTFT p99 | gap p50 | gap p99 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        low = r["low_load"]
        lines.append(
            f"| {name} | {low['ttfb_ms']['p50']} | {low['ttft_ms']['p50']} | {low['ttft_ms']['p99']} | "
            f"{low['gap_ms']['p50']} | {low['gap_ms']['p99']} |"
        )
    lines += ["", "## Against the in-process baseline", ""]
    lines += ["| target | extra TTFT p50 (low load) | extra TTFT p99 (low load) | extra gap p50 @100 | extra gap p99 @100 |",
              "| --- | --- | --- | --- | --- |"]
    for name, c in report["comparisons"].items():
        at100 = c["levels"].get(100) or c["levels"].get("100") or {}
        lines.append(
            f"| {name} | {c['extra_ttft_ms_low_load']['p50']} ms | {c['extra_ttft_ms_low_load']['p99']} ms | "
            f"{(at100.get('extra_gap_ms') or {}).get('p50')} ms | {(at100.get('extra_gap_ms') or {}).get('p99')} ms |"
        )
    lines += ["", "## Capacity per API process", "",
              f"Max concurrency: highest level with every request complete and p99 gap ≤ {interval:g} + {ADDED_GAP_LIMIT_MS:g} ms. "
              "Projection: tokens/s one core could relay at the measured API CPU cost per token.", "",
              "| target | max streams | tokens/s there | API CPU ms / 1000 tokens (heaviest level) | projected tokens/s per core | projected streams per core | Redis calls / token (XREAD) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in report["summaries"].items():
        lines.append(
            f"| {name} | {s['max_concurrency_within_gap_limit']} | {s['tokens_per_second_at_that_level']} | "
            f"{s['api_cpu_ms_per_1000_tokens_at_heaviest_level']} | {s['projected_tokens_per_second_per_core']} | "
            f"{s['projected_streams_per_core_at_rate']} | {s['redis_calls_per_token_at_heaviest_level']} "
            f"({s['xread_per_token_at_heaviest_level']}) |"
        )
    lines += ["", "## Every level", "",
              "| target | streams | ok | tokens/s | TTFT p50 | TTFT p99 | gap p50 | gap p99 | gap max | API CPU ms/1000 tok | generator CPU s | Redis CPU s | Redis calls/token (XREAD) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for lvl in r["levels"]:
            bad = {k: v for k, v in lvl["outcomes"].items() if k != "ok"}
            lines.append(
                f"| {name} | {lvl['concurrency']} | {'yes' if lvl['ok'] else 'no'}{' ' + str(bad) if bad else ''} | "
                f"{lvl['tokens_per_second']} | {lvl['ttft_ms']['p50']} | {lvl['ttft_ms']['p99']} | {lvl['gap_ms']['p50']} | "
                f"{lvl['gap_ms']['p99']} | {lvl['gap_ms']['max']} | {lvl['api_cpu_ms_per_1000_tokens']} | "
                f"{lvl['generator_cpu_seconds']} | {lvl['redis_cpu_seconds']} | {lvl['redis_calls_per_token']} "
                f"({lvl['xread_per_token']}) |"
            )
    if report.get("profile"):
        prof = report["profile"]
        lines += ["", f"## Profile of the API process ({prof['target']}, {prof['concurrency']} streams, py-spy, {prof['samples']} samples)", "",
                  "| function (self) | % |", "| --- | --- |"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["self_percent"]]
        lines += ["", "| function (inclusive) | % |", "| --- | --- |"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["inclusive_percent"]]
    lines.append("")
    return "\n".join(lines)


async def bench_target(target: Target, args: argparse.Namespace, rds: redis.Redis, extra: list[psutil.Process],
                       deadline: float, profile_at: int | None, workdir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    print(f"[{target.name}] low load", flush=True)
    result: dict[str, Any] = {"low_load": await low_load(target, args.low_load_requests, args.low_load_tokens), "levels": []}
    prof = None
    for concurrency in args.levels:
        if time.monotonic() > deadline:
            print(f"[{target.name}] time budget spent; skipping the remaining levels", flush=True)
            break
        spy = None
        raw = workdir / f"profile-{target.name}-{concurrency}.txt"
        if profile_at == concurrency:
            spy = profile(target.proc.pid, args.ramp + args.tokens / args.rate, raw)
        level = await run_level(target, concurrency, args.tokens, args.rate, args.ramp, rds, extra)
        if spy is not None:
            spy.wait(30)
            if raw.exists():
                prof = {"target": target.name, "concurrency": concurrency, **summarize_profile(raw)}
        result["levels"].append(level)
        print(f"[{target.name}] {concurrency:5d} streams: ok={level['ok']} tokens/s={level['tokens_per_second']} "
              f"ttft p50/p99={level['ttft_ms']['p50']}/{level['ttft_ms']['p99']} gap p50/p99={level['gap_ms']['p50']}/"
              f"{level['gap_ms']['p99']} cpu/1000tok={level['api_cpu_ms_per_1000_tokens']}ms "
              f"redis calls/token={level['redis_calls_per_token']} {level['outcomes']}", flush=True)
        if not level["ok"]:
            break
        await asyncio.sleep(0.5)
    return result, prof


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="inprocess,chatstream,relay,mux")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=60, help="tokens per reply in the concurrency sweep")
    parser.add_argument("--levels", default="1,10,50,100,200,400,700,1000")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which a level's streams start")
    parser.add_argument("--low-load-requests", type=int, default=100)
    parser.add_argument("--low-load-tokens", type=int, default=5)
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=540, help="stop starting new levels after this")
    parser.add_argument("--profile", default="mux", help="target to profile with py-spy at its last level ('' = none)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    deadline = time.monotonic() + args.max_seconds
    workdir = REPO / ".run" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    loadavg = [round(x, 2) for x in os.getloadavg()]

    server = RedisServer(workdir)
    rds = server.client
    service_env = {
        "REDIS_URL": server.url,
        "LOG_LEVEL": "WARNING",
        "OTEL_TRACES_EXPORTER": "none",
        "MAX_CONCURRENT_GENERATIONS": "5000",
        "MAX_QUEUE_SIZE": "5000",
        "GENERATOR_BACKEND": "synthetic",
        "SYNTHETIC_TOKENS_PER_SECOND": str(args.rate),
        "MAX_NEW_TOKENS": str(max(args.tokens, args.low_load_tokens)),
        "GENERATOR_SLOTS": "2000",
        # Low-load clients hang up after a few tokens to save time: with a resume grace
        # their generations would go on for it, and "one request at a time" would be
        # a dozen streams in the background. Sweep clients read whole replies.
        "RESUME_GRACE_SECONDS": "0",
    }
    uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "--no-access-log"]
    results: dict[str, Any] = {}
    profile_result = None
    generators: list[subprocess.Popen[bytes]] = []
    try:
        for name in targets:
            extra: list[psutil.Process] = []
            if name == "chatstream":
                python = ensure_chatstream_venv()
                if python is None:
                    continue
                target = Target(name, [str(python), "-m", "uvicorn", "--factory", "--no-access-log", "bench.chatstream_app:create"],
                                {"CHATSTREAM_TIME_PER_TOKEN": str(1 / args.rate)}, workdir, cumulative=True)
            else:
                if name in ("relay", "mux") and not generators:
                    for i in range(args.generators):
                        log = open(workdir / f"generator{i}.log", "wb")
                        generators.append(subprocess.Popen(
                            [sys.executable, "-m", "services.generator"], cwd=REPO,
                            env={**os.environ, **service_env, "WORKER_ID": f"bench-gen{i}"}, stdout=log, stderr=subprocess.STDOUT))
                    wait_until(lambda: rds.zcard(GENERATORS_KEY) >= args.generators, 60, "generators to register")
                extra = [psutil.Process(g.pid) for g in generators] if name in ("relay", "mux") else []
                target = Target(name, [*uvicorn, "bench.apps:create"], {**service_env, "BENCH_APP": name}, workdir)
            try:
                profile_at = args.levels[-1] if name == args.profile else None
                result, prof = await bench_target(target, args, rds, extra, deadline, profile_at, workdir)
                if prof is None and name == args.profile and result["levels"]:
                    # The last level was not reached: profile the last one it ran, once more.
                    last = result["levels"][-1]["concurrency"]
                    raw = workdir / f"profile-{name}-{last}-rerun.txt"
                    spy = profile(target.proc.pid, args.ramp + args.tokens / args.rate, raw)
                    rerun = await run_level(target, last, args.tokens, args.rate, args.ramp, rds, extra)
                    if spy is not None:
                        spy.wait(30)
                        if raw.exists():
                            prof = {"target": name, "concurrency": last, "rerun": rerun, **summarize_profile(raw)}
                results[name] = result
                profile_result = prof or profile_result
            finally:
                target.stop()
    finally:
        for g in generators:
            g.terminate()
            g.wait(20)
        server.stop()

    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loadavg_before": loadavg,
        "config": {"rate": args.rate, "tokens": args.tokens, "levels": args.levels, "ramp": args.ramp,
                   "low_load_requests": args.low_load_requests, "low_load_tokens": args.low_load_tokens,
                   "generators": args.generators, "added_gap_limit_ms": ADDED_GAP_LIMIT_MS},
        "results": results,
        "comparisons": {n: compare(results, n, "inprocess", args.rate) for n in results if n != "inprocess" and "inprocess" in results},
        "summaries": {n: summary(r, args.rate) for n, r in results.items()},
        "profile": profile_result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relay.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "relay.md").write_text(markdown(report))
    plot(results, args.rate, args.out / "relay.png")
    print(markdown(report))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
