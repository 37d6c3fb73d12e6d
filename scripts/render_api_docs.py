"""Write the route and request-body tables of ``docs/api.md`` from the API's OpenAPI schema.

The schema is the one ``python -m services.api`` serves (``create_app`` with the default
settings): every route it lists, and the fields, types, ranges and descriptions of each
JSON body it declares. The prose around the tables is written by hand and kept.
``tests/test_docs.py`` fails when the committed file differs from what this renders, so a
new route or body field shows up in the docs by a re-run.

Usage: ``.venv/bin/python scripts/render_api_docs.py`` (``--check``: exit 1 when the file
is stale, write nothing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a file (python scripts/render_api_docs.py), the repository is not on the path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.generated_sections import replace_section, write_or_check  # noqa: E402
from services.api.app import create_app  # noqa: E402
from services.api.settings import ApiSettings  # noqa: E402

DOC = REPO / "docs" / "api.md"
SCRIPT = "scripts/render_api_docs.py"
#: JSON Schema bounds, as the tables say them.
BOUNDS = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))


def openapi_schema() -> dict[str, Any]:
    """The schema of the app built from the default settings, whatever the environment says."""
    return create_app(ApiSettings.model_validate({})).openapi()


def cell(text: str) -> str:
    """Docstring-style text as one Markdown table cell: reST's ````code```` as Markdown's, ``|``
    and ``<`` escaped so that the table and the text survive."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|").replace("<", "&lt;")


def number(value: float) -> str:
    """A bound as the code wrote it (``1``, ``0.5``), or to four digits (``9.223e+18``) where
    FastAPI's schema holds a large integer bound as a float that no longer says it exactly."""
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return f"{value:.4g}"


def type_text(prop: dict[str, Any]) -> str:
    """A property's type with its bounds (``integer ≥ 1``, ``number ≥ 0, ≤ 2 or null``)."""
    choices = prop.get("anyOf", [prop])
    out = []
    for choice in choices:
        kind = choice.get("type", "any")
        if kind == "array":
            kind = f"array of {type_text(choice.get('items', {}))}"
        bounds = [f"{sign} {number(choice[key])}" for key, sign in BOUNDS if key in choice]
        if "maxLength" in choice:
            bounds.append(f"at most {choice['maxLength']} characters")
        out.append(kind + (" " + ", ".join(bounds) if bounds else ""))
    return " or ".join(out)


def body_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of an operation's request body, when it declares one."""
    content = operation.get("requestBody", {}).get("content", {})
    return content.get("application/json", {}).get("schema")


def render_routes(schema: dict[str, Any]) -> str:
    """One row per route and method: the path, its path parameters, its JSON body's schema."""
    rows = ["| Method | Path | JSON body |", "| --- | --- | --- |"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            body = body_schema(operation)
            body_cell = f"`{body['title']}` (below)" if body and "title" in body else "none"
            rows.append(f"| `{method.upper()}` | `{path}` | {body_cell} |")
    return "\n".join(rows)


def render_bodies(schema: dict[str, Any]) -> str:
    """For each JSON body a route declares: its fields with type, default and description."""
    parts = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            body = body_schema(operation)
            if not body or "properties" not in body:
                continue
            closed = " Other fields are refused (422)." if body.get("additionalProperties") is False else ""
            parts += [f"### `{body['title']}`: `{method.upper()} {path}`", "", cell(body.get("description", "")) + closed, ""]
            parts += ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
            for name, prop in body["properties"].items():
                default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "none"
                parts.append(f"| `{name}` | {cell(type_text(prop))} | {default} | {cell(prop.get('description', ''))} |")
            parts.append("")
    return "\n".join(parts)


def render(text: str) -> str:
    """``docs/api.md``'s text with its generated sections rendered afresh."""
    schema = openapi_schema()
    text = replace_section(text, "routes", SCRIPT, render_routes(schema))
    return replace_section(text, "bodies", SCRIPT, render_bodies(schema))


def main(argv: list[str]) -> int:
    """Write the tables into ``docs/api.md`` (``--check``: only say whether it is stale)."""
    return write_or_check(DOC, SCRIPT, render, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
