"""Prometheus metrics of a generator pod, served on its own port (``METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

TOKENS_GENERATED = Counter(
    "chatstream_generator_tokens_generated_total", "Text deltas generated and published.", registry=REGISTRY
)
TENANT_TOKENS = Counter(
    "chatstream_generator_tenant_tokens_total",
    "Tokens generated, by the request's tenant (its name in TENANTS_FILE, or default).",
    ["tenant"],
    registry=REGISTRY,
)
TIME_PER_TOKEN = Histogram(
    "chatstream_generator_time_per_token_seconds",
    "Time between two consecutive tokens of one generation (decode step as the client will see it).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chatstream_generator_time_to_first_token_seconds",
    "From starting a job to its first token (prompt processing).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS_ABANDONED = Counter(
    "chatstream_generator_jobs_abandoned_total",
    "Generations stopped because no client read them any more: the client left and did not resume within "
    "RESUME_GRACE_SECONDS, or the API pod serving it died (whose callback then never fires).",
    registry=REGISTRY,
)
ACTIVE_JOBS = Gauge("chatstream_generator_active_jobs", "Generations running now.", registry=REGISTRY)
JOBS = Counter("chatstream_generator_jobs_total", "Jobs by outcome (finish reason or error code).", ["outcome"], registry=REGISTRY)
JOBS_REJECTED = Counter(
    "chatstream_generator_jobs_rejected_total",
    "Jobs found in the queue that are not generation jobs of this contract (not JSON, another function, "
    "bad fields) and were removed without running.",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("not_json", "unknown_function", "bad_schema"):
    JOBS_REJECTED.labels(reason=_reason)  # exported as 0 from the start, so alerts can rate() it
JOBS_ORPHANED = Counter(
    "chatstream_generator_jobs_orphaned_total",
    "Jobs removed from the queue without running because the worker that took them is gone (their in-progress "
    "key outlived it) and so is their request's permit.",
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "chatstream_generator_model_load_seconds", "Time it took to load the model at start-up.", registry=REGISTRY
)
STALLED = Gauge(
    "chatstream_generator_stalled",
    "1 while the watchdog finds the engine or the job loop stuck (GENERATOR_STALL_SECONDS): the pod takes no jobs, "
    "has withdrawn its registration and waits for Kubernetes to restart it.",
    registry=REGISTRY,
)
SLOTS = Gauge("chatstream_generator_slots", "Concurrent generations this pod accepts (GENERATOR_SLOTS).", registry=REGISTRY)


def serve_metrics(port: int) -> None:
    """Expose the metrics over HTTP on ``port`` (0 = do not serve), in a background thread."""
    if port:
        start_http_server(port, registry=REGISTRY)
PREFIX_CACHE_PROMPT_TOKENS = Counter(
    "chatstream_generator_prefix_cache_prompt_tokens_total",
    "Prompt tokens looked up in the prefix cache (PREFIX_CACHE_MB).",
    registry=REGISTRY,
)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "chatstream_generator_prefix_cache_hit_tokens_total",
    "Prompt tokens whose key/value cache came from the prefix cache instead of a prefill.",
    registry=REGISTRY,
)
PREFIX_CACHE_HITS = Counter(
    "chatstream_generator_prefix_cache_hits_total",
    "Prompts that started from a cached prefix (a follow-up turn served where its conversation was kept).",
    registry=REGISTRY,
)
PREFIX_CACHE_BYTES = Gauge(
    "chatstream_generator_prefix_cache_bytes", "Memory the prefix cache holds now.", registry=REGISTRY
)
