"""A network namespace joined to the host by a veth pair, whose link can be cut
without closing a socket: every packet is dropped silently (a pfifo queue of length
0 on both ends), as when a node vanishes or a network partitions. Needs root and
iproute2 (``ip``, ``tc``)."""

from __future__ import annotations

import os
import shutil
import subprocess


def available() -> str:
    """'' when this machine can make one, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "iproute2 (ip, tc) is not installed"
    return ""


class Namespace:
    """``host_ip`` is the host's end (bind a server to it), ``prefix`` runs a command inside."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 10000}x{index}"
        self.name = f"cs-{tag}"
        self._host_link, self._ns_link = f"csh{tag}", f"csn{tag}"
        subnet = 100 + (os.getpid() + index) % 150
        self.host_ip, self.ns_ip = f"10.232.{subnet}.1", f"10.232.{subnet}.2"
        self.prefix = ("ip", "netns", "exec", self.name)
        self._cut = False
        self._run("ip", "netns", "add", self.name)
        self._run("ip", "link", "add", self._host_link, "type", "veth", "peer", "name", self._ns_link)
        self._run("ip", "link", "set", self._ns_link, "netns", self.name)
        self._run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self._host_link)
        self._run("ip", "link", "set", self._host_link, "up")
        self._run(*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self._ns_link)
        self._run(*self.prefix, "ip", "link", "set", self._ns_link, "up")
        self._run(*self.prefix, "ip", "link", "set", "lo", "up")

    @staticmethod
    def _run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True)

    def cut(self) -> None:
        """Drop every packet both ways; sockets stay open and learn nothing."""
        self._run("tc", "qdisc", "add", "dev", self._host_link, "root", "pfifo", "limit", "0")
        self._run(*self.prefix, "tc", "qdisc", "add", "dev", self._ns_link, "root", "pfifo", "limit", "0")
        self._cut = True

    def heal(self) -> None:
        if self._cut:
            self._run("tc", "qdisc", "del", "dev", self._host_link, "root")
            self._run(*self.prefix, "tc", "qdisc", "del", "dev", self._ns_link, "root")
            self._cut = False

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self._host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
