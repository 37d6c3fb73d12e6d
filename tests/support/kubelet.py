"""Run the chart's pods on a Docker Engine the way a kubelet would, from ``helm template`` output.

Only what the chart's pods use is translated, and anything else fails loudly (so a chart change
that this cannot run is noticed, not silently dropped):

- one container per pod, no init containers; ``command``/``args`` as ENTRYPOINT/CMD with
  ``$(VAR)`` expanded from the container's environment;
- the environment: ``envFrom`` ConfigMaps and Secrets, then ``env`` values (``$(VAR)`` expanded),
  ``secretKeyRef``, ``configMapKeyRef`` and ``fieldRef`` of the pod's name and namespace;
- the security context: user and group (``fsGroup`` as a supplementary group), read-only root,
  capabilities, ``allowPrivilegeEscalation: false`` as no-new-privileges; the memory limit;
- volumes: ``emptyDir`` as an empty 0777 folder bind-mounted (as the kubelet makes it), or a
  tmpfs when memory-backed (``sizeLimit`` as its size); ``configMap``/``secret`` as read-only
  bind mounts of their files (``items`` honoured);
- the host name (the pod name), DNS names of the Services that select the pod
  (``name``, ``name.namespace.svc``, ``...svc.cluster.local``) as network aliases on one network;
- probes (``httpGet``, ``tcpSocket``, ``exec``) run against the container's address, and a stop
  that runs the ``preStop`` hook and then stops with the pod's grace period.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LABEL = "chatstream-test=pod-specs"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``8Gi``, ``1M``, ``100``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    assert match, f"memory quantity {quantity!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (``$$`` escapes; an unknown name stays as written)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Unsupported(AssertionError):
    """The rendered pod uses something this translation does not run."""


@dataclass
class Pod:
    """One running pod: its container, address and the spec it came from."""

    name: str
    spec: dict[str, Any]
    container: str
    ip: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def main(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        (number,) = [p["containerPort"] for p in self.main.get("ports", []) if p["name"] == port]
        return int(number)

    def probe(self, probe: dict[str, Any]) -> tuple[bool, str]:
        """One try of a probe, as the kubelet does it: (passed, what it saw)."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{self.ip}:{self.port(get['port'])}{get.get('path', '/')}"
            try:
                status = httpx.get(url, timeout=timeout).status_code
            except httpx.HTTPError as e:
                return False, f"GET {url}: {e!r}"
            return 200 <= status < 400, f"GET {url}: {status}"
        if "tcpSocket" in probe:
            port = self.port(probe["tcpSocket"]["port"])
            try:
                socket.create_connection((self.ip, port), timeout=timeout).close()
            except OSError as e:
                return False, f"connect {self.ip}:{port}: {e!r}"
            return True, f"connect {self.ip}:{port}"
        if "exec" in probe:
            command = probe["exec"]["command"]
            try:
                result = docker("exec", self.container, *command, timeout=timeout + 5, check=False)
            except subprocess.TimeoutExpired:
                return False, f"{command}: timed out"
            return result.returncode == 0, f"{command}: exit {result.returncode} {result.stdout}{result.stderr}"
        raise Unsupported(f"probe {probe}")

    def state(self) -> dict[str, Any]:
        import json

        return json.loads(docker("inspect", "--format", "{{json .State}}", self.container).stdout)

    def logs(self) -> str:
        result = docker("logs", self.container, check=False)
        return result.stdout + result.stderr

    def wait_until_passes(self, kind: str, seconds: float | None = None) -> float:
        """Try the pod's ``kind`` probe (startupProbe, readinessProbe, livenessProbe) until it
        passes, within what the kubelet allows (failureThreshold x periodSeconds) or ``seconds``;
        returns the time it took. A probe the pod lacks passes at once, as on Kubernetes."""
        probe = self.main.get(kind)
        started = time.monotonic()
        if probe is None:
            return 0.0
        allowed = seconds if seconds is not None else probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
        seen = ""
        while time.monotonic() - started < allowed:
            passed, seen = self.probe(probe)
            if passed:
                return time.monotonic() - started
            if self.state()["Status"] != "running":
                break
            time.sleep(0.25)
        raise AssertionError(f"{self.name}: {kind} did not pass within {allowed:.0f} s (last: {seen})\n{self.logs()[-4000:]}")

    def stop(self) -> dict[str, Any]:
        """The kubelet's stop: the preStop hook, then SIGTERM and, after the grace period, SIGKILL.
        Returns the container's final state."""
        started = time.monotonic()
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        hook = self.main.get("lifecycle", {}).get("preStop")
        if hook is not None:
            if "exec" not in hook:
                raise Unsupported(f"preStop {hook}")
            docker("exec", self.container, *hook["exec"]["command"], timeout=grace + 5, check=False)
        left = max(1, grace - int(time.monotonic() - started))
        docker("stop", "--time", str(left), self.container, timeout=left + 30)
        return self.state()


class Kubelet:
    """Runs pods of one rendering on one Docker network; removes what it made on ``close``."""

    def __init__(self, objects: list[dict[str, Any]], namespace: str, images: dict[str, str], workdir: Path) -> None:
        self.objects = objects
        self.namespace = namespace
        self.images = images
        self.workdir = workdir
        # What a run that was killed left behind (pods are named as the controllers name them).
        leftover = docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
        if leftover:
            docker("rm", "--force", "--volumes", *leftover)
        self.network = f"chatstream-pods-{int(time.time() * 1000) % 10**9}"
        docker("network", "create", "--label", LABEL, self.network)
        self.pods: list[Pod] = []

    def close(self) -> None:
        for pod in self.pods:
            docker("rm", "--force", "--volumes", pod.container, check=False)
        docker("network", "rm", self.network, check=False)

    # ------------------------------------------------------------- translation

    def _secret(self, name: str) -> dict[str, str]:
        data = by_name(self.objects, "Secret", name)
        decoded = {k: base64.b64decode(v).decode() for k, v in (data.get("data") or {}).items()}
        return {**decoded, **(data.get("stringData") or {})}

    def _config_map(self, name: str) -> dict[str, str]:
        return dict(by_name(self.objects, "ConfigMap", name).get("data") or {})

    def environment(self, container: dict[str, Any], pod_name: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self._config_map(source["configMapRef"]["name"]))
            elif "secretRef" in source:
                env.update(self._secret(source["secretRef"]["name"]))
            else:
                raise Unsupported(f"envFrom {source}")
        fields = {"metadata.name": pod_name, "metadata.namespace": self.namespace}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = expand(str(entry["value"]), env)
                continue
            source = entry.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[entry["name"]] = self._secret(ref["name"])[ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[entry["name"]] = self._config_map(ref["name"])[ref["key"]]
            elif "fieldRef" in source and source["fieldRef"]["fieldPath"] in fields:
                env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
            elif not source:
                env[entry["name"]] = ""
            else:
                raise Unsupported(f"env {entry}")
        return env

    def _volume_files(self, pod_name: str, volume: dict[str, Any]) -> Path:
        """The files of a configMap or secret volume, written where a bind mount can take them."""
        if "configMap" in volume:
            data, items = self._config_map(volume["configMap"]["name"]), volume["configMap"].get("items")
        else:
            data, items = self._secret(volume["secret"]["secretName"]), volume["secret"].get("items")
        folder = self.workdir / pod_name / volume["name"]
        folder.mkdir(parents=True)
        folder.chmod(0o755)
        for key, path in ((i["key"], i["path"]) for i in items) if items else ((k, k) for k in data):
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])
            target.chmod(0o644)  # defaultMode 0644, readable by the pod's user
        return folder

    def _services_selecting(self, labels: dict[str, str]) -> list[str]:
        names = []
        for service in (o for o in self.objects if o["kind"] == "Service"):
            selector = service["spec"].get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                names.append(service["metadata"]["name"])
        return names

    def run_args(self, workload: dict[str, Any], pod_name: str) -> tuple[list[str], dict[str, str]]:
        """``docker run`` arguments for one pod of ``workload`` (a Deployment or StatefulSet)."""
        template = workload["spec"]["template"]
        spec = template["spec"]
        if spec.get("initContainers") or len(spec["containers"]) != 1:
            raise Unsupported(f"{workload['metadata']['name']}: only one container and no init containers are run")
        container = spec["containers"][0]
        pod_security, security = spec.get("securityContext") or {}, container.get("securityContext") or {}
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            assert user not in (None, 0), f"{pod_name}: runAsNonRoot needs a numeric non-root runAsUser here"
        args = ["--name", pod_name, "--hostname", pod_name, "--label", LABEL, "--network", self.network]
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if "fsGroup" in pod_security:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for capability in (security.get("capabilities") or {}).get("drop", []):
            args += ["--cap-drop", capability]
        for capability in (security.get("capabilities") or {}).get("add", []):
            args += ["--cap-add", capability]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if security.get("privileged"):
            raise Unsupported(f"{pod_name}: privileged")
        memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if memory:
            args += ["--memory", str(quantity_bytes(memory))]
        args += ["--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if "subPath" in mount:
                raise Unsupported(f"{pod_name}: subPath mount {mount}")
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                empty_dir = volume["emptyDir"] or {}
                if empty_dir.get("medium") == "Memory":
                    options = ["mode=0777", "exec"]  # docker's tmpfs default is noexec; an emptyDir is not
                    if "sizeLimit" in empty_dir:
                        options.append(f"size={quantity_bytes(empty_dir['sizeLimit'])}")
                    args += ["--tmpfs", f"{mount['mountPath']}:{','.join(options)}"]
                else:
                    # What the kubelet makes: an empty 0777 folder on the node's disk. (A docker
                    # tmpfs over a folder the image has takes that folder's owner and mode.)
                    folder = self.workdir / pod_name / volume["name"]
                    folder.mkdir(parents=True, exist_ok=True)
                    folder.chmod(0o777)
                    args += ["--mount", f"type=bind,src={folder},dst={mount['mountPath']}"]
            elif "configMap" in volume or "secret" in volume:
                folder = self._volume_files(pod_name, volume)
                args += ["--mount", f"type=bind,src={folder},dst={mount['mountPath']},readonly"]
            else:
                raise Unsupported(f"{pod_name}: volume {volume}")
        for service in self._services_selecting(template["metadata"].get("labels") or {}):
            for alias in (service, f"{service}.{self.namespace}.svc", f"{service}.{self.namespace}.svc.cluster.local"):
                args += ["--network-alias", alias]
        env = self.environment(container, pod_name)
        for name, value in env.items():
            args += ["--env", f"{name}={value}"]
        image = self.images.get(container["image"])
        if image is None:
            raise Unsupported(f"{pod_name}: no local image for {container['image']} (have {sorted(self.images)})")
        command = [expand(str(a), env) for a in container.get("command", [])]
        container_args = [expand(str(a), env) for a in container.get("args", [])]
        if command:
            args += ["--entrypoint", command[0], image, *command[1:], *container_args]
        else:
            args += [image, *container_args]
        return args, env

    def start(self, kind: str, name: str, pod_name: str | None = None) -> Pod:
        """Start one pod of the workload ``kind``/``name``; its name as the controller would make it
        (a StatefulSet's ordinal 0, a Deployment's hash and suffix)."""
        workload = by_name(self.objects, kind, name)
        pod_name = pod_name or (f"{name}-0" if kind == "StatefulSet" else f"{name}-5d8c7b9f4-{len(self.pods):05x}")
        args, env = self.run_args(workload, pod_name)
        docker("run", "--detach", *args)
        pod = Pod(pod_name, workload["spec"]["template"]["spec"], pod_name, env=env)
        self.pods.append(pod)
        pod.ip = docker(
            "inspect", "--format", f"{{{{(index .NetworkSettings.Networks \"{self.network}\").IPAddress}}}}", pod_name
        ).stdout.strip()
        assert pod.ip, f"{pod_name}: no address on {self.network}"
        return pod
