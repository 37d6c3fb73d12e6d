"""MODEL_REVISION picks which commit of a hub model the generator loads, tokenizer and weights alike.

No hub is reached: the tests build a Hugging Face hub cache in a temporary directory, in the
layout the hub client writes (``models--org--name/refs/main``, ``snapshots/<commit>/...``), with
two commits of the tiny test model that differ in their config and tokenizer, and run the
generator's real loader (and the chart's download command) on it with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO

REPO_ID = "org/tiny-chat"
COMMIT_A = hashlib.sha1(b"revision A").hexdigest()
COMMIT_B = hashlib.sha1(b"revision B").hexdigest()
#: What tells the two commits apart: the model's context length, and the tokenizer's.
CONTEXT = {COMMIT_A: 384, COMMIT_B: 256}


@pytest.fixture(scope="module")
def hub_cache(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME whose hub cache holds two commits of REPO_ID; main points at commit B."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    for commit, context in CONTEXT.items():
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_model, snapshot, ignore=shutil.ignore_patterns(".built"))
        for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
            data = json.loads((snapshot / name).read_text())
            data[key] = context
            (snapshot / name).write_text(json.dumps(data))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_B)
    return home


def offline_env(hub_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_"))}
    return {**env, "HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


LOAD = """
import json, sys
from services.generator.model_loader import load_model
from services.generator.settings import GeneratorSettings

for revision in sys.argv[1:]:
    try:
        model, tokenizer, _ = load_model(GeneratorSettings(model_revision=revision))
    except OSError as error:
        print(json.dumps({"revision": revision, "error": type(error).__name__}))
        continue
    print(json.dumps({
        "revision": revision,
        "model_context": model.config.max_position_embeddings,
        "tokenizer_context": tokenizer.model_max_length,
    }))
"""


def test_model_revision_loads_that_commit_of_a_hub_model(hub_cache: Path) -> None:
    missing = hashlib.sha1(b"not in the cache").hexdigest()
    result = subprocess.run(
        [sys.executable, "-c", LOAD, COMMIT_A, COMMIT_B, "", missing],
        env=offline_env(hub_cache, MODEL_ID=REPO_ID, DEVICE="cpu"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = {r["revision"]: r for r in map(json.loads, result.stdout.splitlines())}
    for commit, context in CONTEXT.items():
        assert (loaded[commit]["model_context"], loaded[commit]["tokenizer_context"]) == (context, context), commit
    # Empty: the hub's default branch, which main points at.
    assert loaded[""]["model_context"] == loaded[""]["tokenizer_context"] == CONTEXT[COMMIT_B]
    # A revision that is not there fails the start; it never falls back to another commit.
    assert "error" in loaded[missing], loaded[missing]


def test_charts_download_command_fetches_the_model_revision(hub_cache: Path) -> None:
    from tests.support.deploy import find, helm_template, parse

    values = {"model.id": REPO_ID, "model.revision": COMMIT_A, "model.download.enabled": True}
    objects = parse(helm_template(values))
    config = find(objects, "ConfigMap", "-generator")["data"]
    assert (config["MODEL_ID"], config["MODEL_REVISION"]) == (REPO_ID, COMMIT_A)
    deployment = find(objects, "Deployment", "-generator")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    # The init container's own command, offline here: snapshot_download then only resolves the cache.
    program, *args = init["command"]
    assert program == "python"
    result = subprocess.run(
        [sys.executable, *args],
        env=offline_env(hub_cache, MODEL_ID=config["MODEL_ID"], MODEL_REVISION=config["MODEL_REVISION"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).name == COMMIT_A
