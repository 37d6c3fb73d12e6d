"""The project as containers: `docker compose up` of docker-compose.yml on a real Docker Engine.

`make images` builds the API and CPU generator images from the project's Dockerfiles (with a
local base image and torch served from this machine's disk where no registry or PyTorch index
answers); Redis and Jaeger, which cannot be pulled here, become locally built stand-ins through
``tests/compose/docker-compose.local.yml`` (Debian's redis-server, an OTLP receiver). Then the
README's curl and the `openai` client run against the containers, a trace must reach the
receiver, the generators are scaled to 2, the one running a stream is stopped with `docker stop`
(it drains: the stream completes), and `down` must leave no container, network or volume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from tests.support.client import assert_openai_client_streams_paris
from tests.support.deploy import tool
from tests.support.images import STAND_INS, sh
from tests.support.processes import REPO, free_port, wait_until

PROJECT = "chatstream-compose-test"
README_CURL = re.compile(r"^curl -N -X POST localhost:8000/chat_stream .*\\\n.*$", re.M)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dockerd") is None and os.geteuid() != 0,
        reason="needs a Docker Engine (scripts/install_docker.sh, part of `make test`, installs one as root)",
    ),
    # Image builds (cached after the first) and container starts, not a hang.
    pytest.mark.timeout(900),
]




def logs(container: str) -> str:
    """A container's output, both streams (the services log to stderr)."""
    result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


class Compose:
    """docker-compose (v2, the binary of `make deploy-tools`) on the project's file plus the override."""

    def __init__(self) -> None:
        self.api_port, self.otlp_port = free_port(), free_port()
        self.env = {**os.environ, "CHATSTREAM_TEST_API_PORT": str(self.api_port), "CHATSTREAM_TEST_OTLP_PORT": str(self.otlp_port)}

    def __call__(self, *args: str, timeout: float = 300) -> str:
        files = ["-f", "docker-compose.yml", "-f", str(STAND_INS / "docker-compose.local.yml")]
        return sh(tool("docker-compose"), "-p", PROJECT, *files, *args, timeout=timeout, env=self.env)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).split()


def leftovers() -> dict[str, list[str]]:
    """Containers, networks and volumes of the test's project still on the engine."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": sh("docker", "ps", "-aq", "--filter", label).split(),
        "networks": sh("docker", "network", "ls", "-q", "--filter", label).split(),
        "volumes": sh("docker", "volume", "ls", "-q", "--filter", label).split(),
    }


@pytest.fixture(scope="module")
def compose(container_images: dict):
    c = Compose()
    started = time.monotonic()
    c("up", "-d", "--no-build", "--wait", "--wait-timeout", "240", timeout=300)
    c.ready_seconds = time.monotonic() - started
    try:
        yield c
    finally:
        if os.environ.get("CHATSTREAM_KEEP_COMPOSE") != "1":
            c("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=120)


def test_compose_serves_the_readme_curl_and_openai_traces_scales_and_drains(compose: Compose) -> None:
    base_url = f"http://127.0.0.1:{compose.api_port}"
    # /readyz: Redis reachable and a generator registered (what the chart's monitors check).
    wait_until(lambda: httpx.get(f"{base_url}/readyz").status_code == 200, 60, "/readyz 200", interval=0.5)
    print(f"docker compose up to /readyz: {compose.ready_seconds:.1f} s")

    # The README's own curl, on the published port.
    match = README_CURL.search((REPO / "README.md").read_text())
    assert match is not None, "the README's first curl"
    curl = match.group(0).replace("localhost:8000", f"127.0.0.1:{compose.api_port}").replace("\\\n", " ")
    reply = subprocess.run(["sh", "-c", curl], capture_output=True, text=True, timeout=120)
    assert reply.returncode == 0, reply.stderr
    # A sampled reply (the defaults' temperature): text, not an error body. What it says is
    # checked below with greedy decoding, which is deterministic.
    assert reply.stdout.strip() and not reply.stdout.lstrip().startswith("{"), reply.stdout

    # The openai client, streaming, through /v1.
    assert_openai_client_streams_paris(base_url)

    # Both services exported spans to the OTLP endpoint compose gives them (Jaeger's place).
    def services_traced() -> list[str]:
        return httpx.get(f"http://127.0.0.1:{compose.otlp_port}/received").json()["services"]
    wait_until(lambda: services_traced() == ["chatstream-api", "chatstream-generator"], 30, "spans of both services", interval=0.5)

    # Two generators; the one running a long stream is stopped and drains it.
    compose("up", "-d", "--no-build", "--wait", "--scale", "generator=2", "--wait-timeout", "240", timeout=300)
    generators = compose.containers("generator")
    assert len(generators) == 2
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 200, "temperature": 1.0, "seed": 7, "stream": True}
    chunks_at_stop = -1
    stop_seconds: list[float] = []

    def stop(container: str) -> None:
        started = time.monotonic()
        sh("docker", "stop", "--time", "120", container, timeout=150)
        stop_seconds.append(time.monotonic() - started)
    with httpx.Client(base_url=base_url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            chunks: list[str] = []
            stopper = None
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(line[6:])
                if stopper is None and len(chunks) >= 3:
                    (running,) = [g for g in generators if f"request {request_id} started" in logs(g)]
                    chunks_at_stop = len(chunks)
                    stopper = threading.Thread(target=stop, args=(running,))
                    stopper.start()
            assert stopper is not None, chunks
            stopper.join(150)
    print(f"docker stop of the generator running the stream took {stop_seconds}")
    assert chunks[-1] == "[DONE]", chunks[-3:]
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(chunks) > chunks_at_stop + 1, "the stream went on after docker stop"
    state = json.loads(sh("docker", "inspect", "--format", "{{json .State}}", running))
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    assert f"request {request_id} finished" in logs(running)


def test_down_leaves_nothing_behind(compose: Compose) -> None:
    compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=120)
    assert leftovers() == {"containers": [], "networks": [], "volumes": []}
