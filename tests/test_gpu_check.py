"""bench/gpu_check.py, the check that runs on a GPU machine (no network, no weights), works
before it gets there: its --smoke mode runs the same code on a tiny model on this CPU.

Nothing here needs or measures a GPU; the GPU figures come from running the script there
(bench/results/gpu_check.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"
#: The API side's packages and the tracing SDK: a GPU image need not have them.
NOT_ON_A_GPU_MACHINE = ("redis", "arq", "fastapi", "starlette", "uvicorn", "httpx", "opentelemetry")

RUN_WITHOUT_THEM = f"""
import runpy, sys
for name in {NOT_ON_A_GPU_MACHINE!r}:
    sys.modules[name] = None  # importing it now raises ImportError
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""

WHAT_OUR_SIDE_IMPORTS = f"""
import json, sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check
before = set(sys.modules)
gpu_check.scheduler_api()
imported = {{name.split(".")[0] for name in set(sys.modules) - before}}
print(json.dumps(sorted(imported - set(sys.stdlib_module_names) - {{"services"}})))
"""


def test_smoke_run_reports_our_scheduler_and_generate_against_the_roofline(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_THEM, "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,  # not the repository: the script finds the services package by itself
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (report["check"], report["gpu_figures"], report["environment"]["device"]) == ("smoke", False, "cpu")
    assert report["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V x layers x KV heads x head dim x fp32
    assert 0 < report["model"]["weight_bytes_read_per_step"] < report["model"]["parameters"] * 4
    assert [level["concurrency"] for level in report["levels"]] == [1, 2, 4]
    for level in report["levels"]:
        assert level["roofline_decode_tokens_per_s"] > 0
        for name in ("ours", "generate"):
            figures = level[name]
            assert figures["tokens"] == figures["tokens_expected"] == 8 * level["concurrency"], (name, figures)
            assert figures["decode_tokens_per_s"] > 0 and figures["end_to_end_tokens_per_s"] > 0, (name, figures)
            assert 0 < figures["decode_fraction_of_roofline"] < 1, (name, figures)
            assert 0 < figures["itl_ms_p50"] <= figures["itl_ms_p99"], (name, figures)
            assert 0 < figures["ttft_ms_p50"] <= figures["ttft_ms_max"], (name, figures)
        assert level["ours_vs_generate_decode"] > 0
    # One stream, float32, greedy: our decode loop picks exactly generate's tokens.
    assert report["levels"][0]["rows_with_generates_tokens"] == 1
    assert "**Not GPU figures**" in (tmp_path / "gpu_check.md").read_text()


def test_our_side_needs_nothing_beyond_torch_transformers_and_the_wheels_the_script_carries() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import CARRIED_WHEELS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    result = subprocess.run(
        [sys.executable, "-c", WHAT_OUR_SIDE_IMPORTS], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    needed = set(json.loads(result.stdout.splitlines()[-1]))
    assert needed <= set(CARRIED_WHEELS), f"add to CARRIED_WHEELS in bench/gpu_check.py: {needed - set(CARRIED_WHEELS)}"
