"""Typed settings of the API pod, read from environment variables."""

from __future__ import annotations

from enum import Enum

from pydantic import AliasChoices, Field, SecretStr, model_validator

from services.common.contract import GENERATOR_HEARTBEAT_SECONDS
from services.common.settings import CommonSettings

#: Shortest renewal interval (a third of LEASE_SECONDS) that leaves room for a round trip.
RENEW_RETRY_FLOOR_SECONDS = 0.1


class ResponseFormat(str, Enum):
    """How ``/chat_stream`` frames the reply for clients that do not ask for SSE."""

    PLAIN = "plain"  # text/plain deltas, chunked
    CHATSTREAM = "chatstream"  # ChatStream 0.3 framing: the whole reply so far + "<::EOS::>" per chunk


class Environment(str, Enum):
    """Where the pod runs: production refuses settings that are only fit for a laptop."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


#: Secret used when SESSION_SECRET is not set; fine on a laptop, refused in production.
DEV_SESSION_SECRET = "chatstream-local-development-secret"

#: Shortest SESSION_SECRET accepted in production.
MIN_SESSION_SECRET_CHARS = 16


class ApiSettings(CommonSettings):
    """Everything an API pod can be configured with."""

    api_host: str = Field("127.0.0.1", description="Address the HTTP server binds (0.0.0.0 in containers).")
    api_port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP server.")
    response_format: ResponseFormat = Field(
        ResponseFormat.PLAIN, description="Default framing of /chat_stream: plain or chatstream (SSE when the client sends Accept: text/event-stream)."
    )
    api_internal_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port that serves /metrics, /healthz and /readyz apart from the API, so an ingress that exposes the API does not expose them (0 = serve them on API_PORT; the chart sets 9000).",
    )
    environment: Environment = Field(
        Environment.DEVELOPMENT,
        description="development (a fixed session secret and anonymous access are fine) or production (refuse to start without real SESSION_SECRETS and API keys, secure cookies).",
    )
    allow_anonymous: bool = Field(
        False,
        description="With ENVIRONMENT=production, start without API_KEYS/API_KEYS_FILE (anyone who reaches the API may use it); otherwise production refuses to start.",
    )
    session_secrets: SecretStr = Field(
        DEV_SESSION_SECRET,  # type: ignore[assignment]  # a SecretStr, so repr() and logs never show it
        validate_default=True,
        validation_alias=AliasChoices("session_secrets", "session_secret"),
        description="Comma-separated keys that sign session cookies (HMAC-SHA-256 with a timestamp); the first signs, all verify, so a key is rotated without logging anyone out by putting the new one first and dropping the old one a TTL later. SESSION_SECRET (one key) is read too. Required with ENVIRONMENT=production.",
    )
    session_cookie: str = Field("sid", description="Name of the session cookie.")
    session_cookie_secure: bool = Field(
        False,
        description="Mark the session cookie Secure even when the request arrived over plain HTTP (e.g. behind a TLS-terminating ingress); always on with ENVIRONMENT=production.",
    )
    session_ttl_seconds: int = Field(
        86400, ge=60, description="A session's history expires after this long unused, and so does its cookie's signature (checked on the server; every reply re-signs it)."
    )
    session_redis_url: str = Field(
        "",
        description="Redis for the chat sessions alone (its own memory limit and eviction policy); empty = REDIS_URL.",
    )
    history_max_turns: int = Field(
        20,
        ge=0,
        description="Most recent exchanges sent to the generator as context; it keeps the newest that fit the model's context (see HISTORY_MAX_TOKENS).",
    )
    history_max_tokens: int = Field(
        0,
        ge=0,
        description="Most tokens of history in a prompt, counted by the generator's tokenizer; older turns are dropped beyond it (0 = as many as the model's context leaves after the reply's max_new_tokens).",
    )
    history_max_bytes: int = Field(
        131072,
        ge=1024,
        description="Largest stored history of one session in bytes (UTF-8 JSON); the oldest turns are dropped beyond it (the newest is always kept).",
    )
    system_prompt: str = Field("", description="Optional system message placed before every conversation.")
    allow_client_system_prompt: bool = Field(
        False,
        description="Let a system message of a /v1/chat/completions request replace SYSTEM_PROMPT; by default SYSTEM_PROMPT stays first and the client's follows it.",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest request body accepted by /chat_stream (HTTP 413 beyond, refused from Content-Length before it is read whole; a body of up to 8 MiB is read and dropped first, for at most 5 s, so that a client that writes its whole body before reading gets the 413 rather than a reset connection; a larger one is answered at once)."
    )
    max_input_chars: int = Field(8000, ge=1, description="Longest user_input accepted (HTTP 422 beyond).")
    max_concurrent_generations: int = Field(
        2, ge=1, description="Generation permits shared by all API pods (cluster-wide concurrency limit)."
    )
    admission_follows_generators: bool = Field(
        False,
        description="When true, the cluster-wide permit limit is the smaller of MAX_CONCURRENT_GENERATIONS and the total GENERATOR_SLOTS of the live generators (each registers its slots), so admission follows the fleet as it scales.",
    )
    max_queue_size: int = Field(
        32, ge=0, description="Requests that may wait for a permit, cluster-wide; beyond it, HTTP 429."
    )
    queue_timeout_seconds: float = Field(
        60.0, gt=0.0, description="A request that waits longer than this for a permit gets HTTP 503 (queue_timeout)."
    )
    lease_seconds: float = Field(
        10.0,
        gt=0.0,
        description="Lease of a permit or queue place; renewed every third of it while the request lives (and retried "
        "within 0.25 s when Redis does not answer), so a dead pod's permits return within this and a Redis failover "
        "shorter than two thirds of it costs no generation its permit.",
    )
    retry_after_seconds: int = Field(2, ge=0, description="Retry-After sent with HTTP 429.")
    request_timeout_seconds: float = Field(
        300.0, gt=0.0, description="Deadline of a whole request (queue wait + generation); past it the client gets request_timeout (HTTP 504 before the first token) and the generation stops."
    )
    resume_grace_seconds: float = Field(
        10.0,
        ge=0.0,
        description="When the client of a started /chat_stream reply leaves, the generation goes on this long for it to resume (GET /chat_stream/{request_id}, any pod); then it stops (0 = stop at once).",
    )
    resume_retention_seconds: float = Field(
        60.0,
        ge=0.0,
        description="A finished request's events stay readable this long, for a client that lost the last ones; then its stream is deleted (0 = at once).",
    )
    send_timeout_seconds: float = Field(
        30.0,
        gt=0.0,
        description="A client that reads nothing for this long while the server has bytes for it is disconnected (a resumable reply then goes on for RESUME_GRACE_SECONDS), so stalled readers cannot make the API buffer without bound.",
    )
    generator_silence_seconds: float = Field(
        2.5, gt=0.0, description="A started generation that writes nothing (not even a heartbeat) for this long is declared dead."
    )
    stream_reader_stall_seconds: float = Field(
        30.0,
        ge=0.0,
        description="Watchdog: /healthz answers 503 (and Kubernetes restarts the pod) when the stream reader has had "
        "streams to read but no read has returned or failed for this long (0 = off). Redis being unreachable does not count. "
        "At least 2 × (2 s + REDIS_SOCKET_TIMEOUT_SECONDS) + 1.5 s.",
    )
    relay_max_read_pause_ms: float = Field(
        10.0,
        ge=0.0,
        description="Under load the stream reader pauses between reads (1 ms per 100 open streams, at most this) so one read carries many tokens; 0 disables pacing.",
    )
    model_name: str = Field(
        "default", description="Model id reported by GET /v1/models and in OpenAI-style replies that name no model."
    )
    openai_max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest body accepted by POST /v1/chat/completions, which carries the whole conversation (HTTP 413 body_too_large beyond)."
    )
    api_keys: SecretStr = Field(
        "",  # type: ignore[assignment]  # validated into a SecretStr, so repr() and logs never show keys
        validate_default=True,
        description="Comma-separated API keys; when any key is configured (here, in API_KEYS_FILE or in TENANTS_FILE), every route but health, readiness, metrics and the web page needs Authorization: Bearer <key>."
    )
    api_keys_file: str = Field(
        "", description="File with more API keys, one per line (e.g. a mounted Kubernetes Secret); re-read when it changes. A file that cannot be read stops the start."
    )
    tenants_file: str = Field(
        "",
        description="YAML file of tenants (their API keys, weight, priority, max_concurrent, max_queued, tokens_per_minute; see docs/tenants.md) that share the generation permits fairly; re-read when it changes. Empty: one default tenant.",
    )
    batch_every_grants: int = Field(
        10,
        ge=0,
        description="While a batch tenant waits, at least every Nth permit goes to a batch request, so batch never starves (0 = batch waits until no interactive request does).",
    )
    cors_allow_origins: str = Field(
        "",
        description="Comma-separated origins allowed to call the API from a browser (CORS), and to send cookie-authenticated POSTs (/chat_stream, /clear_context); empty = only the API's own origin, * = any.",
    )

    @property
    def session_secret_list(self) -> list[str]:
        """SESSION_SECRETS as a list, newest (the one that signs) first."""
        return [s.strip() for s in self.session_secrets.get_secret_value().split(",") if s.strip()]

    @property
    def allowed_origins(self) -> frozenset[str]:
        """CORS_ALLOW_ORIGINS as a set (``*`` for any origin)."""
        return frozenset(o.strip() for o in self.cors_allow_origins.split(",") if o.strip())

    @property
    def sessions_redis_url(self) -> str:
        """Where sessions live: SESSION_REDIS_URL, or REDIS_URL when it is empty."""
        return self.session_redis_url or self.redis_url

    @property
    def cookie_always_secure(self) -> bool:
        """Whether the session cookie is Secure whatever the request's scheme."""
        return self.session_cookie_secure or self.environment is Environment.PRODUCTION

    @model_validator(mode="after")
    def _timings_fit_together(self) -> ApiSettings:
        """Relations between the timing settings that, broken, would end healthy
        generations: say so at start-up instead."""
        if self.generator_silence_seconds < 1.5 * GENERATOR_HEARTBEAT_SECONDS:
            raise ValueError(
                f"GENERATOR_SILENCE_SECONDS ({self.generator_silence_seconds:g}) must be at least 1.5 times the "
                f"generators' heartbeat ({GENERATOR_HEARTBEAT_SECONDS:g}s), or a late heartbeat ends a healthy stream"
            )
        # One turn of the reader: the doorbell's refresh, then a read blocking up to
        # 1 s on top of its timeout, then at most a 0.5 s pause before the retry.
        self.check_stall_limit("STREAM_READER_STALL_SECONDS", self.stream_reader_stall_seconds, 2, 1.5)
        if self.lease_seconds < 3 * RENEW_RETRY_FLOOR_SECONDS:
            raise ValueError(
                f"LEASE_SECONDS ({self.lease_seconds:g}) must be at least {3 * RENEW_RETRY_FLOOR_SECONDS:g}: "
                "it is renewed every third of it, over a Redis round trip"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_secrets_and_keys(self) -> ApiSettings:
        """Production mode refuses what is only fit for a laptop: the development
        secret (anyone could forge sessions with it) and, unless said explicitly,
        an API open to anyone who reaches it."""
        if self.environment is not Environment.PRODUCTION:
            return self
        secrets = self.session_secret_list
        if not secrets or any(s == DEV_SESSION_SECRET or len(s) < MIN_SESSION_SECRET_CHARS for s in secrets):
            raise ValueError(
                "ENVIRONMENT=production needs SESSION_SECRETS (or SESSION_SECRET) set to random values of at least "
                f"{MIN_SESSION_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`), not the development default"
            )
        keys = self.api_keys.get_secret_value().strip() or self.api_keys_file or self.tenants_file
        if not keys and not self.allow_anonymous:
            raise ValueError(
                "ENVIRONMENT=production needs API_KEYS, API_KEYS_FILE or TENANTS_FILE; set ALLOW_ANONYMOUS=true to let anyone "
                "who reaches the API use it"
            )
        return self
