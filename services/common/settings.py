"""Settings shared by both services, read from the environment (12-factor)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Base of each service's settings: how to reach Redis and how loudly to log."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis that carries the job queue, token streams, sessions and registrations.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line with request_id and trace_id; text: for humans."
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
