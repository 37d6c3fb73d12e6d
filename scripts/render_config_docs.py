"""Write the settings tables of ``docs/configuration.md`` from the services' settings classes.

Each service reads one typed settings object from environment variables (pydantic-settings:
the variable is the field's name in upper case). This renders every field, with its default
and its description, between the markers of ``docs/configuration.md``: one table for the
settings both services share, one per service. The prose around the tables is written by
hand and kept. ``tests/test_docs.py`` fails when the committed file differs from what this
renders, so a new setting is documented by its ``Field(description=...)`` and a re-run.

Usage: ``.venv/bin/python scripts/render_config_docs.py`` (``--check``: exit 1 when the
file is stale, write nothing).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from enum import Enum
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a file (python scripts/render_config_docs.py), the repository is not on the path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydantic import AliasChoices, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_settings import BaseSettings  # noqa: E402

from scripts.generated_sections import replace_section, write_or_check  # noqa: E402
from services.api.settings import ApiSettings  # noqa: E402
from services.common.settings import CommonSettings  # noqa: E402
from services.generator.settings import GeneratorSettings  # noqa: E402

DOC = REPO / "docs" / "configuration.md"
SECTION = "settings"
SCRIPT = "scripts/render_config_docs.py"

#: The tables, in order: a title and the class whose fields (less those of the shared base) it lists.
TABLES: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("Both services", CommonSettings),
    ("API pod", ApiSettings),
    ("Generator pod", GeneratorSettings),
)


def env_names(info: FieldInfo, name: str) -> list[str]:
    """The environment variables a field is read from: its name, then any alias choices."""
    names = [name.upper()]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names += [choice.upper() for choice in alias.choices if isinstance(choice, str) and choice.upper() not in names]
    return names


def all_env_names() -> list[str]:
    """Every variable the tables list, longest first (so that API_KEYS_FILE wins over API_KEYS)."""
    names = {env for _, cls in TABLES for name, info in cls.model_fields.items() for env in env_names(info, name)}
    return sorted(names, key=lambda n: (-len(n), n))


def default_text(info: FieldInfo) -> str:
    """A field's default as the Markdown cell shows it: what to set to get the same.

    Deterministic on any machine: a path inside the repository is shown relative to it,
    a secret is never shown, and a default computed at start (say, from the host name)
    is named, not computed.
    """
    if info.default_factory is not None:
        if info.default_factory not in (list, dict, tuple):
            return "computed at start"
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if info.annotation is SecretStr and value:
        return "a fixed development value"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value)}`" if value else "empty"
    if isinstance(value, str):
        if not value:
            return "empty"
        path = Path(value)
        if path.is_absolute() and path.is_relative_to(REPO):
            value = str(path.relative_to(REPO))
    return f"`{value}`"


def markdown_cell(text: str, names_pattern: re.Pattern[str]) -> str:
    """Plain description text as one Markdown table cell: the variables it names (with a
    value they are set to, ``ENVIRONMENT=production``) in code spans, ``|`` and ``<``
    escaped so that the table and the text survive."""
    text = " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")
    return names_pattern.sub(lambda m: f"`{m.group(0)}`", text)


def own_fields(cls: type[BaseSettings]) -> dict[str, FieldInfo]:
    """The fields a table lists: the shared base's all, a service's those it adds or redefines."""
    if cls is CommonSettings:
        return dict(cls.model_fields)
    shared = CommonSettings.model_fields
    return {
        name: info
        for name, info in cls.model_fields.items()
        if name not in shared or (info.description, info.default) != (shared[name].description, shared[name].default)
    }


def render_tables() -> str:
    """The generated section: one Markdown table per entry of ``TABLES``."""
    names = all_env_names()
    names_pattern = re.compile(rf"\b(?:{'|'.join(map(re.escape, names))})\b(?:=[\w.:/-]*[\w/])?")
    parts = []
    for title, cls in TABLES:
        source = Path(inspect.getfile(cls)).resolve().relative_to(REPO)
        parts += [f"### {title}", "", f"`{cls.__name__}` in `{source}`.", ""]
        parts += ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
        for name, info in own_fields(cls).items():
            if not info.description:
                raise ValueError(f"{cls.__name__}.{name} has no Field(description=...) to document it with")
            variables = " or ".join(f"`{env}`" for env in env_names(info, name))
            parts.append(f"| {variables} | {default_text(info)} | {markdown_cell(info.description, names_pattern)} |")
        parts.append("")
    return "\n".join(parts)


def render(text: str) -> str:
    """``docs/configuration.md``'s text with its settings section rendered afresh."""
    return replace_section(text, SECTION, SCRIPT, render_tables())


def main(argv: list[str]) -> int:
    """Write the tables into ``docs/configuration.md`` (``--check``: only say whether it is stale)."""
    return write_or_check(DOC, SCRIPT, render, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
