"""Per-session generation settings: ``GET``/``POST /generation_params`` (ChatStream's
get_generation_params / set_generation_params), applied to the session's ``/chat_stream``.

A session may set ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
``max_new_tokens`` and ``seed``; what it leaves unset, each request leaves to the generator that
runs it, which applies its own default. The values live in the session's Redis
(``session_params_key``), beside its history and with its TTL.

A value is checked when it is set: against the fixed range the contract gives its
type, and ``max_new_tokens`` also against the smallest ``MAX_NEW_TOKENS_LIMIT``
of the live generators. The defaults and limits shown come from what the live
generators publish with their registration (``GeneratorInfo``); the API never
knows the generators' settings. With no generator live (or none that publishes),
the defaults are unknown (``null``) and ``max_new_tokens`` is only checked to be
at least 1; a generator that later runs the request caps it at its own limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.api.errors import ApiError
from services.api.origin import check_same_origin
from services.api.sessions import SessionStore
from services.api.validation import load_json_object, read_body
from services.common.contract import (
    ErrorCode,
    MaxNewTokens,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    Temperature,
    TopK,
    TopP,
    session_params_key,
)
from services.common.registry import LiveGenerator, live_generators

logger = logging.getLogger(__name__)


class GenerationParamsUpdate(BaseModel):
    """Body of ``POST /generation_params``: the fields to set; ``null`` resets one to
    the generators' default, and a field left out keeps its value."""

    # Unknown fields are refused (a typo must not be silently ignored); strict, so
    # "0.7" or true is refused rather than coerced; infinities and NaN are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: MaxNewTokens | None = Field(None, description="Most tokens a reply may have.")
    temperature: Temperature | None = Field(None, description="Sampling temperature (0 = greedy).")
    top_p: TopP | None = Field(None, description="Nucleus sampling mass.")
    top_k: TopK | None = Field(None, description="Sample among the k most likely tokens (0 = off).")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="Penalty on repeated tokens (1 = off).")
    seed: Seed | None = Field(
        None, description="Seeds sampling: the same request gets the same reply (same model); null = unseeded."
    )


#: The settings a session can make, in the order clients show them.
FIELDS = tuple(GenerationParamsUpdate.model_fields)

_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Bounds:
    """The values one setting accepts, read from its type's constraints."""

    integer: bool
    minimum: float
    minimum_exclusive: bool = False
    maximum: float | None = None

    @classmethod
    def of_field(cls, name: str) -> Bounds:
        """The bounds of one field of :class:`GenerationParamsUpdate`."""
        optional = GenerationParamsUpdate.model_fields[name].annotation
        annotated = next(a for a in get_args(optional) if a is not type(None))
        base, *constraints = get_args(annotated)
        minimum, exclusive, maximum = 0.0, False, None
        for constraint in constraints:
            if isinstance(constraint, Ge):
                minimum = constraint.ge
            elif isinstance(constraint, Gt):
                minimum, exclusive = constraint.gt, True
            elif isinstance(constraint, Le):
                maximum = constraint.le
            else:  # a new kind of constraint in the contract must be described here first
                raise TypeError(f"{name}: cannot describe {constraint!r}")
        return cls(base is int, minimum, exclusive, maximum)

    def describe(self) -> str:
        """The range in words: "between 0 and 2", "greater than 0", ..."""
        low = f"greater than {_number(self.minimum)}" if self.minimum_exclusive else f"at least {_number(self.minimum)}"
        if self.maximum is None:
            return low
        if not self.minimum_exclusive:
            return f"between {_number(self.minimum)} and {_number(self.maximum)}"
        return f"{low} and at most {_number(self.maximum)}"

    def to_json(self) -> dict[str, Any]:
        """JSON Schema's words for it, which a page can put on an ``<input>``."""
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        out["exclusiveMinimum" if self.minimum_exclusive else "minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


#: The fixed ranges; max_new_tokens gets its maximum from the live generators.
FIXED_BOUNDS = {name: Bounds.of_field(name) for name in FIELDS}


@dataclass(frozen=True)
class GeneratorLimits:
    """What the live generators publish, reduced to what a session's settings need."""

    generators: int
    #: Each field's default where every publishing generator has the same; None
    #: where they differ (a rolling change of settings) or none publishes.
    defaults: dict[str, Any]
    #: The smallest MAX_NEW_TOKENS_LIMIT among them: a value every one of them honours.
    max_new_tokens_limit: int | None

    @classmethod
    def of(cls, generators: list[LiveGenerator]) -> GeneratorLimits:
        """Reduce the live generators' registrations."""
        infos = [g.info for g in generators if g.info is not None]
        defaults: dict[str, Any] = {}
        for name in FIELDS:
            # A generator has no default for some (a seed): None, as for an unknown one.
            values = {getattr(info.defaults, name, None) for info in infos}
            defaults[name] = values.pop() if len(values) == 1 else None
        limit = min((info.max_new_tokens_limit for info in infos), default=None)
        return cls(len(generators), defaults, limit)

    def bounds(self, name: str) -> Bounds:
        """The range a value of ``name`` must be in now."""
        fixed = FIXED_BOUNDS[name]
        if name == "max_new_tokens" and self.max_new_tokens_limit is not None:
            return Bounds(fixed.integer, fixed.minimum, fixed.minimum_exclusive, self.max_new_tokens_limit)
        return fixed

    def check(self, changes: dict[str, Any]) -> None:
        """Raise :class:`ApiError` 422 for a value the live generators would not honour."""
        value = changes.get("max_new_tokens")
        if value is not None and self.max_new_tokens_limit is not None and value > self.max_new_tokens_limit:
            message = f"must be {self.bounds('max_new_tokens').describe()} (the live generators' MAX_NEW_TOKENS_LIMIT)"
            raise _invalid([("max_new_tokens", message)])

    def state(self, session: dict[str, Any]) -> dict[str, Any]:
        """The body of ``GET /generation_params`` for a session with these settings."""
        effective = {name: session.get(name, self.defaults[name]) for name in FIELDS}
        if effective["max_new_tokens"] is not None and self.max_new_tokens_limit is not None:
            # A value set before the limit shrank: the generators cap it.
            effective["max_new_tokens"] = min(effective["max_new_tokens"], self.max_new_tokens_limit)
        return {
            "effective": effective,
            "session": session,
            "defaults": self.defaults,
            "limits": {name: self.bounds(name).to_json() for name in FIELDS},
            "generators": self.generators,
        }


def _invalid(problems: list[tuple[str, str]]) -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        "; ".join(f"{name}: {problem}" for name, problem in problems),
        detail=[{"field": name, "message": problem} for name, problem in problems],
    )


def _problem(error: Any) -> tuple[str, str]:
    name = str(error["loc"][0]) if error["loc"] else "body"
    if error["type"] == "extra_forbidden":
        return name, f"unknown field; the fields are {', '.join(FIELDS)}"
    bounds = FIXED_BOUNDS[name]
    if error["type"] == "finite_number":
        return name, f"must be a finite number ({bounds.describe()})"
    if error["type"] in _RANGE_ERRORS:
        return name, f"must be {bounds.describe()}"
    kind = "an integer" if bounds.integer else "a number"
    return name, f"must be {kind} ({bounds.describe()}) or null for the default"


def parse_update(body: bytes) -> dict[str, Any]:
    """The fields a ``POST /generation_params`` body sets (``None``: reset to the
    default); raises :class:`ApiError` (4xx) on bad input, naming every bad field."""
    data = load_json_object(body, 'JSON like {"temperature": 0.7}')
    try:
        update = GenerationParamsUpdate.model_validate(data)
    except ValidationError as exc:
        raise _invalid([_problem(e) for e in exc.errors(include_url=False)]) from None
    return {name: getattr(update, name) for name in FIELDS if name in update.model_fields_set}


@contextlib.contextmanager
def _redis_errors(what: str, doing: str) -> Iterator[None]:
    """Turn a Redis failure into 503 ``redis_unavailable``: clients get a code and a
    generic message, the details (hosts, ports, library messages) go to the log."""
    try:
        yield
    except RedisError:
        logger.warning("%s failed", doing, exc_info=True)
        raise ApiError.of(ErrorCode.REDIS_UNAVAILABLE, f"{what} is unreachable") from None


_SESSION_STORE = "the session store"


def _queue_read(pipe: Any, key: str) -> None:
    """Queue the reads of every field on ``pipe``; :func:`_decode_stored` takes the
    last ``len(FIELDS)`` results. One HGET per field rather than HMGET: the chat path
    then needs no Redis grant it did not have, so an API upgraded before an external
    Redis's ACL (redis-acl.conf) goes on chatting."""
    for name in FIELDS:
        pipe.hget(key, name)


def _decode_stored(raw: list[bytes | None]) -> dict[str, Any]:
    """The values a session stored, each checked again: one that is no longer valid
    (the ranges changed since it was set) is dropped, so the default applies."""
    session: dict[str, Any] = {}
    for name, value in zip(FIELDS, raw):
        if value is None:
            continue
        try:
            update = GenerationParamsUpdate.model_validate({name: json.loads(value)})
        except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
            logger.warning("a session's stored %s is not valid; the default applies", name)
            continue
        session[name] = getattr(update, name)
    return session


class GenerationParams:
    """Reads and writes the sessions' settings and answers the two routes.

    ``sessions`` signs the cookies and holds the Redis the settings live in;
    ``redis`` is the main Redis, where the generators register."""

    def __init__(
        self,
        sessions: SessionStore,
        redis: Redis,
        *,
        ttl_seconds: int,
        allowed_origins: frozenset[str],
        max_body_bytes: int,
    ) -> None:
        self._sessions = sessions
        self._redis = redis
        self._ttl = ttl_seconds
        self._allowed_origins = allowed_origins
        self._max_body_bytes = max_body_bytes

    async def sampling(self, session_id: str) -> SamplingParams:
        """The sampling parameters of a request of this session (unset fields are
        ``None``: the generator's default). Using the settings keeps them alive as
        long as the session. Raises :class:`ApiError` 503 when Redis is down."""
        key = session_params_key(session_id)
        with _redis_errors(_SESSION_STORE, "reading a session's generation settings"):
            async with self._sessions.redis.pipeline(transaction=False) as pipe:
                pipe.expire(key, self._ttl)
                _queue_read(pipe, key)
                results = await pipe.execute()
        return SamplingParams(**_decode_stored(results[-len(FIELDS) :]))

    async def get(self, request: Request) -> Response:
        """``GET /generation_params``: the session's settings, the generators'
        defaults and limits, and what a request would use. Sets no cookie."""
        session_id, new_session = self._sessions.session_id(request)
        try:
            session = {} if new_session else await self._read(session_id)
            limits = await self._limits()
        except ApiError as error:
            return error.to_response()
        return JSONResponse(limits.state(session))

    async def set(self, request: Request) -> Response:
        """``POST /generation_params``: change some of the session's settings (a new
        session gets its cookie) and answer with the new state, as ``get`` does.
        Refuses other sites (403), bodies not declared JSON (415), bodies over
        MAX_BODY_BYTES (413), bad JSON (400) and bad values (422, naming them)."""
        try:
            check_same_origin(request, self._allowed_origins)
            changes = parse_update(await read_body(request, self._max_body_bytes))
            limits = await self._limits()
            limits.check(changes)
            session_id, _ = self._sessions.session_id(request)
            session = await self._write(session_id, changes)
        except ApiError as error:
            return error.to_response()
        response = JSONResponse(limits.state(session))
        # Re-signed like every chat reply: the signature's timestamp expires idle cookies.
        response.headers.append("set-cookie", self._sessions.set_cookie_header(session_id, request))
        return response

    async def _limits(self) -> GeneratorLimits:
        with _redis_errors("Redis", "reading the generators' registrations"):
            return GeneratorLimits.of(await live_generators(self._redis))

    async def _read(self, session_id: str) -> dict[str, Any]:
        with _redis_errors(_SESSION_STORE, "reading a session's generation settings"):
            async with self._sessions.redis.pipeline(transaction=False) as pipe:
                _queue_read(pipe, session_params_key(session_id))
                results = await pipe.execute()
        return _decode_stored(results)

    async def _write(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply ``changes`` in one transaction and return the session's settings after it."""
        key = session_params_key(session_id)
        to_set = {name: json.dumps(value) for name, value in changes.items() if value is not None}
        to_reset = [name for name, value in changes.items() if value is None]
        with _redis_errors(_SESSION_STORE, "writing a session's generation settings"):
            async with self._sessions.redis.pipeline(transaction=True) as pipe:
                if to_set:
                    pipe.hset(key, mapping=to_set)
                if to_reset:
                    pipe.hdel(key, *to_reset)
                pipe.expire(key, self._ttl)
                _queue_read(pipe, key)
                results = await pipe.execute()
        return _decode_stored(results[-len(FIELDS) :])
