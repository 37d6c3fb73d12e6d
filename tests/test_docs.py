"""The docs say what the code does: the settings tables are what the settings classes render."""

from __future__ import annotations

import re

from scripts import render_config_docs
from services.api.settings import ApiSettings
from services.generator.settings import GeneratorSettings
from tests.support.processes import REPO

DOCS = REPO / "docs"


def test_configuration_docs_are_what_the_settings_classes_render():
    committed = render_config_docs.DOC.read_text()
    assert committed == render_config_docs.render(committed), (
        "docs/configuration.md differs from the settings classes: run "
        ".venv/bin/python scripts/render_config_docs.py and commit the result"
    )


def test_every_environment_variable_is_documented_once():
    table = (DOCS / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)`", table, re.M)
    names = {name.upper() for cls in (ApiSettings, GeneratorSettings) for name in cls.model_fields}
    missing = sorted(names - set(rows))
    twice = sorted({name for name in rows if rows.count(name) > 1})
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"
    assert not twice, f"docs/configuration.md documents more than once: {', '.join(twice)}"
