"""Sections of the Markdown docs that a script writes: the text between two HTML comments.

A generated section starts with ``<!-- BEGIN GENERATED name: ... -->`` and ends with
``<!-- END GENERATED name -->``; everything outside the markers is written by hand and
kept as it is. ``scripts/render_config_docs.py`` and ``scripts/render_api_docs.py`` use
this, and ``tests/test_docs.py`` fails when a committed section differs from its source.
"""

from __future__ import annotations

import re


def begin_marker(name: str, script: str) -> str:
    """The opening comment of section ``name``, naming the script that writes it."""
    return f"<!-- BEGIN GENERATED {name}: written by {script}; edit its source, then run it -->"


def end_marker(name: str) -> str:
    """The closing comment of section ``name``."""
    return f"<!-- END GENERATED {name} -->"


def replace_section(text: str, name: str, script: str, body: str) -> str:
    """``text`` with the section ``name`` holding ``body`` (and the markers rewritten).

    Raises ``ValueError`` when the document lacks either marker, so that a renamed or
    deleted section is noticed instead of silently left stale.
    """
    pattern = re.compile(
        rf"^<!-- BEGIN GENERATED {re.escape(name)}[:\s].*?-->\n.*?^{re.escape(end_marker(name))}$",
        re.M | re.S,
    )
    if not pattern.search(text):
        raise ValueError(f"no generated section {name!r} (its BEGIN and END markers) in the document")
    section = f"{begin_marker(name, script)}\n{body.rstrip()}\n{end_marker(name)}"
    return pattern.sub(lambda _: section, text, count=1)


def write_or_check(doc, script: str, render, argv: list[str]) -> int:
    """A render script's command line: write ``render(doc's text)`` into ``doc``, or with
    ``--check`` only say (exit 1) whether the committed file is stale."""
    import sys

    repo = doc.parents[1]
    current = doc.read_text()
    rendered = render(current)
    if "--check" in argv:
        if rendered != current:
            print(f"{doc.relative_to(repo)} is stale: run .venv/bin/python {script}", file=sys.stderr)
            return 1
        return 0
    if rendered != current:
        doc.write_text(rendered)
        print(f"wrote {doc.relative_to(repo)}")
    return 0
