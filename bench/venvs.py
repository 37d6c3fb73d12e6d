"""Peers' own virtual environments for the benchmarks (ChatStream, vLLM): created on first
use, never part of the services' environment or of `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def ensure_venv(venv: Path, packages: list[str], imports: str, remove: tuple[str, ...] = ()) -> Path | None:
    """The Python of ``venv`` once ``import {imports}`` works there, installing ``packages``
    (then uninstalling ``remove``) the first time; None, and why, where that fails."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", f"import {imports}"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} ({' '.join(packages)}; a few minutes, once)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *packages], check=True)
        if remove:
            subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", *remove], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"{venv.name} skipped: {exc}", flush=True)
        return None
    return python
