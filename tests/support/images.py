"""The project's images on this machine's Docker Engine, built once per test run.

``make images`` (scripts/images.py) builds the API and CPU generator images from the project's
Dockerfiles; Redis, which cannot be pulled here, gets a locally built stand-in of the same
software (Debian's redis-server) and Jaeger an OTLP receiver (tests/compose/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.processes import REPO

STAND_INS = REPO / "tests" / "compose"
REDIS_STAND_IN = "chatstream-local/redis:bookworm"
OTLP_RECEIVER = "chatstream-local/otlp-receiver:bookworm"


def sh(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def build_images() -> dict[str, Any]:
    """Start the engine if none runs, build everything; returns ``.cache/images/report.json``."""
    sh("bash", "scripts/install_docker.sh", timeout=180)
    sh(sys.executable, "scripts/images.py", timeout=900)
    report = json.loads((REPO / ".cache" / "images" / "report.json").read_text())
    for tag, name in ((REDIS_STAND_IN, "redis"), (OTLP_RECEIVER, "otlp-receiver")):
        sh("docker", "build", "--quiet", "--network", "host", "--build-arg", f"PYTHON_IMAGE={report['python_image']}",
           "-f", STAND_INS / f"{name}.Dockerfile", "-t", tag, STAND_INS, timeout=300)
    return report
