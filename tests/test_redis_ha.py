"""The chart's bundled highly available Redis, its start scripts run for real.

``redis.bundled.highAvailability`` runs Redis servers, each with a sentinel beside
it, started by ``helm/chatstream/files/redis-ha/{redis,sentinel}.sh`` (the chart
ships them in a ConfigMap; the deployment tests check it renders them). Here three
"pods" run those very scripts on loopback, each server with its own directory and
the ACL users of ``files/redis-acl.conf``: the first start elects server 0, the
replicas and sentinels find it, a killed primary is replaced, and the killed pod,
restarted at once with nothing in memory, comes back as a replica instead of
wiping the others with its empty data set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from scripts.redis_acl import acl_file
from tests.support.processes import REPO, free_port, wait_until

SCRIPTS = REPO / "helm" / "chatstream" / "files" / "redis-ha"
MASTER = "mymaster"
PASSWORDS = {
    "chatstream-api": "api-pw",
    "chatstream-replication": "replication-pw",
    "chatstream-sentinel": "sentinel-pw",
}
ADMIN = "test-admin"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (make redis-server)")


class Pod:
    """One pod of the set: its server and its sentinel, both started by the chart's scripts."""

    def __init__(self, index: int, folder: Path, env: dict[str, str]) -> None:
        self.index = index
        self.folder = folder
        self.env = {**env, "NODE_INDEX": str(index)}
        self.server: subprocess.Popen[bytes] | None = None
        self.sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """A fresh start: empty directories, as a pod without persistence gets (the logs
        of earlier starts are kept)."""
        self.starts = getattr(self, "starts", 0) + 1
        data = self.folder / f"start-{self.starts}"
        data.mkdir(parents=True)
        acl = data / "users.acl"
        acl.write_text(acl_file(PASSWORDS) + f"user {ADMIN} on >admin-pw ~* &* +@all\n")
        env = {**os.environ, **self.env, "SENTINEL_CONFIG": str(data / "sentinel.conf")}
        args = ["--bind", "127.0.0.1", "--dir", str(data), "--save", "", "--appendonly", "no", "--aclfile", str(acl)]
        with open(self.folder / "redis.log", "ab") as log:
            self.server = subprocess.Popen(["sh", str(SCRIPTS / "redis.sh"), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        with open(self.folder / "sentinel.log", "ab") as log:
            self.sentinel = subprocess.Popen(["sh", str(SCRIPTS / "sentinel.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """The pod is gone at once (node failure): both containers, SIGKILL."""
        for proc in (self.server, self.sentinel):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

    def log(self) -> str:
        return "".join(
            f"--- pod {self.index} {name} ---\n{(self.folder / name).read_text(errors='replace') if (self.folder / name).exists() else ''}"
            for name in ("redis.log", "sentinel.log")
        )


class HaSet:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.redis_ports = [free_port() for _ in range(size)]
        self.sentinel_ports = [free_port() for _ in range(size)]
        env = {
            "REDIS_NODES": " ".join(f"127.0.0.1:{p}" for p in self.redis_ports),
            "SENTINEL_NODES": " ".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
            "MASTER_NAME": MASTER,
            "QUORUM": "2",
            "DOWN_AFTER_MILLISECONDS": "1000",
            "FAILOVER_TIMEOUT_MILLISECONDS": "10000",
            "PRIMARY_WAIT_SECONDS": "30",
            "REPLICATION_PASSWORD": PASSWORDS["chatstream-replication"],
            "SENTINEL_REDIS_PASSWORD": PASSWORDS["chatstream-sentinel"],
        }
        base = workdir / f"redis-ha-{self.redis_ports[0]}"
        self.pods = [Pod(i, base / f"pod-{i}", env) for i in range(size)]

    def admin(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.redis_ports[index], username=ADMIN, password="admin-pw", socket_timeout=2)

    def role(self, index: int) -> str | None:
        try:
            return self.admin(index).info("replication")["role"]
        except redis.RedisError:
            return None

    def linked(self, index: int) -> bool:
        try:
            return self.admin(index).info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def named_primary(self, sentinel_index: int) -> int | None:
        """The server (its index) that a sentinel names as the primary."""
        try:
            _, port = redis.Redis(port=self.sentinel_ports[sentinel_index], socket_timeout=2).sentinel_get_master_addr_by_name(MASTER)
        except (redis.RedisError, TypeError):
            return None
        return self.redis_ports.index(int(port)) if int(port) in self.redis_ports else None

    def close(self) -> None:
        for pod in self.pods:
            pod.kill()

    def logs(self) -> str:
        return "\n".join(pod.log() for pod in self.pods)


@pytest.fixture
def ha_set(workdir):
    ha = HaSet(workdir)
    yield ha
    ha.close()


def test_the_charts_scripts_elect_fail_over_and_bring_a_restarted_primary_back_as_a_replica(ha_set, request):
    ha = ha_set
    try:
        for pod in ha.pods:  # all at once, as a first install starts them
            pod.start()
        # First start: server 0 is the primary, the others replicate it, every sentinel agrees.
        wait_until(lambda: ha.role(0) == "master" and ha.linked(1) and ha.linked(2), 30, "server 0 primary, 1 and 2 replicating")
        wait_until(lambda: [ha.named_primary(i) for i in range(3)] == [0, 0, 0], 30, "every sentinel to name server 0")
        wait_until(
            lambda: all(
                (m := redis.Redis(port=port).sentinel_master(MASTER))["num-other-sentinels"] == 2 and m["num-slaves"] == 2
                for port in ha.sentinel_ports
            ),
            30,
            "the sentinels to find each other and both replicas (they learn replicas from the primary's INFO)",
        )
        primary = ha.admin(0)
        primary.set("kept", "yes")
        assert primary.wait(2, 5000) == 2

        # The services' own client, through these sentinels, as the chart configures it.
        from services.common.redis_client import connect_sync
        from services.common.settings import CommonSettings

        settings = CommonSettings(
            redis_url="redis://chatstream-api:api-pw@mymaster:6379/0",
            redis_sentinels=",".join(f"127.0.0.1:{p}" for p in ha.sentinel_ports),
        )
        client = connect_sync(settings, timeout=3)
        assert client.ping() and client.zcard("chatstream:generators") == 0
        client.close()

        # The primary's pod dies and is restarted at once, empty: it must not serve as the
        # primary (the replicas would copy its empty data set); it waits for the sentinels
        # to promote a replica and follows it.
        killed_at = time.monotonic()
        ha.pods[0].kill()
        ha.pods[0].start()
        wait_until(lambda: ha.named_primary(1) in (1, 2), 30, "the sentinels to promote a replica")
        promoted = ha.named_primary(1)
        promoted_after = time.monotonic() - killed_at
        assert ha.role(0) != "master", "the restarted server served as the primary before the failover"
        wait_until(lambda: ha.role(0) == "slave" and ha.linked(0), 40, "the restarted server to replicate the new primary")
        assert [ha.named_primary(i) for i in range(3)] == [promoted] * 3
        new_primary = ha.admin(promoted)
        assert new_primary.get("kept") == b"yes", "the data survived the failover"
        assert ha.admin(0).get("kept") == b"yes", "the restarted server copied it back"
        wait_until(lambda: new_primary.info("replication")["connected_slaves"] == 2, 20, "both replicas to follow the new primary")
        print(f"promoted server {promoted} {promoted_after:.1f}s after the kill; server 0 rejoined as a replica")
    except BaseException:
        print(ha.logs())
        raise
