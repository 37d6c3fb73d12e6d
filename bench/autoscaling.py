"""Scaling drill: a load spike scales generators out and back in, driven by what the chart's
ScaledObject tells KEDA and the HPA to do (issue 22).

Real processes on loopback: redis-server, two API pods (``python -m services.api``, each
with its internal port) and generator pods (``python -m services.generator``, the
synthetic backend at the chart's SYNTHETIC_TOKENS_PER_SECOND, so a reply takes real
seconds without a model). A controller here plays the cluster:

* It renders the chart (``helm template`` with the scenario's values, KEDA present) and
  takes the ScaledObject's trigger, replicas, polling, cooldown and HPA behaviour
  (:class:`bench.autoscaler.Policy`), and the admission and generator settings from the
  rendered ConfigMaps: the drill runs what ``helm install`` would.
* Every ``pollingInterval`` (KEDA) and every 15 s (the HPA's sync period) it reads the
  trigger's metric from the real services, as the scaler would: ``metrics-api`` GETs an
  API pod's ``/load`` and takes its ``valueLocation``; ``prometheus`` scrapes every API
  pod's ``/metrics`` and evaluates the query's ``max(a) + max(b)`` over them; ``redis``
  runs KEDA's redis scaler's Lua (``TYPE`` then ``ZCARD``/``LLEN``) on ``listName``.
  :class:`bench.autoscaler.Autoscaler` turns it into a replica count.
* Like a ReplicaSet it starts generator processes up to that count and sends SIGTERM to
  the newest beyond it (the pod drains: it finishes its streams and takes no new ones).

Time is compressed only where waiting adds nothing: the stabilization windows, the
policies' periods and ``cooldownPeriod`` are divided by ``--compress`` (10: the chart's
300 s scale-down window is 30 s here). Polling and the HPA's sync stay real, and so do
the replies and a generator's start-up (a few seconds here; minutes on a GPU with a real
model, which adds to "first new generator ready", not to the decision).

Scenarios: ``spike`` (60 requests in 5 s on 1 generator, max 4, then quiet: scale-in),
``ramp`` (the request rate grows steadily for 60 s), ``scale-in`` (4 generators busy
with long replies, then the load drops: every SIGTERMed pod finishes its streams),
``from-zero`` (minReplicas 0, the prometheus trigger: the first request waits in the
queue for a generator to start), and ``spike-old-defaults`` (the chart before this
drill: redis trigger on arq's queue, fixed MAX_CONCURRENT_GENERATIONS 2).

Per scenario: JSON and a PNG (queue depth, permits in use, generators over time) in
``bench/results/autoscaling/``, and ``bench/results/autoscaling.md``.

    make bench-autoscaling                            # every scenario, ~10 minutes
    .venv/bin/python bench/autoscaling.py spike ramp  # some of them
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.autoscaler import Autoscaler, Policy  # noqa: E402
from tests.support.client import parse_sse_block, scrape  # noqa: E402
from tests.support.deploy import CHART, container_env, find, helm_template, parse  # noqa: E402
from tests.support.processes import ApiServer, RedisServer, Service, free_port  # noqa: E402

KEDA = "keda.sh/v1alpha1/ScaledObject"
#: The chart's settings the drill's processes take from the rendered ConfigMaps.
API_KEYS = ("MAX_CONCURRENT_GENERATIONS", "ADMISSION_FOLLOWS_GENERATORS", "MAX_QUEUE_SIZE", "QUEUE_TIMEOUT_SECONDS", "LEASE_SECONDS")
GENERATOR_KEYS = ("GENERATOR_SLOTS", "SYNTHETIC_TOKENS_PER_SECOND", "DRAIN_SECONDS")
SSE = {"accept": "text/event-stream"}

# KEDA's redis scaler (pkg/scalers/redis_scaler.go): the key's length by its type.
REDIS_LENGTH_LUA = """
local t = redis.call('type', KEYS[1]).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[t], KEYS[1])
"""


@dataclass
class Chart:
    """What the drill takes from one rendering of the chart."""

    policy: Policy
    api_env: dict[str, str]
    generator_env: dict[str, str]

    @classmethod
    def render(cls, values: dict[str, Any], commit: str | None = None) -> Chart:
        """The chart of the working tree, or of ``commit`` (exported from git)."""
        chart = CHART
        if commit is not None:
            chart = REPO / ".cache" / "bench-autoscaling" / f"chart-{commit}"
            if not chart.exists():
                chart.mkdir(parents=True)
                archive = subprocess.run(["git", "archive", commit, "helm/chatstream"], cwd=REPO, check=True, capture_output=True)
                subprocess.run(["tar", "-x", "-C", str(chart)], input=archive.stdout, check=True)
            chart = chart / "helm" / "chatstream"
        objects = parse(helm_template(values, api_versions=(KEDA,), chart=chart))
        policy = Policy.from_scaled_object(find(objects, "ScaledObject", "-generator"))
        api = container_env(objects, find(objects, "Deployment", "-api"), "api")
        generator = container_env(objects, find(objects, "Deployment", "-generator"), "generator")
        return cls(
            policy,
            {k: str(api[k]) for k in API_KEYS},
            {k: str(generator[k]) for k in GENERATOR_KEYS},
        )


# --- the metric, read as each trigger's scaler reads it ---------------------------------------


def prometheus_sum_of_max(query: str, scrapes: list[dict[str, float]]) -> float:
    """``max(a{...}) + max(b{...}) + ...`` over the API pods' scrapes, as Prometheus
    evaluates it over the pods' series (the chart's default query). The label matchers
    (the namespace Prometheus adds) select every pod here. Any other query shape fails."""
    terms = [t.strip() for t in query.split("+")]
    total = 0.0
    for term in terms:
        match = re.fullmatch(r"max\((\w+)(\{[^}]*\})?\)", term)
        if match is None:
            raise ValueError(f"the drill evaluates sums of max(metric), not {term!r}")
        values = [v for s in scrapes for k, v in s.items() if k == match[1] or k.startswith(match[1] + "{")]
        if not values:
            raise ValueError(f"no API pod exports {match[1]}")
        total += max(values)
    return total


class TriggerMetric:
    """The value KEDA's scaler for the ScaledObject's trigger would report now."""

    def __init__(self, trigger: dict[str, Any], apis: list[ApiServer], redis_client: Any) -> None:
        self.trigger = trigger
        self.apis = apis
        self.redis = redis_client

    async def read(self, client: httpx.AsyncClient) -> float:
        kind, meta = self.trigger["type"], self.trigger["metadata"]
        if kind == "metrics-api":
            # The chart's URL names the API's internal Service; here: the first API pod behind it.
            path = httpx.URL(meta["url"]).path
            body = (await client.get(internal_url(self.apis[0]) + path)).json()
            for part in meta["valueLocation"].split("."):
                body = body[part]
            return float(body)
        if kind == "prometheus":
            scrapes = [await asyncio.to_thread(scrape, internal_url(api) + "/metrics") for api in self.apis]
            return prometheus_sum_of_max(meta["query"], scrapes)
        if kind in ("redis", "redis-sentinel"):
            return float(self.redis.eval(REDIS_LENGTH_LUA, 1, meta["listName"]))
        raise ValueError(f"no scaler for trigger {kind}")


def internal_url(api: ApiServer) -> str:
    return api.health_url.rsplit("/", 1)[0]


# --- the Deployment: generator pods started and drained -----------------------------------------


@dataclass
class Pod:
    service: Service
    metrics_url: str
    sigterm_at: float | None = None
    busy_at_sigterm: float | None = None
    exit_code: int | None = None


class Fleet:
    """A ReplicaSet of generator processes: starts pods up to ``replicas`` and sends SIGTERM
    to the newest beyond it (as a ReplicaSet picks the youngest pods to delete)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.pods: list[Pod] = []  # running, oldest first
        self.terminating: list[Pod] = []
        self.gone: list[Pod] = []
        self._count = 0

    def reconcile(self, replicas: int, now: float) -> None:
        while len(self.pods) < replicas:
            self._count += 1
            port = free_port()
            name = f"gen-{self._count}"
            env = {**self.env, "WORKER_ID": name, "METRICS_PORT": str(port)}
            service = Service(name, ["-m", "services.generator"], env, self.workdir)
            self.pods.append(Pod(service, f"http://127.0.0.1:{port}/metrics"))
        while len(self.pods) > replicas:
            pod = self.pods.pop()
            try:
                pod.busy_at_sigterm = scrape(pod.metrics_url).get("chatstream_generator_active_jobs", 0.0)
            except httpx.HTTPError:
                pod.busy_at_sigterm = 0.0  # not started far enough to serve metrics: it held nothing
            pod.sigterm_at = now
            pod.service.proc.send_signal(signal.SIGTERM)
            self.terminating.append(pod)

    def reap(self) -> None:
        for pod in list(self.terminating):
            if pod.service.proc.poll() is not None:
                pod.exit_code = pod.service.proc.returncode
                self.terminating.remove(pod)
                self.gone.append(pod)

    def close(self) -> None:
        for pod in self.pods + self.terminating:
            pod.exit_code = pod.service.stop(timeout=30)
        self.gone += self.pods + self.terminating
        self.pods, self.terminating = [], []


# --- the load ------------------------------------------------------------------------------------


@dataclass
class Request:
    sent: float
    status: int = 0
    first_token: float | None = None
    ended: float | None = None
    last_event: str = ""
    words: int = 0
    error: str = ""


async def one_request(base_url: str, sent: float, tokens: int, t0: float) -> Request:
    """One SSE chat request read to its end, timed against the drill's clock ``t0``."""
    record = Request(sent - t0)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300, connect=10)) as client:
        try:
            async with client.stream("POST", "/chat_stream", json={"user_input": "tell me a story"}, headers=SSE) as response:
                record.status = response.status_code
                buffer, text = "", ""
                async for chunk in response.aiter_text():
                    buffer += chunk
                    *blocks, buffer = buffer.split("\n\n")
                    for block in blocks:
                        name, data, _, _ = parse_sse_block(block)
                        if data is None:
                            continue  # the opening "retry:" block
                        if name == "error":
                            record.error = data.get("code", "error")
                        elif name == "token":
                            if record.first_token is None:
                                record.first_token = time.monotonic() - t0
                            text += data["text"]
                        record.last_event = name
            record.words = len(text.split())
        except httpx.HTTPError as exc:
            record.error = repr(exc)
    record.ended = time.monotonic() - t0
    return record


# --- scenarios -----------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    what: str
    values: dict[str, Any]
    arrivals: list[float]  # request send times, seconds after the load starts (open loop)
    tokens: int
    initial: int = 1  # generators at the start
    settle: float = 240  # longest wait after the last arrival for the fleet to return to its minimum
    chart_commit: str | None = None  # render the chart of this commit instead of the working tree's
    # Closed loop, after the arrivals: (from, until, clients), each client sending its next request
    # as soon as its last one ended, as a chat user does.
    phases: list[tuple[float, float, int]] = field(default_factory=list)


def spike(n: int = 60, over: float = 5.0) -> list[float]:
    return [over * i / n for i in range(n)]


def ramp(seconds: float = 60.0, peak_per_second: float = 2.0) -> list[float]:
    """Arrivals whose rate grows linearly from 0 to ``peak_per_second``: the i-th at
    sqrt(2 i T / peak), the inverse of the cumulative count peak t^2 / 2T."""
    n = int(peak_per_second * seconds / 2)
    return [math.sqrt(2 * i * seconds / peak_per_second) for i in range(1, n + 1)]


SCENARIOS = {
    "spike": Scenario("spike", "0 -> 60 requests in 5 s, 1 generator to start with, max 4", {}, spike(), 200),
    "ramp": Scenario("ramp", "request rate growing from 0 to 2/s over 60 s", {}, ramp(), 200),
    "scale-in": Scenario(
        "scale-in",
        "4 generators, 8 users with 10 s replies for 30 s, then 3 users for 90 s: scale-in while streams run",
        {},
        [],
        500,
        initial=4,
        phases=[(0, 30, 8), (30, 120, 3)],
    ),
    "from-zero": Scenario(
        "from-zero",
        "minReplicas 0, prometheus trigger: one request, no generator",
        {
            "generator.autoscaling.minReplicas": 0,
            "generator.autoscaling.keda.trigger": "prometheus",
            "generator.autoscaling.keda.prometheus.serverAddress": "http://prometheus.monitoring.svc:9090",
        },
        [2.0],
        200,
        initial=0,
    ),
    "spike-old-defaults": Scenario(
        "spike-old-defaults",
        "the spike with the chart's defaults before this drill (redis trigger on arq's queue, MAX_CONCURRENT_GENERATIONS 2)",
        {},
        spike(),
        200,
        settle=120,
        chart_commit="438f2c4",
    ),
}


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    permits: list[int] = field(default_factory=list)
    limit: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


async def drill(scenario: Scenario, workdir: Path, compress: float, sync: float | None = None) -> dict[str, Any]:
    """Run one scenario against a fresh Redis and fresh pods; the report as a dict."""
    chart = Chart.render(scenario.values, scenario.chart_commit)
    policy = chart.policy.compressed(compress)
    if sync is not None:
        policy = replace(policy, sync=sync)
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir)
    env = {"REDIS_URL": server.url, "LOG_LEVEL": "WARNING", "OTEL_TRACES_EXPORTER": "none"}
    apis = [
        ApiServer(f"api-{i}", {**env, **chart.api_env, "API_INTERNAL_PORT": str(free_port())}, workdir) for i in range(2)
    ]
    generator_env = {**env, **chart.generator_env, "GENERATOR_BACKEND": "synthetic", "MAX_NEW_TOKENS": str(scenario.tokens)}
    fleet = Fleet(generator_env, workdir)
    metric = TriggerMetric(policy.trigger, apis, server.client)
    timeline = Timeline()
    t0 = time.monotonic()
    fleet.reconcile(scenario.initial, 0.0)
    scaler = Autoscaler(policy, scenario.initial, 0.0)
    requests: list[asyncio.Task[Request]] = []
    load_start = 2.0  # let the first generators register

    async def user(start: float, until: float, index: int) -> None:
        await asyncio.sleep(max(0.0, load_start + start - (time.monotonic() - t0)))
        while time.monotonic() - t0 < load_start + until:
            task = asyncio.create_task(one_request(apis[index % 2].base_url, time.monotonic(), scenario.tokens, t0))
            requests.append(task)
            await task

    async def send_all() -> None:
        users = [asyncio.create_task(user(a, b, i)) for a, b, n in scenario.phases for i in range(n)]
        for i, at in enumerate(scenario.arrivals):
            delay = load_start + at - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            requests.append(asyncio.create_task(one_request(apis[i % 2].base_url, time.monotonic(), scenario.tokens, t0)))
        await asyncio.gather(*users)

    sender = asyncio.create_task(send_all())
    async with httpx.AsyncClient(timeout=5) as client:
        last_arrival = load_start + max(scenario.arrivals + [b for _, b, _ in scenario.phases])
        deadline = last_arrival + scenario.settle
        while True:
            now = time.monotonic() - t0
            while (check := scaler.due(now)) is not None:
                value = await metric.read(client)
                before = scaler.replicas
                after = scaler.keda(now, value) if check == "keda" else scaler.hpa(now, value)
                if after != before:
                    timeline.decisions.append({"t": round(now, 2), "by": check, "metric": value, "from": before, "to": after})
                fleet.reconcile(after, now)
            fleet.reap()
            load = (await client.get(internal_url(apis[0]) + "/load")).json()
            timeline.t.append(round(now, 2))
            timeline.permits.append(load["permits"]["in_use"])
            timeline.limit.append(load["permits"]["limit"])
            timeline.queue.append(load["queue"]["waiting"])
            timeline.jobs.append(load["jobs_queued"])
            timeline.replicas.append(len(fleet.pods))
            timeline.registered.append(len(load["generators"]))
            done = sender.done() and all(r.done() for r in requests)
            settled = scaler.replicas == policy.min_replicas and not fleet.terminating
            if done and settled:
                break
            if now > deadline:
                break
            await asyncio.sleep(0.5)
    records = [await r for r in requests]
    queue_wait = await asyncio.to_thread(queue_wait_quantiles, apis)
    for api in apis:
        api.stop(timeout=10)
    fleet.close()
    server.close()
    # The figures count from the first request's scheduled send.
    first_request = load_start + min(scenario.arrivals + [a for a, _, _ in scenario.phases])
    return report(scenario, chart, policy, compress, timeline, records, fleet, first_request, queue_wait)


def queue_wait_quantiles(apis: list[ApiServer]) -> dict[str, float | None]:
    """p50/p99 of chatstream_queue_wait_seconds over both API pods, as Prometheus's
    histogram_quantile computes it from the summed buckets (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for api in apis:
        for key, value in scrape(internal_url(api) + "/metrics").items():
            match = re.fullmatch(r'chatstream_queue_wait_seconds_bucket\{le="([^"]+)"\}', key)
            if match:
                bound = float(match[1])
                buckets[bound] = buckets.get(bound, 0.0) + value
    return {f"p{int(q * 100)}_s": histogram_quantile(q, buckets) for q in (0.5, 0.99)}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower  # Prometheus answers the highest finite bound
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9)
        lower, below = bound, buckets[bound]
    return lower


def queue_busy_and_empty(t: list[float], queue: list[int]) -> tuple[float | None, float | None]:
    """When requests first waited for a permit, and when the queue was empty for good
    (the first empty sample after the last one with a request waiting)."""
    busy = [i for i, q in enumerate(queue) if q > 0]
    if not busy:
        return None, None
    after = [t[i] for i in range(busy[-1] + 1, len(t)) if queue[i] == 0]
    return t[busy[0]], after[0] if after else None


def report(
    scenario: Scenario,
    chart: Chart,
    policy: Policy,
    compress: float,
    timeline: Timeline,
    records: list[Request],
    fleet: Fleet,
    first_request: float,
    queue_wait: dict[str, float | None],
) -> dict[str, Any]:
    complete = [r for r in records if r.status == 200 and r.last_event == "done" and r.words == scenario.tokens]
    # Refused: turned away before any token (429/503 at the door, or an error event while queued).
    refused = [r for r in records if r not in complete and r.first_token is None]
    broken = [r for r in records if r not in complete and r.first_token is not None]
    refusals: dict[str, int] = {}
    for r in refused:
        reason = r.error or str(r.status)
        refusals[reason] = refusals.get(reason, 0) + 1
    ups = [d for d in timeline.decisions if d["to"] > d["from"]]
    first_scale_out = ups[0]["t"] - first_request if ups else None
    peak = max(timeline.replicas) if timeline.replicas else 0
    at_peak = None if peak <= scenario.initial else next((t for t, n in zip(timeline.t, timeline.registered) if n >= peak), None)
    busy_since, empty_at = queue_busy_and_empty(timeline.t, timeline.queue)
    waits = sorted(r.first_token - r.sent for r in complete if r.first_token is not None)
    drained = [p for p in fleet.gone if p.sigterm_at is not None]
    return {
        "scenario": scenario.name,
        "what": scenario.what,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "chart_values": scenario.values,
        "trigger": policy.trigger,
        "policy": {**asdict(policy), "trigger": None},
        "compress": compress,
        "settings": {**chart.api_env, **chart.generator_env, "MAX_NEW_TOKENS": scenario.tokens},
        "requests": len(records),
        "completed": len(complete),
        "refused": len(refused),
        "refused_by_reason": refusals,
        "broken_streams": len(broken),
        "broken": [asdict(r) for r in broken],
        "peak_generators": peak,
        "time_to_first_scale_out_s": first_scale_out,
        "time_to_peak_generators_registered_s": None if at_peak is None else at_peak - first_request,
        "queue_busy_from_s": None if busy_since is None else busy_since - first_request,
        "queue_empty_after_s": None if empty_at is None or busy_since is None else empty_at - first_request,
        "first_token_wait_s": None if not waits else {
            "p50": statistics.median(waits), "p99": waits[int(0.99 * (len(waits) - 1))], "max": waits[-1]
        },
        "queue_wait_histogram_s": queue_wait,
        "scaled_in": [
            {"pod": p.service.name, "sigterm_at_s": p.sigterm_at, "busy_at_sigterm": p.busy_at_sigterm, "exit_code": p.exit_code}
            for p in drained
        ],
        "decisions": timeline.decisions,
        "timeline": asdict(timeline) | {"decisions": None},
        "first_request_s": first_request,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    # One axis: with GENERATOR_SLOTS 1 a generator is one permit, so the lines compare directly.
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.step(tl["t"], tl["queue"], where="post", label="waiting for a permit (queue depth)")
    ax.step(tl["t"], tl["permits"], where="post", label="permits in use")
    if "limit" in tl:
        ax.step(tl["t"], tl["limit"], where="post", ls=":", label="permit limit")
    ax.step(tl["t"], tl["replicas"], where="post", color="black", lw=2, label="generator pods (desired)")
    ax.step(tl["t"], tl["registered"], where="post", color="grey", ls="--", label="generators registered")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests / generators")
    for d in result["decisions"]:
        ax.axvline(d["t"], color="grey", lw=0.5, alpha=0.5)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{result['scenario']}: {result['what']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(results: list[dict[str, Any]]) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "# Autoscaling drill",
        "",
        "`make bench-autoscaling` (bench/autoscaling.py): real redis-server, 2 API pods, synthetic generator pods",
        "started and drained by a controller applying KEDA's and the HPA's rules to the chart's rendered",
        f"ScaledObject. Windows (stabilization, policy periods, cooldown) compressed {results[0]['compress']:g}x;",
        "polling (5 s) and the HPA sync (15 s) real. Times from the first request sent. First-token wait: the client's,",
        "queue wait included; the API's queue-wait histogram is interpolated inside its buckets (5, 10, 15, 20, 30, 45, 60 s...), as",
        "Prometheus's histogram_quantile does. Refused: 429 at the door (the queue's bound) or queue_timeout while waiting.",
        "",
        "| scenario | trigger | requests | completed | refused | broken | peak generators | first scale-out | peak registered | queue empty | first-token wait p50 / p99 | queue wait p50 / p99 (API histogram) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r["first_token_wait_s"] or {}
        q = r["queue_wait_histogram_s"]
        lines.append(
            f"| {r['scenario']} | {r['trigger']['type']} | {r['requests']} | {r['completed']} | {r['refused']} | "
            f"{r['broken_streams']} | {r['peak_generators']} | {s(r['time_to_first_scale_out_s'])} s | "
            f"{s(r['time_to_peak_generators_registered_s'])} s | {s(r['queue_empty_after_s'])} s | "
            f"{s(w.get('p50'))} / {s(w.get('p99'))} s | {s(q['p50_s'])} / {s(q['p99_s'])} s |"
        )
    lines.append("")
    for r in results:
        drained = r["scaled_in"]
        lines.append(f"## {r['scenario']}")
        lines.append("")
        lines.append(f"{r['what']}.")
        lines.append("")
        lines.append(f"![{r['scenario']}](autoscaling/{r['scenario']}.png)")
        lines.append("")
        if r["refused_by_reason"]:
            lines.append("")
            lines.append("Refused: " + ", ".join(f"{n} {k}" for k, n in r["refused_by_reason"].items()) + ".")
            lines.append("")
        lines.append("Decisions: " + ("; ".join(f"{d['t']:.0f} s {d['by']} {d['from']}->{d['to']} (metric {d['metric']:g})" for d in r["decisions"]) or "none: the metric never asked for more generators."))
        if drained:
            busy = sum(1 for p in drained if p["busy_at_sigterm"])
            codes = sorted({p["exit_code"] for p in drained}, key=str)
            lines.append("")
            lines.append(f"Scale-in: {len(drained)} pods sent SIGTERM, {busy} of them with streams running; exit codes {codes}.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help=f"some of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--compress", type=float, default=10.0, help="divide the windows and cooldown by this")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.scenarios = args.scenarios or list(SCENARIOS)
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"no scenario {', '.join(sorted(unknown))}; there are {', '.join(SCENARIOS)}")
    out = args.out / "autoscaling"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.scenarios:
        print(f"scenario {name} ...", flush=True)
        result = asyncio.run(drill(SCENARIOS[name], REPO / ".cache" / "bench-autoscaling" / name, args.compress))
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, out / f"{name}.png")
        print(json.dumps({k: v for k, v in result.items() if k not in ("timeline", "policy", "trigger")}, indent=1), flush=True)
        results.append(result)
    # The report covers every scenario with results, from this run or an earlier one.
    results = [json.loads((out / f"{name}.json").read_text()) for name in SCENARIOS if (out / f"{name}.json").exists()]
    (args.out / "autoscaling.md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
