"""Generator throughput: one engine, N concurrent requests, batched vs sequential.

Runs the engines in-process (no Redis, no API), so it measures the decode loop
alone: aggregate tokens/s over all streams, and each stream's inter-token latency
(ITL) against a single stream on the same engine. Greedy decoding with the
generator's default repetition penalty; prompts ask for long answers so that most
requests run to ``--max-new-tokens``.

    .venv/bin/python bench/generator_throughput.py            # or: make bench-generator

Writes ``bench/results/generator_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.contract import ChatMessage  # noqa: E402
from services.generator.engine import Engine, ResolvedSampling, create_engine  # noqa: E402
from services.generator.settings import DEFAULT_MODEL_DIR, GeneratorSettings  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "the history of bread", "a robot who learns to paint", "how rivers shape valleys",
    "a chess tournament", "the first trip to Mars", "a city garden", "why the sky is blue",
    "a lost cat finding home", "how bicycles work", "a storm at sea", "the life of a honeybee",
    "an old library", "making pottery", "a mountain village in winter", "how computers add numbers",
]


def prompt(i: int) -> str:
    # Lengths differ on purpose: the batch must handle sequences of different lengths.
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." + " Make it vivid." * (i % 4)


async def one_stream(engine: Engine, i: int, sampling: ResolvedSampling) -> dict:
    started = time.perf_counter()
    generation = engine.start([ChatMessage(role="user", content=prompt(i))], sampling, threading.Event())
    times = []
    async for _ in generation:
        times.append(time.perf_counter())
    tokens = generation.completion_tokens
    itl = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return {
        "tokens": tokens,
        "ttft_s": times[0] - started if times else None,
        "itl_s": itl,
        "end": times[-1] if times else started,
    }


async def run_level(engine: Engine, concurrency: int, sampling: ResolvedSampling) -> dict:
    started = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(engine, i, sampling) for i in range(concurrency)))
    elapsed = max(s["end"] for s in streams) - started
    tokens = sum(s["tokens"] for s in streams)
    itls = [s["itl_s"] for s in streams if s["itl_s"] is not None]
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "aggregate_tokens_per_s": round(tokens / elapsed, 2),
        "itl_ms_mean": round(statistics.mean(itls) * 1000, 2),
        "itl_ms_max": round(max(itls) * 1000, 2),
        "ttft_ms_mean": round(statistics.mean(s["ttft_s"] for s in streams) * 1000, 1),
    }


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


def markdown(report: dict) -> str:
    rows = {(r["mode"], r["concurrency"]): r for r in report["results"]}
    levels = sorted({r["concurrency"] for r in report["results"]})
    seq1, bat1 = rows[("sequential", 1)], rows[("batched", 1)]
    lines = [
        "# Generator throughput: continuous batching vs sequential",
        "",
        f"Model `{report['model']}`, {report['max_new_tokens']} new tokens per request (greedy, repetition penalty "
        f"{report['repetition_penalty']}), {report['cpu_count']} CPU cores, torch {report['torch']}, "
        f"transformers {report['transformers']}, {report['date']}.",
        "Aggregate = all tokens of all streams / wall time until the last one ended. ITL = a stream's mean "
        "inter-token latency; the ratio compares it with one stream alone on the same engine.",
        "",
        "| concurrent | sequential tok/s | batched tok/s | batched / sequential | batched ITL ms "
        "| ITL vs single stream | sequential TTFT ms | batched TTFT ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        s, b = rows[("sequential", level)], rows[("batched", level)]
        lines.append(
            f"| {level} | {s['aggregate_tokens_per_s']} | {b['aggregate_tokens_per_s']} | "
            f"{b['aggregate_tokens_per_s'] / s['aggregate_tokens_per_s']:.2f}× | {b['itl_ms_mean']} | "
            f"{b['itl_ms_mean'] / bat1['itl_ms_mean']:.2f}× "
            f"({b['itl_ms_mean'] / seq1['itl_ms_mean']:.2f}× of sequential) | "
            f"{s['ttft_ms_mean']} | {b['ttft_ms_mean']} |"
        )
    lines += ["", "Target: ≥ 3× aggregate at 8 concurrent, with per-stream ITL ≤ 2× single-stream.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--levels", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generator_throughput"))
    args = parser.parse_args()

    import torch
    import transformers

    levels = [int(x) for x in args.levels.split(",")]
    sampling = ResolvedSampling(
        max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.1, stop=[]
    )
    results = []
    for mode in ("sequential", "batched"):
        results += asyncio.run(bench_engine(mode, args.model, levels, sampling))
    report = {
        "model": Path(args.model).name,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
