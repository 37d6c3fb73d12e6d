"""The README documents every setting the services read."""

from __future__ import annotations

from services.api.settings import ApiSettings
from services.generator.settings import GeneratorSettings
from tests.support.processes import REPO


def test_readme_documents_every_environment_variable():
    readme = (REPO / "README.md").read_text()
    missing = [
        name.upper()
        for cls in (ApiSettings, GeneratorSettings)
        for name in cls.model_fields
        if f"`{name.upper()}`" not in readme
    ]
    assert not missing, f"README.md does not document: {', '.join(missing)}"
