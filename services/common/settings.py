"""Settings shared by both services, read from the environment (12-factor)."""

from __future__ import annotations

import argparse
from typing import Annotated, Literal, TypeVar

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def parse_addresses(value: object) -> object:
    """``host:port,host:port`` (REDIS_SENTINELS) as ``[(host, port), ...]``."""
    if not isinstance(value, str):
        return value
    out = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port (REDIS_SENTINELS is host:port,host:port,...)")
        out.append((host.strip("[]"), int(port)))
    return out


Addresses = Annotated[list[tuple[str, int]], NoDecode, BeforeValidator(parse_addresses)]

#: Connecting is bounded, so a Redis that is down surfaces as an error within
#: seconds instead of hanging a request.
CONNECT_TIMEOUT_SECONDS = 2.0


class CommonSettings(BaseSettings):
    """Base of each service's settings: how to reach Redis and how loudly to log."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis that carries the job queue, token streams, sessions and registrations; with an ACL user: "
        "redis://chatstream-api:PASSWORD@host:6379/0.",
    )
    redis_sentinels: Addresses = Field(
        default_factory=list,
        description="Redis Sentinel addresses (host:port,host:port,...): when set, every client asks them for the "
        "primary of REDIS_SENTINEL_MASTER and follows its failovers; REDIS_URL then gives only the database, "
        "user, password and TLS (rediss://) of the data connections.",
    )
    redis_sentinel_master: str = Field("mymaster", min_length=1, description="Name of the primary the sentinels watch.")
    redis_sentinel_password: SecretStr = Field(
        "",  # type: ignore[assignment]
        description="Password of the sentinels themselves (their requirepass), when they have one.",
    )
    redis_socket_timeout_seconds: float = Field(
        5.0,
        gt=0.0,
        description="Read timeout of a Redis command; a reply that takes longer counts as a lost connection "
        "(blocking stream reads get their block time on top; pub/sub listens in 1 s polls).",
    )
    redis_keepalive_seconds: float = Field(
        5.0,
        ge=1.0,
        description="TCP keepalive on every Redis connection: probes start after this much idle time, 1 s apart, "
        "and 3 unanswered ones (or sent data unacknowledged as long) end it, so a connection to a vanished "
        "node is noticed within about this + 3 s.",
    )
    redis_retry_seconds: float = Field(
        10.0,
        gt=0.0,
        description="How long Redis may be unreachable (a failover, a dropped connection) before streams fail: "
        "generators retry their writes (each entry exactly once) and the API its stream reads for this long, "
        "reconnecting meanwhile.",
    )
    log_level: str = Field(
        "INFO",
        description="Python logging level (a generator logs arq's per-job lines, which contain the conversation, only "
        "at DEBUG).",
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line with request_id and trace_id; text: for humans."
    )

    @property
    def redis_command_deadline_seconds(self) -> float:
        """The longest one Redis command can take before it fails when Redis does not
        answer (a connect, then a read that times out): what a loop's watchdog must allow
        for each command of one turn."""
        return CONNECT_TIMEOUT_SECONDS + self.redis_socket_timeout_seconds

    def check_stall_limit(self, name: str, limit: float, commands: int, extra: float) -> None:
        """Refuse a watchdog limit (``name``, seconds; 0 = off) under the longest turn of
        its loop when Redis does not answer: ``commands`` commands plus ``extra`` seconds
        of waiting. A lower one would restart healthy pods during every Redis outage."""
        floor = commands * self.redis_command_deadline_seconds + extra
        if 0 < limit < floor:
            raise ValueError(
                f"{name} ({limit:g}) must be 0 (off) or at least {floor:g}s: one turn of the loop it watches "
                f"may take {commands} Redis commands of up to {self.redis_command_deadline_seconds:g}s each "
                f"(CONNECT + REDIS_SOCKET_TIMEOUT_SECONDS) plus {extra:g}s when Redis does not answer"
            )


def describe_settings(settings_cls: type[BaseSettings]) -> str:
    """Text listing every environment variable of a settings class with its default,
    for the services' ``--help``."""
    lines = []
    for name, info in settings_cls.model_fields.items():
        default = info.get_default(call_default_factory=True)
        default = getattr(default, "value", default)  # enums: show the string to set
        lines.append(f"  {name.upper():<34} {info.description or ''} [default: {default!r}]")
    return "\n".join(lines)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_command_line(
    settings_cls: type[SettingsT], prog: str, description: str, argv: list[str] | None = None
) -> tuple[SettingsT, argparse.ArgumentParser]:
    """A service's command line: ``--help`` lists its environment variables, and settings
    that do not validate end the process with exit code 2 and one line per problem
    instead of a traceback. Returns the settings and the parser (to refuse later)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="Configured by environment variables (OpenTelemetry through the standard OTEL_* ones):\n"
        + describe_settings(settings_cls),
    )
    parser.parse_args(argv)
    try:
        return settings_cls(), parser
    except ValidationError as exc:
        problems = "\n".join(f"  {_problem(error)}" for error in exc.errors())
        parser.exit(2, f"{prog}: refusing to start, invalid settings:\n{problems}\n")


def _problem(error: dict) -> str:
    """One validation error as an operator reads it: the variable, then what is wrong."""
    message = error["msg"].removeprefix("Value error, ")
    name = str(error["loc"][0]).upper() if error.get("loc") else ""
    return f"{name}: {message}" if name and name not in message else message
