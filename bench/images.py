"""Image sizes, build times and cold start to ready: ``make bench-images``.

1. ``scripts/images.py --no-cache``: both images built from cold (every layer; the base image
   is kept), then again with the layer cache (what a code-only change costs is in between).
2. Cold starts, ``--runs`` times: the chart's pods (``helm template`` defaults, run by
   tests/support/kubelet.py as the chart says: read-only root, uid 10001, its probes) with both
   Redis servers already up; the generator and API containers are created and started together
   and timed until the API's ``/readyz`` answers 200 (Redis reachable and the generator, with the
   default model loaded from the image, registered), and until each pod's readiness probe passes.

Writes bench/results/images.{json,md}. Needs the Docker Engine (``make docker-engine``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.deploy import helm_template, parse  # noqa: E402
from tests.support.images import build_images  # noqa: E402
from tests.support.kubelet import Kubelet  # noqa: E402
from tests.test_pod_specs import NAME, NAMESPACE, RELEASE, local_images  # noqa: E402

RESULTS = REPO / "bench" / "results"


def build(no_cache: bool) -> dict:
    subprocess.run([sys.executable, "scripts/images.py", *(["--no-cache"] if no_cache else [])], cwd=REPO, check=True)
    return json.loads((REPO / ".cache" / "images" / "report.json").read_text())


def cold_start(objects: list, workdir: Path) -> dict[str, float]:
    kubelet = Kubelet(objects, NAMESPACE, local_images(objects), workdir)
    try:
        for name in (f"{NAME}-redis", f"{NAME}-redis-sessions"):
            kubelet.start("StatefulSet", name).wait_until_passes("readinessProbe")
        began = time.monotonic()
        generator = kubelet.start("Deployment", f"{NAME}-generator")
        api = kubelet.start("Deployment", f"{NAME}-api")
        readyz = f"http://{api.ip}:{api.port('internal')}/readyz"
        while True:
            try:
                if httpx.get(readyz, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - began > 300:
                raise SystemExit(f"/readyz not 200 after 300 s\n{generator.logs()[-3000:]}")
            time.sleep(0.05)
        to_readyz = time.monotonic() - began
        # Probes tried back to back from here, not at the kubelet's period: when each first passes.
        api.wait_until_passes("readinessProbe")
        api_ready = time.monotonic() - began
        generator.wait_until_passes("readinessProbe")
        return {"api_readyz_seconds": to_readyz, "api_probe_seconds": api_ready,
                "generator_probe_seconds": time.monotonic() - began}
    finally:
        kubelet.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args(argv)
    build_images()  # the engine, the base image and the Redis stand-in
    cold = build(no_cache=True)
    cached = build(no_cache=False)
    objects = parse(helm_template(release=RELEASE, namespace=NAMESPACE))
    starts = []
    for run in range(options.runs):
        with tempfile.TemporaryDirectory() as workdir:
            starts.append(cold_start(objects, Path(workdir)))
        print(f"cold start {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in starts[-1].items()))
    medians = {k: round(statistics.median(s[k] for s in starts), 2) for k in starts[0]}
    result = {
        "images": {tag: {"bytes": facts["bytes"], "cold_build_seconds": facts["build_seconds"],
                         "cached_build_seconds": cached["images"][tag]["build_seconds"]}
                   for tag, facts in cold["images"].items()},
        "python_image": cold["python_image"],
        "cold_start_runs": starts,
        "cold_start_median": medians,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "images.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Images: size, build time, cold start to ready",
        "",
        f"`make bench-images` on this machine (2 cores, no registry: base image {cold['python_image']}, "
        "torch served from the machine's disk). Build: every layer from cold (`--no-cache`, base image kept), then with the layer cache.",
        "",
        "| image | size | cold build | cached build |",
        "|---|---|---|---|",
    ]
    for tag, facts in result["images"].items():
        lines.append(f"| `{tag}` | {facts['bytes'] / 1e6:.0f} MB | {facts['cold_build_seconds']:.0f} s | {facts['cached_build_seconds']:.1f} s |")
    lines += [
        "",
        f"Cold start of the chart's generator and API pods together (Redis already up), median of {options.runs}:",
        "",
        f"- to the API's `/readyz` 200 (generator registered, model loaded from the image): {medians['api_readyz_seconds']:.2f} s",
        f"- to the API pod's readiness probe passing: {medians['api_probe_seconds']:.2f} s",
        f"- to the generator pod's readiness probe passing: {medians['generator_probe_seconds']:.2f} s",
        "",
    ]
    (RESULTS / "images.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
