"""The docs say what the code does: the generated tables match their sources, every link
resolves, and the README stays the short page a newcomer reads first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import render_api_docs, render_config_docs
from services.api.settings import ApiSettings
from services.generator.settings import GeneratorSettings
from tests.support.processes import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
#: The README holds what a newcomer needs first; the rest lives in docs/ (issue 20).
README_MAX_BYTES = 12_000
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def prose(text: str) -> str:
    """Markdown without its code blocks and code spans, where a ``](`` is no link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation but ``-`` and ``_``
    dropped, spaces as hyphens, ``-1``, ``-2``... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_configuration_docs_are_what_the_settings_classes_render():
    committed = render_config_docs.DOC.read_text()
    assert committed == render_config_docs.render(committed), (
        "docs/configuration.md differs from the settings classes: run "
        ".venv/bin/python scripts/render_config_docs.py and commit the result"
    )


def test_api_docs_are_what_the_openapi_schema_renders():
    committed = render_api_docs.DOC.read_text()
    assert committed == render_api_docs.render(committed), (
        "docs/api.md's routes or request bodies differ from the app's OpenAPI schema: run "
        ".venv/bin/python scripts/render_api_docs.py and commit the result"
    )


def test_every_environment_variable_is_documented_once():
    table = (DOCS / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)`", table, re.M)
    names = {name.upper() for cls in (ApiSettings, GeneratorSettings) for name in cls.model_fields}
    missing = sorted(names - set(rows))
    twice = sorted({name for name in rows if rows.count(name) > 1})
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"
    assert not twice, f"docs/configuration.md documents more than once: {', '.join(twice)}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path: Path):
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not this repository's to check
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(REPO)} links to: " + "; ".join(broken)


def test_readme_stays_short_and_links_every_page_of_the_docs():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move the detail to the page of docs/ it belongs "
        "to (benchmark figures: bench/results/, summarised in docs/performance.md)"
    )
    linked = {Path(target.partition("#")[0]) for target in LINK.findall(prose(README.read_text()))}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.relative_to(REPO) not in linked]
    assert not unlinked, f"README.md links no page of docs/ named {', '.join(unlinked)}"


def test_readme_opens_with_the_two_commands_ci_runs():
    first_block = FENCE.search(README.read_text()).group(0).splitlines()
    commands = [line.split("#")[0].strip() for line in first_block[1:-1]]
    assert commands == ["make run", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()
