"""``make images``: build the API and the CPU generator image from the project's own Dockerfiles.

The Dockerfiles are what a user with a registry builds unchanged (public base image pinned by
digest, torch from the PyTorch index). This script only picks build arguments, for a machine
that may reach neither:

- **Base image.** The Dockerfiles' pinned ``python:3.11-slim-bookworm`` when it can be pulled (or
  is present); else ``PYTHON_IMAGE`` from the environment; else a local stand-in,
  ``chatstream-local/python:3.11-bookworm``: a Debian bookworm root file system made by
  ``debootstrap`` (kept in ``.cache/images/`` so it is made once per machine), ``docker import``ed,
  with ``scripts/images/python-base.Dockerfile`` on top.
- **torch.** Where pip's configuration (or ``TORCH_FIND_LINKS``) names a folder that holds the
  pinned torch wheel, that folder is served over loopback for the build (``--network host``) and
  passed as ``TORCH_FIND_LINKS``; else the PyTorch index of ``TORCH_VARIANT`` (cpu).

Layers are cached by the Docker Engine, so a second run with no change takes seconds. Writes
``.cache/images/report.json``: the images, their sizes and the build times.

Usage: ``python scripts/images.py [--only api|generator] [--no-cache]``. Needs a running Docker Engine
(``scripts/install_docker.sh`` installs and starts one).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "images"
#: The tags docker-compose.yml names, so that `docker compose up` runs what was built here.
API_IMAGE = "chatstream/api:0.1.0"
GENERATOR_IMAGE = "chatstream/generator:0.1.0-cpu"
ROOTFS_IMAGE = "chatstream-local/debian:bookworm"
LOCAL_PYTHON_IMAGE = "chatstream-local/python:3.11-bookworm"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


def docker(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=check, text=True, capture_output=capture)


def has_image(name: str) -> bool:
    return docker("image", "inspect", name, capture=True, check=False).returncode == 0


def dockerfile_default(dockerfile: Path, arg: str) -> str:
    """The default of ``ARG name=value`` in a Dockerfile: the image a user with a registry gets."""
    match = re.search(rf"^ARG {arg}=(\S+)$", dockerfile.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{dockerfile}: no ARG {arg}=... line")
    return match.group(1)


def python_image() -> str:
    """The base image for both Dockerfiles (see the module's docstring for the order)."""
    pinned = dockerfile_default(REPO / "services" / "api" / "Dockerfile", "PYTHON_IMAGE")
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"]
    if has_image(pinned) or docker("pull", "--quiet", pinned, capture=True, check=False).returncode == 0:
        return pinned
    print(f"{pinned} cannot be pulled: building the local stand-in {LOCAL_PYTHON_IMAGE}")
    if not has_image(ROOTFS_IMAGE):
        docker("import", str(rootfs_tarball()), ROOTFS_IMAGE)
    with tempfile.TemporaryDirectory() as context:
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", Path(context) / "ca-certificates.crt")
        dockerfile = REPO / "scripts" / "images" / "python-base.Dockerfile"
        docker("build", "--quiet", "-f", str(dockerfile), "--build-arg", f"ROOTFS_IMAGE={ROOTFS_IMAGE}",
               "-t", LOCAL_PYTHON_IMAGE, context, capture=True)
    return LOCAL_PYTHON_IMAGE


def rootfs_tarball() -> Path:
    """A minimal Debian bookworm with Python 3.11, made once by debootstrap (about a minute)."""
    tarball = CACHE / "debian-bookworm-rootfs.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing (scripts/install_docker.sh installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(root), DEBIAN_MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )
        partial = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        os.replace(partial, tarball)
    return tarball


def torch_wheel_folder() -> Path | None:
    """A local folder holding the pinned torch's CPU wheel, if this machine has one."""
    pin = re.search(r"^torch==(\S+)$", (REPO / "services" / "generator" / "requirements.txt").read_text(), re.M)
    assert pin is not None, "services/generator/requirements.txt pins torch"
    candidates = [os.environ.get("TORCH_FIND_LINKS", "")]
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    candidates += re.findall(r"find-links='([^']+)'", config)
    for folder in (Path(c) for c in " ".join(candidates).split() if c and "://" not in c):
        if any(folder.glob(f"torch-{pin.group(1)}+cpu-*.whl")):
            return folder
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


#: The loopback port torch's folder is served on. Fixed, because the URL is a build argument and a
#: build argument that changes misses the layer cache: a new port each run would reinstall torch
#: (about a minute) in every build. A random port only when this one is taken.
WHEEL_PORT = 38517


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``folder`` on loopback; the build reaches it with --network host."""
    handler = functools.partial(_Quiet, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def build(tag: str, dockerfile: str, args: dict[str, str], no_cache: bool = False) -> float:
    started = time.monotonic()
    command = ["build", "--network", "host", "-f", dockerfile, "-t", tag, *(["--no-cache"] if no_cache else [])]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    print(f"building {tag}")
    docker(*command, str(REPO))
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["api", "generator"])
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer (build times from cold)")
    options = parser.parse_args(argv)
    if docker("info", capture=True, check=False).returncode != 0:
        raise SystemExit("no Docker Engine answers (scripts/install_docker.sh installs and starts one)")
    os.environ.setdefault("DOCKER_BUILDKIT", "0")  # Engine 20.10 without buildx: the classic builder
    started = time.monotonic()
    base = python_image()
    report: dict[str, object] = {"python_image": base, "base_seconds": round(time.monotonic() - started, 1), "images": {}}
    images = report["images"]
    assert isinstance(images, dict)
    if options.only in (None, "api"):
        seconds = build(API_IMAGE, "services/api/Dockerfile", {"PYTHON_IMAGE": base}, options.no_cache)
        images[API_IMAGE] = {"build_seconds": round(seconds, 1), "bytes": image_size(API_IMAGE)}
    if options.only in (None, "generator"):
        args = {"PYTHON_IMAGE": base, "TORCH_VARIANT": "cpu"}
        folder = torch_wheel_folder()
        server = None
        if folder is not None:
            server, args["TORCH_FIND_LINKS"] = serve(folder)
            print(f"torch from {folder} (served at {args['TORCH_FIND_LINKS']})")
        try:
            seconds = build(GENERATOR_IMAGE, "services/generator/Dockerfile", args, options.no_cache)
        finally:
            if server is not None:
                server.shutdown()
        images[GENERATOR_IMAGE] = {"build_seconds": round(seconds, 1), "bytes": image_size(GENERATOR_IMAGE)}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for tag, facts in images.items():
        print(f"{tag}: {facts['bytes'] / 1e6:.0f} MB, built in {facts['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
