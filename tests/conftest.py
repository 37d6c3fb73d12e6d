"""Fixtures: a real redis-server, real API and generator processes, test models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.processes import REPO, ApiServer, Generator, RedisServer, Service

TINY_MODEL_DIR = REPO / ".cache" / "test-models" / "tiny-llama"
DEFAULT_MODEL_DIR = REPO / ".models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where process logs go (printed on failure by the tests that need them)."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """One real redis-server for the whole run, on a free port."""
    server = RedisServer(workdir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random-weight Llama with a byte-level BPE tokenizer, built once (~3 s)."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model (SmolLM2-135M-Instruct), prepared offline like `make run` does."""
    from scripts.prepare_model import prepare_default_model

    return prepare_default_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def container_images() -> dict:
    """The project's images and the Redis/OTLP stand-ins, built once (tests/support/images.py)."""
    from tests.support.images import build_images

    return build_images()


class Stack:
    """Starts API and generator processes against the test Redis; stops them all."""

    def __init__(self, redis_server: RedisServer, workdir: Path, name: str) -> None:
        self.redis_server = redis_server
        self.redis: redis.Redis = redis_server.client
        self.workdir = workdir
        self.name = name
        self.services: list[Service] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"REDIS_URL": self.redis_server.url, "LOG_LEVEL": "INFO", "LOG_FORMAT": "text", "OTEL_TRACES_EXPORTER": "none", **(extra or {})}

    def api(self, env: dict[str, str] | None = None, app: str | None = None, port: int | None = None) -> ApiServer:
        """Start an API process (``python -m services.api``, or a user's app via uvicorn)."""
        server = ApiServer(f"{self.name}-api{len(self.services)}", self.env(env), self.workdir, app=app, port=port)
        self.services.append(server)
        return server

    def generator(self, env: dict[str, str]) -> Generator:
        """Start a generator worker and wait until it has loaded its model and registered."""
        worker = Generator(f"{self.name}-gen{len(self.services)}", self.env(env), self.workdir, self.redis)
        self.services.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} =====\n{s.log()}" for s in self.services)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to each process, killed after ``timeout`` seconds."""
        for service in reversed(self.services):
            service.stop(timeout=timeout)


@pytest.fixture
def stack(redis_server: RedisServer, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A clean Redis and a place to start this test's processes (stopped after it)."""
    redis_server.client.flushall()
    s = Stack(redis_server, workdir, request.node.name[:40])
    yield s
    # Short: what a test checks of a shutdown it checks itself. Left alone, an API pod
    # waits out RESUME_GRACE_SECONDS (10 s) for a client that left a request behind.
    s.stop(timeout=2)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(s.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def tiny_generator_env(model: Path, **extra: str) -> dict[str, str]:
    """Generator settings for the tiny test model: greedy, so replies are reproducible."""
    return {"MODEL_ID": str(model), "TEMPERATURE": "0", "MAX_NEW_TOKENS": "24", "REPETITION_PENALTY": "1.0", **extra}


def synthetic_generator_env(tokens_per_second: float = 50, **extra: str) -> dict[str, str]:
    """Generator settings for the synthetic backend (fixed reply at a fixed rate)."""
    return {"GENERATOR_BACKEND": "synthetic", "SYNTHETIC_TOKENS_PER_SECOND": str(tokens_per_second), **extra}


def synthetic_reply(text: str, tokens: int) -> str:
    """The synthetic backend's reply to ``text``: its words, repeated to ``tokens`` words."""
    words = text.split()
    return " ".join(words[i % len(words)] for i in range(tokens))


@pytest.fixture
def private_stack(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Like ``stack``, but on a Redis of its own that the test may stop and restart."""
    server = RedisServer(workdir)
    s = Stack(server, workdir, request.node.name[:40])
    yield s
    s.stop(timeout=2)
    server.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(s.logs())
