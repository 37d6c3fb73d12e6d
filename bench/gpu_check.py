"""GPU check (issue 19, "Ready for a GPU"): our continuous-batching decode loop on a model
of a real architecture and size, against the memory-bandwidth roofline of decoding and
against ``model.generate`` on a left-padded batch of the same prompts.

Self-contained for a GPU machine that has no network and no model weights: the model is a
randomly initialised ``LlamaForCausalLM`` of Llama-3-8B's shape (hidden 4096, 32 layers,
32 heads, 8 key/value heads, intermediate 14336, vocabulary 128,256), built in bfloat16
directly on the GPU. Random weights give garbage tokens, so end-of-sequence is ignored:
every stream generates exactly ``--new-tokens`` tokens, greedily. Prompts are random token
ids of ``--prompt-min`` to ``--prompt-max`` tokens, so no tokenizer is needed: our side is
driven below the engine, at :class:`services.generator.batching.BatchScheduler`, the
decode loop itself (see :func:`run_our_scheduler`, the only code here that knows our
services). At each concurrency level (``--levels``) all prompts arrive together.

Reported per level and for both ours and ``generate``: decode tokens/s (while every stream
of the level is decoding) and end-to-end tokens/s (prefill included), time to first token,
inter-token latency (ITL) p50/p99, and the decode rate as a fraction of the roofline: one
decode step must read every weight once plus each row's key/value cache, so at best

    tokens/s = batch x bandwidth / (weight bytes + KV bytes per token x tokens in the batch's caches)

averaged over the steps of the level (``--bandwidth-tbps``: 4.8 for an H200's HBM3e).

It imports torch, transformers and ``services.generator`` only (no Redis, arq, FastAPI or
OpenTelemetry); ``services.generator``'s own imports need a few wheels that a GPU image
may lack (:data:`CARRIED_WHEELS`): ``--download-wheels DIR`` fetches them here, for
Python 3.12, pinned and hash-checked from ``services/generator/requirements.lock``.
It uses no torch or transformers API newer than the GPU machine's torch 2.11 and
transformers 5.17. How to run it there: ``bench/results/gpu_check.md``.

    python bench/gpu_check.py --smoke        # CPU, a tiny model, seconds (tests/test_gpu_check.py)
    python bench/gpu_check.py --quick        # GPU, Llama-3-8B shape, 1, 8, 64 concurrent, 32 tokens
    python bench/gpu_check.py --out DIR      # GPU, Llama-3-8B shape, 1-128 concurrent (sized for < 8 min on an H200)

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default bench/results/gpu_check/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.streamers import BaseStreamer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Llama-3-8B's shape (its config.json); rope details do not change the cost of a step.
LLAMA_3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
#: --smoke: the same architecture, small enough for a CPU test in seconds.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
#: What ``services.generator`` imports beyond torch and transformers (pydantic-settings for
#: its settings, prometheus-client for its metrics), as import name -> distribution name.
CARRIED_WHEELS = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "typing_extensions": "typing-extensions",
    "prometheus_client": "prometheus-client",
}
LOCK = REPO / "services" / "generator" / "requirements.lock"
PAD_ID = 0


def scheduler_api() -> tuple[Any, Any, Any]:
    """``(BatchScheduler, DecodeRequest, ResolvedSampling)``: everything used from ``services``."""
    try:
        from services.generator.batching import BatchScheduler
        from services.generator.decoding import DecodeRequest
        from services.generator.sampling import ResolvedSampling
    except ImportError as exc:
        sys.exit(
            f"cannot import the generator's decode loop: {exc}. On a machine without network, bring the wheels of "
            "bench/gpu_check.py --download-wheels and put them on PYTHONPATH first (bench/results/gpu_check.md)"
        )
    return BatchScheduler, DecodeRequest, ResolvedSampling


def run_our_scheduler(model: Any, device: str, prompts: list[list[int]], new_tokens: int, chunk_tokens: int) -> dict:
    """Our decode loop on ``prompts``, all submitted at once, each to exactly ``new_tokens``
    greedy tokens (no end-of-sequence ids). The one function coupled to ``services``:

    ``BatchScheduler(model, device, slots, chunk_tokens)``, ``.submit(request)``, ``.stop()``;
    ``DecodeRequest(prompt_ids=, max_new_tokens=, sampling=, emit=, finish=)``, whose
    ``emit(token_id)`` the decode thread calls per token and ``finish(error)`` once at the end;
    ``ResolvedSampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop)``.

    Returns the submission time and each stream's token ids and arrival times."""
    BatchScheduler, DecodeRequest, ResolvedSampling = scheduler_api()
    greedy = ResolvedSampling(
        max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop=[]
    )
    tokens: list[list[int]] = [[] for _ in prompts]
    times: list[list[float]] = [[] for _ in prompts]

    def emitter(row: int) -> Any:
        def emit(token_id: int) -> None:
            times[row].append(time.perf_counter())
            tokens[row].append(token_id)

        return emit

    finished = [threading.Event() for _ in prompts]
    errors: list[BaseException] = []

    def finisher(row: int) -> Any:
        def finish(error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
            finished[row].set()

        return finish

    requests = [
        DecodeRequest(
            prompt_ids=list(prompt),
            max_new_tokens=new_tokens,
            sampling=greedy,
            emit=emitter(row),
            finish=finisher(row),
        )
        for row, prompt in enumerate(prompts)
    ]
    scheduler = BatchScheduler(model, device, len(prompts), chunk_tokens)
    try:
        started = time.perf_counter()
        for request in requests:
            scheduler.submit(request)
        for done in finished:
            done.wait()
        if errors:
            raise errors[0]
    finally:
        scheduler.stop()
    return {"started": started, "tokens": tokens, "times": times}


class _StepClock(BaseStreamer):
    """Records when ``generate`` hands over each step's tokens (after the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(model: Any, device: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """``model.generate`` on the prompts as one left-padded batch, greedy, ``new_tokens`` each
    (the model's generation config has no end-of-sequence id). The same result shape as
    :func:`run_our_scheduler`: every row's tokens arrive at each step's time."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    clock = _StepClock()
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=PAD_ID,
            streamer=clock,
        )
    tokens = out[:, width:].tolist()
    return {"started": started, "tokens": tokens, "times": [list(clock.times) for _ in prompts]}


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile, as bench/generator_throughput.py's (importing that module
    would bring the whole engine factory onto the GPU machine)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(run: dict, new_tokens: int) -> dict:
    """Throughput and latency of one run from its streams' token arrival times.

    Decode tokens/s counts the tokens that arrive while every stream is decoding (after the
    last first token, up to the first stream's last token); if streams did not overlap
    that way, all tokens after each stream's first."""
    started, times = run["started"], run["times"]
    firsts = [t[0] for t in times]
    lasts = [t[-1] for t in times]
    window_start, window_end = max(firsts), min(lasts)
    in_window = sum(1 for t in times for x in t if window_start < x <= window_end)
    if window_end > window_start and in_window:
        decode = in_window / (window_end - window_start)
    else:
        decode = sum(len(t) - 1 for t in times) / max(max(lasts) - min(firsts), 1e-9)
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    ttft = [first - started for first in firsts]
    produced = sum(len(t) for t in times)
    return {
        # Every stream must have produced exactly new_tokens: anything else is a bug in the run.
        "tokens": produced,
        "tokens_expected": new_tokens * len(times),
        "decode_tokens_per_s": round(decode, 2),
        "end_to_end_tokens_per_s": round(produced / (max(lasts) - started), 2),
        "ttft_ms_p50": round(statistics.median(ttft) * 1000, 1),
        "ttft_ms_max": round(max(ttft) * 1000, 1),
        "itl_ms_p50": round(statistics.median(gaps) * 1000, 2) if gaps else None,
        "itl_ms_p99": round(quantile(gaps, 0.99) * 1000, 2) if gaps else None,
        "elapsed_s": round(max(lasts) - started, 3),
    }


def model_costs(model: Any) -> dict:
    """Bytes one decode step must read: every weight but the input embedding (only a row
    per token of it is read), unless the output layer shares it; and key + value bytes per
    cached token over all layers."""
    config = model.config
    params = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        weight_bytes -= embedding.numel() * embedding.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * embedding.element_size()
    return {
        "parameters": sum(p.numel() for p in params),
        "weight_bytes_read_per_step": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
    }


def roofline_tokens_per_s(costs: dict, prompt_lengths: list[int], new_tokens: int, bandwidth: float) -> float:
    """Decode tokens/s if each step only moved its bytes at ``bandwidth`` (bytes/s): step
    ``t`` (tokens 2..new_tokens) reads the weights and every row's cache of prompt + t tokens."""
    seconds = 0.0
    for step in range(1, new_tokens):
        cached = sum(length + step for length in prompt_lengths)
        seconds += (costs["weight_bytes_read_per_step"] + costs["kv_bytes_per_token"] * cached) / bandwidth
    return len(prompt_lengths) * (new_tokens - 1) / seconds if seconds else 0.0


def make_prompts(count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    """``count`` random prompts, lengths spread over [low, high], the same on every run."""
    generator = torch.Generator().manual_seed(19)
    lengths = [low + (row * 7919) % (high - low + 1) for row in range(count)]
    # Ids from 3 up: clear of the pad id and the other special ids of a Llama config.
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def build_model(shape: dict, device: str, dtype: torch.dtype, attn_implementation: str) -> Any:
    """A randomly initialised LlamaForCausalLM made on ``device`` (never first on the CPU),
    with no end-of-sequence id, so that ``generate`` runs every row to its token limit."""
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def environment(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.startswith("cuda") else None


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(name: str, count: int, run: Any, new_tokens: int, roofline: float, device: str) -> tuple[dict, Any]:
    """One run's figures and its tokens; a run that fails (out of memory at the largest
    level, say) is reported as such and the check goes on with the others."""
    reset_memory(device)
    try:
        result = run()
    except Exception as exc:
        print(f"{count:>4} concurrent, {name:>8}: failed: {exc!r}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}, None
    figures = summarize(result, new_tokens)
    # Three significant figures: a CPU run is a tiny fraction of a GPU's bandwidth, yet not 0.
    figures["decode_fraction_of_roofline"] = float(f"{figures['decode_tokens_per_s'] / roofline:.3g}")
    figures["peak_memory_gib"] = peak_memory_gib(device)
    print(f"{count:>4} concurrent, {name:>8}: {json.dumps(figures)}", flush=True)
    return figures, result["tokens"]


def check(args: argparse.Namespace, save: Any) -> dict:
    """Build the model, warm both paths up, then measure every level, calling ``save`` with
    the report after each (a run cut short by its time limit still leaves the levels done).
    No new run starts once ``--budget-s`` has passed: those are reported as skipped."""
    began = time.perf_counter()
    shape = TINY if args.smoke else LLAMA_3_8B
    model = build_model(shape, args.device, getattr(torch, args.dtype), args.attn_implementation)
    costs = model_costs(model)
    built_s = time.perf_counter() - began
    print(f"built a {costs['parameters'] / 1e9:.3g}B-parameter model on {args.device} in {built_s:.1f}s", flush=True)
    bandwidth = args.bandwidth_tbps * 1e12
    report: dict[str, Any] = {
        "check": "smoke" if args.smoke else "quick" if args.quick else "full",
        # Figures from --smoke (or any CPU run) are no GPU figures.
        "gpu_figures": args.device.startswith("cuda"),
        "environment": environment(args.device),
        "model": {
            "architecture": "LlamaForCausalLM, random weights",
            "shape": "tiny (--smoke)" if args.smoke else "Llama-3-8B",
            **shape,
            **costs,
            "dtype": args.dtype,
            "attn_implementation": model.config._attn_implementation,
            "build_seconds": round(built_s, 1),
        },
        "run": {
            "levels": args.levels,
            "new_tokens": args.new_tokens,
            "prompt_tokens": [args.prompt_min, args.prompt_max],
            "prefill_chunk_tokens": args.prefill_chunk_tokens,
            "bandwidth_tbps": args.bandwidth_tbps,
            "greedy": True,
            "end_of_sequence": "ignored (random weights)",
        },
        "levels": [],
        "elapsed_s": 0.0,
    }

    # Warm-up: kernels, cuBLAS handles and the allocator, for one stream and for the largest batch.
    for count in sorted({1, max(args.levels)}):
        warm = make_prompts(count, args.prompt_min, args.prompt_max, shape["vocab_size"])
        try:
            run_our_scheduler(model, args.device, warm, 2, args.prefill_chunk_tokens)
            run_generate(model, args.device, warm, 2)
        except Exception as exc:  # the level's own run will fail and say so too
            print(f"warm-up at {count} concurrent failed: {exc!r}", flush=True)

    for count in args.levels:
        prompts = make_prompts(count, args.prompt_min, args.prompt_max, shape["vocab_size"])
        lengths = [len(p) for p in prompts]
        roofline = roofline_tokens_per_s(costs, lengths, args.new_tokens, bandwidth)
        level: dict[str, Any] = {
            "concurrency": count,
            "prompt_tokens_mean": round(statistics.mean(lengths), 1),
            "roofline_decode_tokens_per_s": round(roofline, 1),
        }
        runs = {
            "ours": lambda: run_our_scheduler(model, args.device, prompts, args.new_tokens, args.prefill_chunk_tokens),
            "generate": lambda: run_generate(model, args.device, prompts, args.new_tokens),
        }
        outputs = {}
        for name, run in runs.items():
            if time.perf_counter() - began > args.budget_s:
                level[name] = {"skipped": f"past --budget-s {args.budget_s}"}
                continue
            level[name], outputs[name] = measure(name, count, run, args.new_tokens, roofline, args.device)
        if outputs.get("ours") is not None and outputs.get("generate") is not None:
            level["ours_vs_generate_decode"] = round(
                level["ours"]["decode_tokens_per_s"] / level["generate"]["decode_tokens_per_s"], 3
            )
            # Greedy text equal to generate's is a cheap correctness check: exact for one stream;
            # with several rows bfloat16 kernels may round differently (see services/generator/batching.py).
            level["rows_with_generates_tokens"] = sum(a == b for a, b in zip(outputs["ours"], outputs["generate"]))
        report["levels"].append(level)
        report["elapsed_s"] = round(time.perf_counter() - began, 1)
        save(report)
    return report


def markdown(report: dict) -> str:
    env, model, run = report["environment"], report["model"], report["run"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    lines = ["# GPU check: our batch scheduler vs the decode roofline and `model.generate`", ""]
    if not report["gpu_figures"]:
        lines += ["**Not GPU figures**: a CPU run, to test the script only.", ""]
    lines += [
        f"{where}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}. "
        f"{model['architecture']}, {model['shape']} shape ({model['parameters'] / 1e9:.3g}B parameters), "
        f"{model['dtype']}, attention {model['attn_implementation']}. Prompts of {run['prompt_tokens'][0]}-"
        f"{run['prompt_tokens'][1]} random tokens, all arriving together; {run['new_tokens']} new tokens each, "
        f"greedy, end-of-sequence ignored; PREFILL_CHUNK_TOKENS={run['prefill_chunk_tokens']}. Roofline: "
        f"{run['bandwidth_tbps']} TB/s over {model['weight_bytes_read_per_step'] / 1e9:.3g} GB of weights and "
        f"{model['kv_bytes_per_token'] / 1024:.3g} KiB of KV cache per token each step. Check: {report['check']}, "
        f"{report['elapsed_s']} s.",
        "",
        "| concurrent | roofline tok/s | ours decode tok/s | of roofline | generate decode tok/s | of roofline "
        "| ours / generate | ours ITL p50 / p99 ms | generate ITL p50 / p99 ms | ours TTFT p50 / max ms "
        "| generate TTFT ms | peak GiB ours / generate | rows = generate's |",
        "| " + " | ".join(["---"] * 13) + " |",
    ]
    for level in report["levels"]:
        ours, gen = level["ours"], level["generate"]
        lines.append(
            "| "
            + " | ".join(
                [
                    str(level["concurrency"]),
                    str(level["roofline_decode_tokens_per_s"]),
                    _cell(ours, "decode_tokens_per_s"),
                    _cell(ours, "decode_fraction_of_roofline"),
                    _cell(gen, "decode_tokens_per_s"),
                    _cell(gen, "decode_fraction_of_roofline"),
                    str(level.get("ours_vs_generate_decode", "-")),
                    _cell(ours, "itl_ms_p50", "itl_ms_p99"),
                    _cell(gen, "itl_ms_p50", "itl_ms_p99"),
                    _cell(ours, "ttft_ms_p50", "ttft_ms_max"),
                    _cell(gen, "ttft_ms_p50"),
                    f"{_cell(ours, 'peak_memory_gib')} / {_cell(gen, 'peak_memory_gib')}",
                    f"{level['rows_with_generates_tokens']} / {level['concurrency']}"
                    if "rows_with_generates_tokens" in level
                    else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _cell(figures: dict, *keys: str) -> str:
    """A table cell: the figures named, or why there are none."""
    for outcome in ("skipped", "error"):
        if outcome in figures:
            return outcome
    return " / ".join(str(figures[k]) for k in keys)


def download_wheels(destination: Path) -> None:
    """Fetch :data:`CARRIED_WHEELS` for CPython 3.12 on x86_64 Linux into ``destination``,
    at the versions and hashes of ``services/generator/requirements.lock`` (run where PyPI
    is reachable; the GPU machine unpacks them onto its PYTHONPATH)."""
    wanted = set(CARRIED_WHEELS.values())
    requirements, current = [], None
    for line in LOCK.read_text().splitlines():
        name = line.split("==")[0].strip()
        if not line.startswith(" ") and "==" in line:
            current = [line.rstrip(" \\")] if name in wanted else None
            if current is not None:
                requirements.append(current)
        elif current is not None and line.strip().startswith("--hash="):
            current.append(line.strip().rstrip(" \\"))
    found = {r[0].split("==")[0] for r in requirements}
    if found != wanted:
        sys.exit(f"{LOCK} lacks {', '.join(sorted(wanted - found))}")
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write("\n".join(" ".join(r) for r in requirements) + "\n")
        pins.flush()
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", "--only-binary=:all:",
             "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "-d", str(destination), "-r", pins.name],
            check=True,
        )
    print(f"wrote {len(list(destination.glob('*.whl')))} wheels to {destination}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1,2,4 concurrent, 8 tokens (a test)")
    parser.add_argument("--quick", action="store_true", help="levels 1,8,64 and 32 new tokens")
    parser.add_argument("--levels", help="concurrency levels, comma-separated (default 1,8,32,64,128)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per stream (default 128)")
    parser.add_argument("--prompt-min", type=int, help="shortest prompt in tokens (default 128)")
    parser.add_argument("--prompt-max", type=int, help="longest prompt in tokens (default 512)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=0,
                        help="our scheduler's PREFILL_CHUNK_TOKENS (default 0: prompts arriving together are "
                        "prefilled in one pass, as generate prefills its batch)")
    parser.add_argument("--device", help="torch device (default cuda; cpu with --smoke)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16 (float32 with --smoke)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="memory bandwidth of the roofline (H200)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new run after this many seconds")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR",
                        help="only fetch the wheels services.generator needs on a GPU machine (Python 3.12) into DIR")
    args = parser.parse_args(argv)
    small = args.smoke or args.quick
    levels = args.levels or ("1,2,4" if args.smoke else "1,8,64" if args.quick else "1,8,32,64,128")
    args.levels = [int(x) for x in levels.split(",")]
    args.new_tokens = args.new_tokens or (8 if args.smoke else 32 if small else 128)
    args.prompt_min = args.prompt_min or (8 if args.smoke else 128)
    args.prompt_max = args.prompt_max or (24 if args.smoke else 512)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    if args.new_tokens < 2 or not 1 <= args.prompt_min <= args.prompt_max:
        parser.error("need --new-tokens >= 2 and 1 <= --prompt-min <= --prompt-max")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.download_wheels:
        download_wheels(args.download_wheels)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: run on a GPU machine, or --smoke (CPU, tiny model) to test the script")
    if args.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            sys.exit("--attn-implementation flash_attention_2 needs the flash-attn package, which is not installed")
    args.out.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report))

    report = check(args, save)
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md", flush=True)


if __name__ == "__main__":
    main()
