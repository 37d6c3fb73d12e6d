"""The deployment tools the tests drive (helm, kubectl, docker-compose, kubernetes-validate)
and small readers for what they render. No cluster, Docker engine or network is used."""

from __future__ import annotations

import subprocess
import tempfile
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import REPO

TOOLS_BIN = REPO / ".cache" / "tools" / "bin"
CHART = REPO / "helm" / "chatstream"
#: Oldest Kubernetes the chart supports (Chart.yaml kubeVersion allows 1.27, whose schemas
#: kubernetes-validate no longer ships) and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
#: Custom resources kubernetes-validate has no schema for; tests check them field by field.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}


def tool(name: str) -> Path:
    """Path of a tool; fails (never skips) with the command that installs it."""
    if name == "kubernetes-validate":
        path = Path(sys.executable).parent / name
    else:
        path = TOOLS_BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed at {path}: run `make deploy-tools` (part of `make test`)", pytrace=False)
    return path


def run(args: list[str | Path], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output (the caller checks the exit status)."""
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60)


def helm_template(
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
    release: str = "chat",
    namespace: str = "llm",
    chart: Path = CHART,
) -> str:
    """``helm template`` of the chart (or another copy of it) with ``--set-json`` values; fails the test on a render error."""
    result = helm_template_result(values, api_versions, release, namespace, chart)
    if result.returncode != 0:
        pytest.fail(f"helm template failed with {values}:\n{result.stderr}", pytrace=False)
    return result.stdout


def helm_template_result(
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
    release: str = "chat",
    namespace: str = "llm",
    chart: Path = CHART,
) -> subprocess.CompletedProcess[str]:
    """``helm template`` as a completed process, for tests that expect it to fail."""
    import json

    args: list[str | Path] = [tool("helm"), "template", release, chart, "--namespace", namespace]
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    for api_version in api_versions:
        args += ["--api-versions", api_version]
    return run(args)


def parse(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kubernetes_validate(text: str, what: str) -> None:
    """``kubernetes-validate --strict`` for each supported Kubernetes version. Unknown fields,
    wrong types and unknown kinds fail; only the known custom resources may lack a schema."""
    args: list[str | Path] = [tool("kubernetes-validate"), "--strict", "--quiet"]
    for version in KUBERNETES_VERSIONS:
        args += ["-k", version]
    # A file, not stdin: the tool reads its input once per Kubernetes version.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        result = run([*args, f.name])
    unexpected_warnings = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("WARN") and not any(f"kind {kind} " in line for kind in CUSTOM_KINDS)
    ]
    if result.returncode != 0 or unexpected_warnings:
        pytest.fail(f"kubernetes-validate --strict rejected {what}:\n{result.stdout}{result.stderr}", pytrace=False)


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    """The one object of ``kind`` whose name ends with ``name_suffix``."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, found {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    """The kinds present in a rendering."""
    return {o["kind"] for o in objects}


def container_env(objects: list[dict[str, Any]], deployment: dict[str, Any], container: str) -> dict[str, str | dict]:
    """Everything a container's environment holds: its ConfigMaps' data (envFrom) overlaid by its
    ``env`` entries (a value, or the ``valueFrom`` mapping when it comes from elsewhere)."""
    spec = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == container]
    env: dict[str, str | dict] = {}
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(find(objects, "ConfigMap", name.split("-")[-1])["data"])
    for entry in c.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def compose_config(*files: str) -> dict[str, Any]:
    """The resolved Compose model of ``files`` (``docker-compose config``), validated by Compose itself."""
    args: list[str | Path] = [tool("docker-compose")]
    for f in files:
        args += ["-f", f]
    result = run([*args, "config", "--format", "yaml"])
    if result.returncode != 0:
        pytest.fail(f"docker-compose config rejected {files}:\n{result.stderr}", pytrace=False)
    return yaml.safe_load(result.stdout)

