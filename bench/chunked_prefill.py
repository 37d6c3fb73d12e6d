"""Long prompts vs running streams (issue 19's target): while an ~8,000-token prompt joins
the batch, the p99 inter-token latency of 8 running streams should stay ≤ 3× their normal ITL.

In-process, our batching engine on the default model (no Redis, no API): 8 streams run
greedy to ``--tokens``; once each has a few tokens, one request with a long prompt joins.
A running stream's gaps are split into "normal" (before the long prompt was submitted and
after its first token) and "during the join" (between those two moments). Each
``--chunks`` value (PREFILL_CHUNK_TOKENS; 0 = the whole prompt in one pass, the old
behaviour) runs in the same process, one after another.

    .venv/bin/python bench/chunked_prefill.py     # ~3 min; bench/results/chunked_prefill.{json,md}
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

from bench.generator_throughput import quantile  # noqa: E402
from services.common.contract import ChatMessage  # noqa: E402
from services.generator.sampling import ResolvedSampling  # noqa: E402
from services.generator.factory import create_engine  # noqa: E402
from services.generator.settings import DEFAULT_MODEL_DIR, GeneratorSettings  # noqa: E402


async def one_level(model: str, chunk: int, streams: int, tokens: int, long_words: int) -> dict:
    engine = create_engine(GeneratorSettings(model_id=model, generator_slots=streams + 1, prefill_chunk_tokens=chunk))
    sampling = ResolvedSampling(max_new_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[])
    times: list[list[float]] = [[] for _ in range(streams)]
    try:
        # Warm-up: kernels and allocator for a batch and for a long prefill.
        warm = engine.start([ChatMessage(role="user", content="word " * 500)], sampling, threading.Event())
        async for _ in warm:
            break

        async def running(i: int) -> None:
            generation = engine.start([ChatMessage(role="user", content=f"Write a long story number {i}.")], sampling, threading.Event())
            async for _ in generation:
                times[i].append(time.perf_counter())

        tasks = [asyncio.create_task(running(i)) for i in range(streams)]
        while min(len(t) for t in times) < 10:
            await asyncio.sleep(0.01)
        long_prompt = [ChatMessage(role="user", content="Summarize this: " + " ".join(f"w{i % 97}" for i in range(long_words)))]
        one = ResolvedSampling(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[])
        submitted = time.perf_counter()
        joining = engine.start(long_prompt, one, threading.Event())
        first = None
        async for _ in joining:
            first = first or time.perf_counter()
        prompt_tokens = joining.prompt_tokens
        await asyncio.gather(*tasks)
    finally:
        engine.close()
    during, normal = [], []
    for stream in times:
        for a, b in zip(stream, stream[1:]):
            (during if b > submitted and a < first else normal).append(b - a)
    return {
        "prefill_chunk_tokens": chunk,
        "long_prompt_tokens": prompt_tokens,
        "long_prompt_first_token_s": round(first - submitted, 2),
        "normal_itl_ms_p50": round(statistics.median(normal) * 1000, 1),
        "normal_itl_ms_p99": round(quantile(normal, 0.99) * 1000, 1),
        "during_join_itl_ms_p50": round(statistics.median(during) * 1000, 1) if during else None,
        "during_join_itl_ms_p99": round(quantile(during, 0.99) * 1000, 1) if during else None,
        "during_join_itl_max_ms": round(max(during) * 1000, 1) if during else None,
        # Where the longest gaps fall, in seconds after the long prompt's submission.
        "longest_gaps": sorted(
            {(round(a - submitted, 2), round(b - a, 2)) for stream in times for a, b in zip(stream, stream[1:])},
            key=lambda g: -g[1],
        )[:5],
        "p99_during_vs_normal_p50": round(quantile(during, 0.99) / statistics.median(normal), 2) if during else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--chunks", default="0,512,256,128", help="PREFILL_CHUNK_TOKENS values")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=400, help="new tokens of each running stream")
    parser.add_argument("--long-words", type=int, default=2750, help="words of the long prompt (~2.9 tokens each: ~8,000 tokens)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "chunked_prefill"))
    args = parser.parse_args()
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        row = asyncio.run(one_level(args.model, chunk, args.streams, args.tokens, args.long_words))
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"model": Path(args.model).name, "streams": args.streams, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# A long prompt joining running streams (chunked prefill)",
        "",
        f"Model `{report['model']}`, {args.streams} streams running (greedy), then one prompt of "
        f"{rows[0]['long_prompt_tokens']} tokens joins; {report['cpu_count']} CPU cores, {report['date']}, one run. "
        "ITL: the running streams' gaps, split at the long prompt's submission and its first token.",
        "",
        "| PREFILL_CHUNK_TOKENS | normal ITL p50 / p99 ms | ITL while it joins p50 / p99 / max ms | p99 while joining / normal p50 | long prompt's first token |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prefill_chunk_tokens'] or '0 (one pass)'} | {r['normal_itl_ms_p50']} / {r['normal_itl_ms_p99']} | "
            f"{r['during_join_itl_ms_p50']} / {r['during_join_itl_ms_p99']} / {r['during_join_itl_max_ms']} | "
            f"{r['p99_during_vs_normal_p50']}× | {r['long_prompt_first_token_s']} s |"
        )
    lines += ["", "Target (issue 19): p99 while joining ≤ 3× the normal ITL.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
