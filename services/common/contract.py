"""The wire contract between the API pod and the generator pods.

Everything that crosses Redis between the two services is defined here and only
here: key names, the arq queue and function, the job's arguments, the schema of
the entries in a request's token stream, and the trace-context field. Both
services import this module; nothing else spells a key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field, fields
from enum import Enum, StrEnum
from typing import Annotated, Any, Final, Literal

from annotated_types import Ge, Gt, Le, Len
from pydantic import StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

#: Every key this service writes starts with this prefix, so one Redis can be shared.
KEY_PREFIX = "chatstream"

#: The arq queue (a sorted set of job ids) that generator pods consume. KEDA's
#: redis scaler can read its depth with ZCARD.
QUEUE_NAME = f"{KEY_PREFIX}:queue"

#: The arq function name of a generation job.
GENERATE_FUNCTION: Final = "generate"

#: Pub/sub channel the API publishes on right after enqueueing, so idle workers
#: start the job within milliseconds instead of waiting for arq's next poll.
WAKE_CHANNEL = f"{KEY_PREFIX}:wake"

#: Sorted set of live generator workers, scored by the Redis time (seconds) at
#: which their registration expires unless renewed.
GENERATORS_KEY = f"{KEY_PREFIX}:generators"

#: Hash of each registered generator's capacity (its GENERATOR_SLOTS).
GENERATOR_SLOTS_KEY = f"{KEY_PREFIX}:generator_slots"

#: Hash of each registered generator's :class:`GeneratorInfo` (JSON): its model,
#: sampling defaults and limits, which the API shows and validates against without
#: knowing the generators' settings. Written and purged with the registration.
GENERATOR_INFO_KEY = f"{KEY_PREFIX}:generator_info"


def stream_key(request_id: str) -> str:
    """Redis Stream that carries one request's events from generator to API."""
    return f"{KEY_PREFIX}:stream:{request_id}"


def reader_wake_key(reader_id: str) -> str:
    """Doorbell stream of one API stream reader. A generator appends a request's
    stream key here (field ``DOORBELL_FIELD``) with every entry it writes to that
    stream, when the job names it as ``notify_key``: the reader then reads only the
    streams that changed, not every open one. The API itself appends to wake its
    blocked read when a stream whose writer does not ring must join it."""
    return f"{KEY_PREFIX}:reader-wake:{reader_id}"


#: Field of a doorbell entry that names the request stream written to.
DOORBELL_FIELD = "s"

#: Entries kept per doorbell (approximate MAXLEN). A reader further behind than this
#: reads all its streams once instead (it notices from the size of its read).
DOORBELL_MAXLEN = 10_000


def cancel_key(request_id: str) -> str:
    """Key whose existence tells the generator to stop the request's generation."""
    return f"{KEY_PREFIX}:cancel:{request_id}"


def readers_key(request_id: str) -> str:
    """Key that exists while some client reads, or may come back to read, the request's
    stream: every API pod relaying it keeps it alive, and one whose client left lets
    it expire after ``RESUME_GRACE_SECONDS``. A job that names it (``readers_key``)
    stops when it is gone: nobody is left to read the reply."""
    return f"{KEY_PREFIX}:readers:{request_id}"


def request_key(request_id: str) -> str:
    """Hash of what an API pod needs to serve a request it did not accept (a resumed
    stream): who may read it and the exchange's session fields. Only API pods use it."""
    return f"{KEY_PREFIX}:request:{request_id}"


def quota_key(tenant: str) -> str:
    """A tenant's token budget (``tokens_per_minute``): the generator charges each
    job's generated tokens to it, the API checks it before admitting a request
    (``services.common.quota``)."""
    return f"{KEY_PREFIX}:quota:{tenant}"


def outcome_key(request_id: str) -> str:
    """Set once (``SET NX``) by the API pod that reports the request's end, so that
    of all the pods that served its connections exactly one fires the callback and
    records the turn. Only API pods use it."""
    return f"{KEY_PREFIX}:outcome:{request_id}"


#: Format of a stream cursor: a Redis Stream entry id (``SSE id:``, ``Last-Event-ID``).
#: A request's generator, its stream's only writer, numbers the entries itself: the
#: n-th is ``0-n`` (``services.generator.publisher``), so that a retried write is
#: never doubled and a stream can be completed again after a failover.
CURSOR_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"

#: The cursor before a stream's first entry.
STREAM_START = "0-0"


#: The keys of a semaphore every one of its scripts gets, in this order (``services.common.semaphore``).
SEMAPHORE_KEY_NAMES = (
    "holders", "tokens", "fence", "waiters", "seq", "owner", "inuse", "tenants", "vtime", "vclock",
    "active:interactive", "active:batch", "activeweight", "batchdebt",
)


@dataclass(frozen=True)
class SemaphoreKeys:
    """The Redis keys of one named semaphore (the generator needs ``holders`` and
    ``tokens`` to check fencing tokens)."""

    name: str

    def _key(self, part: str) -> str:
        return f"{KEY_PREFIX}:sem:{self.name}:{part}"

    @property
    def holders(self) -> str:
        return self._key("holders")

    @property
    def tokens(self) -> str:
        return self._key("tokens")

    @property
    def waiters(self) -> str:
        return self._key("waiters")

    @property
    def owner(self) -> str:
        return self._key("owner")

    @property
    def inuse(self) -> str:
        return self._key("inuse")

    def queue(self, tenant: str) -> str:
        """A tenant's FIFO queue."""
        return self.queue_prefix + tenant

    @property
    def queue_prefix(self) -> str:
        return self._key("q:")

    @property
    def released_channel(self) -> str:
        return self._key("released")

    @property
    def all(self) -> list[str]:
        """The keys every script gets (``SEMAPHORE_KEY_NAMES``); the tenants' queues come on top."""
        return [self._key(name) for name in SEMAPHORE_KEY_NAMES]


#: The semaphore that caps concurrent generations across the cluster.
GENERATIONS = SemaphoreKeys("generations")


def prefix_holder_key(conversation: str) -> str:
    """String naming the generator that holds the key/value cache of a conversation
    (``conversation_digest``), written by that generator when a reply is complete."""
    return f"{KEY_PREFIX}:prefix:holder:{conversation}"


#: How long a generator's claim on a conversation (``prefix_holder_key``) lasts; a
#: claim that outlives the cache entry costs the next turn one affinity wait.
PREFIX_HOLDER_TTL_SECONDS = 1800


def affinity_key(request_id: str) -> str:
    """String naming the generator a queued job should go to first, and Redis's time
    (ms) of the enqueue: ``"<worker id> <ms>"``. Written with the job when its
    conversation's cache is held somewhere (``prefix_holder_key``)."""
    return f"{KEY_PREFIX}:affinity:{request_id}"


def conversation_digest(tenant: str, messages: list[ChatMessage]) -> str:
    """A conversation's identity for prefix affinity: the API names the history a job
    continues (its messages but the last), the generator the conversation a reply
    completes (the job's messages and the reply), and the two meet when the next turn
    comes. Salted by the tenant: the same words in two tenants are two conversations."""
    canonical = json.dumps([tenant, [[m.role, m.content] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def session_key(session_id: str) -> str:
    """Redis list holding a chat session's history, one JSON turn per element."""
    return f"{KEY_PREFIX}:session:{session_id}"


def session_params_key(session_id: str) -> str:
    """Redis hash of a chat session's own generation settings (field → JSON value).
    Under the session's prefix: it lives where the history does (SESSION_REDIS_URL)
    and the same ACL grants cover it."""
    return f"{KEY_PREFIX}:session:{session_id}:params"


def new_request_id() -> str:
    """A fresh 128-bit random request id (also the arq job id), as 32 hex digits."""
    return secrets.token_hex(16)


#: Most stop strings per request, and the longest one (characters): OpenAI's count,
#: and a length that keeps the generator's per-token matching cheap.
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256

StopStrings = Annotated[list[Annotated[str, Len(1, MAX_STOP_STRING_CHARS)]], Len(0, MAX_STOP_STRINGS)]
Role = Literal["system", "user", "assistant"]
RequestId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


# The values each sampling parameter may take, wherever it is set (a session's
# settings, a job): the API refuses others with 422 and describes these ranges to
# clients (GET /generation_params); a generator rejects a job outside them.
# max_new_tokens is further capped by each generator's MAX_NEW_TOKENS_LIMIT, which
# it publishes in its GeneratorInfo.
MaxNewTokens = Annotated[int, Ge(1)]
Temperature = Annotated[float, Ge(0), Le(2)]  # OpenAI's range
TopP = Annotated[float, Gt(0), Le(1)]
TopK = Annotated[int, Ge(0)]  # 0 = off
RepetitionPenalty = Annotated[float, Gt(0)]  # 1 = off
Seed = Annotated[int, Ge(0), Le(2**63 - 1)]  # what torch.Generator.manual_seed takes, and JSON numbers keep


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; ``None`` means "the generator's default"."""

    max_new_tokens: MaxNewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: StopStrings = field(default_factory=list)
    #: Seeds this request's sampling, so the same request gives the same reply (on the
    #: same generator, model and batch composition); ``None``: unseeded.
    seed: Seed | None = None


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, in the roles of chat templates."""

    role: Role
    content: str


@dataclass(frozen=True)
class Lease:
    """The admission permit a job runs under: the generator writes to the stream
    only while ``holder_id`` still holds a live permit with this fencing token
    (see ``services.common.semaphore``)."""

    holder_id: str
    fencing_token: int
    #: The lease's length. A generator that runs the job renews it every third of
    #: this while it generates and releases it when it has written the terminal entry,
    #: so the permit belongs to the generation, not to the API pod that took the
    #: request. 0: the API renews it (jobs of APIs before this field).
    seconds: Annotated[float, Ge(0)] = 0.0


@dataclass(frozen=True)
class Quota:
    """The token budget a job's generated tokens are charged to, when it has one:
    ``quota_key(tenant)`` and the tenant's ``tokens_per_minute``."""

    key: str
    tokens_per_minute: Annotated[int, Ge(1)]


@dataclass(frozen=True)
class HistoryWindow:
    """Which messages of a job are a conversation's history, and how much of it to keep.

    The ``turns`` (user, assistant) pairs right before the job's last message are
    history: the generator drops them oldest first until the prompt plus the reply's
    ``max_new_tokens`` fit the model's context and the history is at most
    ``max_tokens`` tokens (0 = no cap of its own). It counts with its own tokenizer
    and chat template, which the API does not have. The system prompt and the last
    message are always kept. ``turns=0``: nothing may be dropped (the OpenAI routes,
    whose client owns the conversation, and jobs of APIs that predate this field).
    """

    turns: Annotated[int, Ge(0)] = 0
    max_tokens: Annotated[int, Ge(0)] = 0


@dataclass(frozen=True)
class GenerationJob:
    """The arguments of one generation job, passed to arq as a plain dict.

    ``trace_context`` carries the W3C ``traceparent``/``tracestate`` of the API's
    span (written by ``opentelemetry.propagate.inject``), so the generator's span
    continues the caller's trace.
    """

    request_id: RequestId
    messages: Annotated[list[ChatMessage], Len(1)]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    trace_context: dict[str, str] = field(default_factory=dict)
    lease: Lease | None = None
    #: The reading API's doorbell (``reader_wake_key``): every entry written to the
    #: request's stream is announced there. '' for none.
    notify_key: str = ""
    history: HistoryWindow = field(default_factory=HistoryWindow)
    #: ``readers_key(request_id)`` when the generation must stop once no client reads
    #: it any more (the key expired); '' to run until done or cancelled.
    readers_key: str = ""
    #: The tenant's token budget its generated tokens count against; None: no quota.
    quota: Quota | None = None
    #: The name of the request's tenant (metrics and spans; never its key).
    tenant: str = ""
    #: ``conversation_digest`` of the history this job continues: a generator that kept
    #: that conversation's cache gets the first claim on the job. '' for none.
    continues: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form sent through arq (as JSON: see :func:`serialize_job`).

        The same as ``dataclasses.asdict``, built directly: asdict's generic deep copy
        was half of the cost of enqueueing a job with a long history."""
        sampling = self.sampling
        return {
            "request_id": self.request_id,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "sampling": {f.name: getattr(sampling, f.name) for f in _SAMPLING_FIELDS} | {"stop": list(sampling.stop)},
            "trace_context": dict(self.trace_context),
            "lease": _lease_dict(self.lease),
            "notify_key": self.notify_key,
            "history": {"turns": self.history.turns, "max_tokens": self.history.max_tokens},
            "readers_key": self.readers_key,
            "quota": None if self.quota is None else {"key": self.quota.key, "tokens_per_minute": self.quota.tokens_per_minute},
            "tenant": self.tenant,
            "continues": self.continues,
        }


def _lease_dict(lease: Lease | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"holder_id": lease.holder_id, "fencing_token": lease.fencing_token, "seconds": lease.seconds}


_SAMPLING_FIELDS = fields(SamplingParams)


class _ArqJob(TypedDict):
    """arq's envelope of a job (``arq.jobs.serialize_job``), as the generator accepts it."""

    t: int | None  # the try
    f: Literal[GENERATE_FUNCTION]
    a: tuple[GenerationJob]
    k: Annotated[dict[str, Any], Len(0, 0)]
    et: int  # enqueue time (ms)


_ARQ_JOB = TypeAdapter(_ArqJob)


class JobRejected(ValueError):
    """A job that is not a generation job of this contract; it must not run.

    ``reason`` is a metric label: ``not_json``, ``unknown_function`` or ``bad_schema``.
    ``detail`` names the offending fields but never echoes their values (they may be
    a user's text, or an attacker's payload)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def serialize_job(data: dict[str, Any]) -> bytes:
    """arq's ``job_serializer`` on both sides: JSON, never pickle.

    arq pickles by default, and unpickling runs code: anyone who can write a key
    into Redis would run code in every generator pod. A job is plain data
    (:meth:`GenerationJob.to_dict`). arq also serializes a failed job's result
    with this (an exception, kept nowhere since ``keep_result=0``): ``str`` it.
    """
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def deserialize_job(raw: bytes) -> dict[str, Any]:
    """arq's ``job_deserializer``: the envelope of a generation job, whose one
    argument is already a validated :class:`GenerationJob`; raises
    :class:`JobRejected` for anything else (a pickle, another function, bad fields).

    Fields this version does not know are ignored: a newer API may send them to an
    older generator during a rolling upgrade."""
    try:
        envelope = dict(_ARQ_JOB.validate_json(raw))
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise JobRejected("not_json", "the job is not JSON") from None
        if any(e["loc"][:1] == ("f",) for e in errors):
            raise JobRejected("unknown_function", f"the only job function is {GENERATE_FUNCTION!r}") from None
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in errors[:5])
        raise JobRejected("bad_schema", detail) from None
    job: GenerationJob = envelope["a"][0]
    if job.lease is None:
        # Every write a generator makes is fenced by the permit the job runs under.
        raise JobRejected("bad_schema", "a.0.lease: a job must carry the lease of its permit")
    if 2 * job.history.turns + 1 > len(job.messages):
        raise JobRejected("bad_schema", "a.0.history.turns: more history turns than the job has messages")
    return envelope


class ErrorCode(StrEnum):
    """Why a request's generation ended in an error: the ``code`` of an ``error`` stream
    entry and of the client's error event or JSON body. A client (and an API pod of an
    older version) may meet codes it does not know: :func:`http_status_for` answers 500
    for those."""

    #: The prompt does not fit the model's context (the generator's tokenizer counts).
    PROMPT_TOO_LONG = "prompt_too_long"
    #: The generator stopped writing (no heartbeat within GENERATOR_SILENCE_SECONDS).
    GENERATOR_LOST = "generator_lost"
    #: The job left the queue without any generator starting it (rejected, expired).
    JOB_LOST = "job_lost"
    #: Redis could not be reached for what the request needed at that moment.
    REDIS_UNAVAILABLE = "redis_unavailable"
    #: No permit within QUEUE_TIMEOUT_SECONDS.
    QUEUE_TIMEOUT = "queue_timeout"
    #: The request's permit expired under the generator; it stopped.
    LEASE_LOST = "lease_lost"
    #: The generator was shut down past its drain time.
    GENERATOR_SHUTDOWN = "generator_shutdown"
    #: The generator's watchdog found its engine stuck; it restarts.
    GENERATOR_STALLED = "generator_stalled"
    #: The request ran past its deadline.
    REQUEST_TIMEOUT = "request_timeout"
    #: The engine failed (details in the generator's log and trace, not sent).
    GENERATION_FAILED = "generation_failed"
    #: The API failed relaying the reply.
    INTERNAL_ERROR = "internal_error"

    @property
    def http_status(self) -> int:
        """The HTTP status to answer with when nothing of the reply was sent yet."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.PROMPT_TOO_LONG: 422,
    ErrorCode.GENERATOR_LOST: 503,
    ErrorCode.JOB_LOST: 503,
    ErrorCode.REDIS_UNAVAILABLE: 503,
    ErrorCode.QUEUE_TIMEOUT: 503,
    ErrorCode.LEASE_LOST: 503,
    ErrorCode.GENERATOR_SHUTDOWN: 503,
    ErrorCode.GENERATOR_STALLED: 503,
    ErrorCode.REQUEST_TIMEOUT: 504,
    ErrorCode.GENERATION_FAILED: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}


def http_status_for(code: str) -> int:
    """:attr:`ErrorCode.http_status` of ``code``; 500 for a code this version does not know."""
    try:
        return ErrorCode(code).http_status
    except ValueError:
        return 500


class EventType(str, Enum):
    """Kinds of entries in a request's stream, in the order they can appear."""

    START = "start"  # a generator picked the job up
    TOKEN = "token"  # a decoded text delta
    HEARTBEAT = "heartbeat"  # the generator is alive but has nothing new (e.g. long prefill)
    DONE = "done"  # terminal: generation finished normally
    ERROR = "error"  # terminal: generation failed


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR})


class FinishReason(str, Enum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the API asked the generator to stop


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a request's Redis Stream.

    Entries are flat string maps on the wire (``XADD``); :meth:`to_fields` and
    :meth:`from_fields` are the only encoder and decoder.
    """

    type: EventType
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str = ""
    message: str = ""
    worker: str = ""
    #: Generator deltas a ``token`` event carries: a generator writes the deltas
    #: produced while its previous write was in flight as one entry, and the API's
    #: stream reader merges entries that arrive in one read. On the wire only when > 1.
    tokens: int = 1
    #: ``done`` of a job with a :class:`HistoryWindow`: the history turns the prompt
    #: kept (the newest ones). On the wire only when set.
    history_turns: int | None = None
    #: ``start``: the generator renews and releases the job's lease itself (see
    #: :attr:`Lease.seconds`), so the API stops renewing it. On the wire only when set.
    owns_lease: bool = False
    #: The id of the last stream entry this event includes: set by the API's reader,
    #: sent as the SSE ``id:`` and taken back as ``Last-Event-ID``. Never written.
    cursor: str = field(default="", compare=False)

    def to_fields(self) -> dict[str, str]:
        """Encode as the field map of an ``XADD``, omitting empty fields."""
        out = {"type": self.type.value}
        for name in ("text", "finish_reason", "code", "message", "worker"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.tokens != 1 and self.type is EventType.TOKEN:
            out["tokens"] = str(self.tokens)
        if self.type is EventType.DONE:
            out["usage"] = json.dumps(
                {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
            )
            if self.history_turns is not None:
                out["history_turns"] = str(self.history_turns)
        if self.owns_lease:
            out["owns_lease"] = "1"
        return out

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> StreamEvent:
        """Decode an entry read with ``XREAD`` (bytes or str keys and values)."""
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        kind = _EVENT_TYPES.get(data.get("type", ""))
        if kind is None:
            raise ValueError(f"unknown stream entry type {data.get('type')!r}")
        if kind is EventType.TOKEN:  # nearly every entry: decode it without the rest
            return cls(kind, text=data.get("text", ""), tokens=int(data.get("tokens", 1)))
        usage = json.loads(data["usage"]) if "usage" in data else {}
        return cls(
            type=kind,
            text=data.get("text", ""),
            finish_reason=data.get("finish_reason", ""),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            code=data.get("code", ""),
            message=data.get("message", ""),
            worker=data.get("worker", ""),
            history_turns=int(data["history_turns"]) if "history_turns" in data else None,
            owns_lease=data.get("owns_lease") == "1",
        )

    @property
    def is_terminal(self) -> bool:
        """True for the last entry a generator writes for a request."""
        return self.type in TERMINAL_EVENTS


_EVENT_TYPES = {kind.value: kind for kind in EventType}

#: How often a generator writes a heartbeat entry while a job produces no tokens (how
#: long the API waits without any entry is its own setting, GENERATOR_SILENCE_SECONDS).
GENERATOR_HEARTBEAT_SECONDS = 1.0

#: Entries kept per stream (approximate MAXLEN): a reader more than this far behind
#: has lost its client anyway.
STREAM_MAXLEN = 10_000

#: Lifetime of a request's stream and cancel keys after their last write: long
#: enough for a slow reader to drain, short enough that abandoned keys vanish.
STREAM_TTL_SECONDS = 300


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling values a generator applies where a request leaves them unset."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(frozen=True)
class GeneratorInfo:
    """What a generator publishes with its registration (:data:`GENERATOR_INFO_KEY`):
    the API reports it (``GET /load``, ``GET /generation_params``) and validates
    sessions' settings against it, and never needs the generators' settings."""

    model_id: str
    defaults: SamplingDefaults
    #: The most tokens one request may generate there (MAX_NEW_TOKENS_LIMIT); it caps larger requests.
    max_new_tokens_limit: int
    #: The model's context window in tokens, prompt and reply together; 0 = unknown.
    context_length: int = 0

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> GeneratorInfo:
        """Decode a stored entry; fields this version does not know are ignored (a
        newer generator during a rolling upgrade). Raises ``ValueError`` for one it
        cannot read."""
        try:
            return _GENERATOR_INFO.validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"unreadable generator info: {exc.error_count()} errors") from None


_GENERATOR_INFO = TypeAdapter(GeneratorInfo)
