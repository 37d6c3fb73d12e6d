"""Prometheus metrics of an API pod (``GET /metrics``).

Latencies are measured where the client sees them: time to first token from
the moment the request was accepted, inter-token gaps between the chunks sent.
Cluster-wide gauges (permits in use, requests waiting) are read from Redis at
scrape time, so every API pod reports the same, true value.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response

from services.api.load import permit_limit
from services.common.contract import QUEUE_NAME
from services.common.semaphore import RedisSemaphore

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

TIME_TO_FIRST_TOKEN = Histogram(
    "chatstream_time_to_first_token_seconds",
    "From accepting a request to sending its first token.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "chatstream_inter_token_latency_seconds",
    "Gap between two consecutive token chunks sent to a client.",
    buckets=_GAP_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "chatstream_queue_wait_seconds",
    "Time a request waited for a generation permit.",
    # Finer above 10 s, where a spike's waits fall while the autoscaler adds generators.
    buckets=_LATENCY_BUCKETS[:-2] + (15, 20, 30, 45, 60, 90, 120),
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "chatstream_request_duration_seconds",
    "End-to-end duration of an accepted request, until its response ended.",
    buckets=_LATENCY_BUCKETS + (120, 300),
    registry=REGISTRY,
)
REQUESTS = Counter(
    "chatstream_requests_total",
    "Requests by outcome: the callback message for accepted ones, rejected (429) or invalid (4xx) otherwise.",
    ["outcome"],
    registry=REGISTRY,
)
CALLBACKS = Counter(
    "chatstream_callbacks_total", "Callbacks fired, by message.", ["message"], registry=REGISTRY
)
ERRORS = Counter(
    "chatstream_stream_errors_total", "Streams that ended with an error, by error code.", ["code"], registry=REGISTRY
)
TOKENS_RELAYED = Counter(
    "chatstream_tokens_relayed_total", "Token chunks relayed to clients.", registry=REGISTRY
)
STREAMS_HANDED_OFF = Counter(
    "chatstream_streams_handed_off_total",
    "SSE streams a draining (SIGTERM) pod ended with a reconnect event, for their clients to resume elsewhere.",
    registry=REGISTRY,
)
SEND_TIMEOUTS = Counter(
    "chatstream_send_timeouts_total",
    "Connections ended because the client took nothing for SEND_TIMEOUT_SECONDS.",
    registry=REGISTRY,
)
PERMITS_IN_USE = Gauge(
    "chatstream_permits_in_use", "Generation permits held, cluster-wide (read from Redis).", registry=REGISTRY
)
PERMITS_LIMIT = Gauge(
    "chatstream_permits_limit",
    "Generation permits there are now, cluster-wide: MAX_CONCURRENT_GENERATIONS, or with ADMISSION_FOLLOWS_GENERATORS "
    "the smaller of it and the live generators' slots.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "chatstream_queue_depth", "Requests waiting for a permit, cluster-wide (read from Redis).", registry=REGISTRY
)
JOBS_QUEUED = Gauge(
    "chatstream_jobs_queued",
    "Jobs in the generators' arq queue (waiting or running), cluster-wide; what autoscaling reads.",
    registry=REGISTRY,
)
TENANT_PERMITS_IN_USE = Gauge(
    "chatstream_tenant_permits_in_use",
    "Generation permits held, by tenant (its name in TENANTS_FILE, or default), cluster-wide.",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_QUEUE_DEPTH = Gauge(
    "chatstream_tenant_queue_depth",
    "Requests waiting for a permit, by tenant, cluster-wide.",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_REJECTIONS = Counter(
    "chatstream_tenant_rejections_total",
    "Requests refused before admission, by tenant and reason (queue_full, tenant_queue_full, tenant_quota_exceeded).",
    ["tenant", "reason"],
    registry=REGISTRY,
)
REDIS_UP = Gauge("chatstream_redis_up", "1 when Redis answered the last scrape.", registry=REGISTRY)


async def metrics_response(redis: Redis, semaphore: RedisSemaphore) -> Response:
    """The Prometheus exposition, with the cluster-wide gauges refreshed from Redis."""
    try:
        counts = await semaphore.tenant_counts()
        jobs = await redis.zcard(QUEUE_NAME)
        limit, _ = await permit_limit(redis, semaphore)
    except RedisError:
        REDIS_UP.set(0)
    else:
        REDIS_UP.set(1)
        PERMITS_IN_USE.set(counts.in_use)
        PERMITS_LIMIT.set(limit)
        QUEUE_DEPTH.set(counts.waiting)
        JOBS_QUEUED.set(jobs)
        # Only the tenants that hold or wait now: an idle one's series goes, not stays at its last value.
        TENANT_PERMITS_IN_USE.clear()
        TENANT_QUEUE_DEPTH.clear()
        for tenant, (held, queued) in counts.tenants.items():
            TENANT_PERMITS_IN_USE.labels(tenant=tenant).set(held)
            TENANT_QUEUE_DEPTH.labels(tenant=tenant).set(queued)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def count_refused(status: int) -> None:
    """Count a request answered with an error before it was accepted."""
    outcome = "rejected" if status == 429 else "unavailable" if status >= 500 else "invalid"
    REQUESTS.labels(outcome=outcome).inc()
