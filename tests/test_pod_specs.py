"""The chart's pods, run from ``helm template`` output on a real Docker Engine.

Everything a pod gets comes from the rendering, translated by tests/support/kubelet.py: the
user (10001; Redis 999), the read-only root with exactly the chart's writable mounts, all
capabilities dropped, no privilege escalation, the memory limits, the environment from the
chart's ConfigMaps and Secrets (the Redis passwords and the API key it generated, REDIS_URL with
``$(REDIS_PASSWORD)`` expanded, the pod name as WORKER_ID), the mounted API key and ACL rules,
the Services' DNS names, the probes and the stop (preStop, then the grace period). The images are
the project's (``make images``); only the Redis image, which cannot be pulled here, is Debian's
redis-server in its place, started by the chart's own command. So a chart change that would
break a pod (a mount removed, an environment variable renamed, a probe pointed elsewhere, an ACL
rule missing) fails here, before a cluster sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.client import assert_openai_client_streams_paris
from tests.support.deploy import helm_template, parse
from tests.support.images import REDIS_STAND_IN
from tests.support.kubelet import Kubelet, Pod, by_name, docker

NAMESPACE = "llm"
RELEASE = "chat"
NAME = f"{RELEASE}-chatstream"

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dockerd") is None and os.geteuid() != 0,
        reason="needs a Docker Engine (scripts/install_docker.sh, part of `make test`, installs one as root)",
    ),
    pytest.mark.timeout(900),
]


def local_images(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The chart's images → what runs here: the images `make images` built (the CPU build of the
    generator: the chart's default is the CUDA one, same Dockerfile) and the Redis stand-in."""
    images = {}
    for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            if image.startswith("chatstream/generator:"):
                images[image] = "chatstream/generator:0.1.0-cpu"
            elif image.startswith("chatstream/api:"):
                images[image] = "chatstream/api:0.1.0"
            elif image.startswith("redis:"):
                images[image] = REDIS_STAND_IN
    return images


@pytest.fixture(scope="module")
def cluster(container_images: dict, tmp_path_factory: pytest.TempPathFactory):
    objects = parse(helm_template(release=RELEASE, namespace=NAMESPACE))
    kubelet = Kubelet(objects, NAMESPACE, local_images(objects), tmp_path_factory.mktemp("pods"))
    try:
        yield kubelet
    finally:
        if os.environ.get("CHATSTREAM_KEEP_PODS") != "1":
            kubelet.close()


def started(pod: Pod) -> float:
    """Startup, then readiness and liveness as the kubelet runs them; seconds to ready."""
    seconds = pod.wait_until_passes("startupProbe")
    seconds += pod.wait_until_passes("readinessProbe")
    pod.wait_until_passes("livenessProbe")
    return seconds


def assert_runs_as_the_chart_says(pod: Pod) -> None:
    """What the process in the container really gets (not what docker was asked for)."""
    security = {**pod.spec.get("securityContext", {}), **pod.main.get("securityContext", {})}
    status = docker("exec", pod.container, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid, gid = fields["Uid"].split()[0], fields["Gid"].split()[0]
    assert (uid, gid) == (str(security["runAsUser"]), str(security["runAsGroup"])), (pod.name, uid, gid)
    assert str(pod.spec["securityContext"]["fsGroup"]) in fields["Groups"].split(), (pod.name, fields["Groups"])
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, (pod.name, fields["CapEff"], fields["CapBnd"])
    assert fields["NoNewPrivs"].strip() == "1", pod.name
    # The root is read-only; the chart's emptyDir mounts are the only writable places.
    assert docker("exec", pod.container, "sh", "-c", "echo x > /written", check=False).returncode != 0, pod.name
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    for mount in pod.main.get("volumeMounts", []):
        writable = "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")
        probe = docker("exec", pod.container, "sh", "-c", f"echo x > {mount['mountPath']}/.written", check=False)
        assert (probe.returncode == 0) == writable, (pod.name, mount, probe.stderr)


def test_the_charts_pods_run_serve_and_stop_from_its_rendering(cluster: Kubelet) -> None:
    ready: dict[str, float] = {}
    redis = cluster.start("StatefulSet", f"{NAME}-redis")
    sessions = cluster.start("StatefulSet", f"{NAME}-redis-sessions")
    for pod in (redis, sessions):
        ready[pod.name] = started(pod)
    began = time.monotonic()
    generator = cluster.start("Deployment", f"{NAME}-generator")
    api = cluster.start("Deployment", f"{NAME}-api")
    ready[api.name] = started(api)
    ready[generator.name] = started(generator)
    print("start to ready (probes passing):", {k: round(v, 1) for k, v in ready.items()})

    # /readyz: the API reaches both Redis servers with the chart's ACL users and a generator
    # (the pod named in WORKER_ID, which its probe checks) has registered.
    internal = f"http://{api.ip}:{api.port('internal')}"
    response = httpx.get(f"{internal}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    print(f"generator and API pods: start to API /readyz {time.monotonic() - began:.1f} s")
    for pod in (redis, sessions, api, generator):
        assert_runs_as_the_chart_says(pod)

    # A request with the API key the chart generated (mounted from its Secret, never anonymous).
    key = cluster._secret(f"{NAME}-api-keys")["API_KEYS"].split()[0]
    base_url = f"http://{api.ip}:{api.port('http')}"
    refused = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "default", "messages": []}, timeout=10)
    assert refused.status_code == 401, refused.text
    assert_openai_client_streams_paris(base_url, key)
    with httpx.stream("POST", f"{base_url}/chat_stream", json={"user_input": "Say hello."},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.read().strip()

    # The kubelet's stop: both services end cleanly within their grace periods.
    for pod in (api, generator):
        state = pod.stop()
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (pod.name, state, pod.logs()[-3000:])


def test_a_chart_change_that_breaks_a_pod_fails_here(cluster: Kubelet) -> None:
    """The translation is not lenient: the API pod with its readiness probe pointed at a path the
    API does not serve starts (its startup probe passes) but never becomes ready."""
    deployment = by_name(cluster.objects, "Deployment", f"{NAME}-api")
    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["path"] = "/no-such-probe"
    broken["metadata"]["name"] = f"{NAME}-api-broken"
    cluster.objects.append(broken)
    pod = cluster.start("Deployment", f"{NAME}-api-broken")
    pod.wait_until_passes("startupProbe")
    with pytest.raises(AssertionError, match="readinessProbe did not pass"):
        pod.wait_until_passes("readinessProbe", seconds=5)
