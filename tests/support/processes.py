"""Real processes for the tests: redis-server, API servers, generator workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A throw-away redis-server on a free loopback port; can be stopped and started
    again on the same port (to provoke an outage)."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = (), username: str | None = None, password: str | None = None) -> None:
        """``args`` are more redis-server options (an ACL file, a memory limit); with
        ``username``/``password``, :attr:`client` (the tests' own) logs in as that user."""
        self._binary = shutil.which("redis-server")
        if self._binary is None:
            raise RuntimeError("redis-server is not installed: run `make test` (it installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # Its own working directory: a dump.rdb left by another server is never loaded.
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(exist_ok=True)
        self._args = args
        self._log = open(workdir / f"redis-{self.port}.log", "ab")
        self.client = redis.Redis(host="127.0.0.1", port=self.port, username=username, password=password)
        self.start()

    def url_for(self, username: str, password: str) -> str:
        """REDIS_URL of this server for an ACL user."""
        return f"redis://{username}:{password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port and wait until it answers."""
        self.proc = subprocess.Popen(
            [
                self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), *self._args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, 10, "redis-server")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """Shut the server down (its data is lost)."""
        self.proc.terminate()
        self.proc.wait(10)

    def close(self) -> None:
        """Stop for good."""
        self.stop()
        self._log.close()


class Sentinels:
    """A primary, a replica and three ``redis-server --sentinel`` processes watching
    it (quorum 2, primary declared down after 1 s): a real failover on loopback."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.primary = RedisServer(workdir)
        self.replica = RedisServer(workdir, args=("--replicaof", "127.0.0.1", str(self.primary.port)))
        wait_until(self._replicating, 20, "the replica to sync")
        self._binary = shutil.which("redis-server")
        self._procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for _ in range(3):
            port = free_port()
            folder = workdir / f"sentinel-{port}"
            folder.mkdir(exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 3000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            log = open(folder / "sentinel.log", "ab")
            self._procs.append(subprocess.Popen([self._binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT))
            self.ports.append(port)
        wait_until(self._all_see_both, 20, "the sentinels to see the primary and its replica")

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def master_port(self) -> int | None:
        """The primary's port, as the first sentinel that answers says."""
        for port in self.ports:
            try:
                host, master = self.sentinel(port).sentinel_get_master_addr_by_name(self.MASTER)
                return int(master)
            except (redis.RedisError, TypeError):
                continue
        return None

    def _replicating(self) -> bool:
        info = self.replica.client.info("replication")
        return info.get("master_link_status") == "up"

    def _all_see_both(self) -> bool:
        try:
            return all(
                self.sentinel(p).sentinel_master(self.MASTER).get("num-slaves", 0) >= 1 for p in self.ports
            )
        except redis.RedisError:
            return False

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.wait(10)
        for server in (self.primary, self.replica):
            if server.proc.poll() is None:
                server.close()


class Service:
    """One service process (``python -m ...`` or uvicorn), logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path, prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command that runs it (``ip netns exec NAME``: in a network namespace)."""
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *args], cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the process and wait; kill it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class ApiServer(Service):
    """An API process on a free port; ``app`` is ``None`` for ``python -m services.api``
    or a ``module:attribute`` for a user's own app run with uvicorn (with ``factory``:
    a function that returns it)."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        workdir: Path,
        app: str | None = None,
        port: int | None = None,
        factory: bool = False,
    ) -> None:
        self.port = port or free_port()  # a given port: a pod restarted behind the same address
        self.base_url = f"http://127.0.0.1:{self.port}"
        # With API_INTERNAL_PORT the probes answer there, not on the API's port.
        self.health_url = f"http://127.0.0.1:{env.get('API_INTERNAL_PORT', self.port)}/healthz"
        env = {**env, "API_PORT": str(self.port)}
        if app is None:
            args = ["-m", "services.api"]
        else:
            args = ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port)]
            if factory:
                args.append("--factory")
        super().__init__(name, args, env, workdir)
        wait_until(self._healthy, 60, f"{name} /healthz")

    def _healthy(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.log()}")
        try:
            return httpx.get(self.health_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


class Generator(Service):
    """A generator worker; waits until it has registered (model loaded)."""

    def __init__(
        self, name: str, env: dict[str, str], workdir: Path, redis_client: redis.Redis, prefix: tuple[str, ...] = ()
    ) -> None:
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        env = {"WORKER_ID": name, "METRICS_PORT": str(self.metrics_port), **env}
        super().__init__(name, ["-m", "services.generator"], env, workdir, prefix)
        self.worker_id = env["WORKER_ID"]
        wait_until(lambda: self._registered(redis_client), 120, f"{name} to register")

    def _registered(self, client: redis.Redis) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.log()}")
        from services.common.contract import GENERATORS_KEY

        return client.zscore(GENERATORS_KEY, self.worker_id) is not None


async def eventually(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Async :func:`wait_until`, for tests whose own tasks must keep running meanwhile."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
