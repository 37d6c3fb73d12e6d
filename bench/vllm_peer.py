"""vLLM's side of ``bench/generator_throughput.py``: the same model, prompts and token counts,
streamed through vLLM's own async engine (``AsyncLLM``, DELTA outputs: one output per new token).

Runs in vLLM's virtual environment (``bench/.venv-vllm``, created by generator_throughput.py
on first use), never in the services' one. Reads its job as JSON on stdin::

    {"model": DIR, "prompts": [[{"role": "user", "content": ...}], ...], "levels": [1, 4, ...],
     "max_new_tokens": 48, "repetition_penalty": 1.1}

and prints one JSON line per level with per-stream token times, as the bench records ours.
With ``"conversation": [user message, ...]`` instead of ``prompts`` (``bench/multi_turn.py``)
it holds one conversation, each turn's prompt the previous prompt, its reply and the next
message, and prints one line per turn with its prompt tokens and time to first token
(vLLM's automatic prefix caching on, its default).
Greedy, ``ignore_eos`` so that every stream produces ``max_new_tokens`` (ours run to it on
these prompts; the bench compares token counts), bfloat16 (vLLM's CPU default).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def one_stream(engine, prompt: str, params, request_id: str) -> dict:
    started = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async for output in engine.generate(request_id=request_id, prompt=prompt, sampling_params=params):
        new = len(output.outputs[0].token_ids)
        if new:
            now = time.perf_counter()
            times += [now] * new
            tokens += new
    return {"tokens": tokens, "started": started, "times": times}


async def conversation(engine, tokenizer, params, messages: list[str]) -> None:
    history: list[dict[str, str]] = []
    for turn, text in enumerate(messages, 1):
        history.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        started = time.perf_counter()
        first, reply = None, []
        async for output in engine.generate(request_id=f"turn{turn}", prompt=prompt, sampling_params=params):
            if output.outputs[0].token_ids and first is None:
                first = time.perf_counter()
            reply.append(output.outputs[0].text)
        history.append({"role": "assistant", "content": "".join(reply)})
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        print(json.dumps({"turn": turn, "prompt_tokens": prompt_tokens, "ttft_s": round(first - started, 3)}), flush=True)


async def run(job: dict) -> None:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in job.get("prompts", [])]
    loading = time.perf_counter()
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=job["model"],
            dtype="bfloat16",
            max_model_len=job.get("max_model_len", 2048),
            max_num_seqs=max(job.get("levels", [1])),
            # On CPU the share of the NUMA node's memory reserved (weights + KV cache). vLLM refuses to start when
            # the node has less free than this; here the node reports ~9 GiB, and the 135M model needs far less.
            gpu_memory_utilization=0.5,
            # Asked for explicitly: a conversation measures it (turn after turn reusing the last one's blocks).
            enable_prefix_caching=True if "conversation" in job else None,
        )
    )
    print(json.dumps({"startup_s": round(time.perf_counter() - loading, 1)}), flush=True)
    params = SamplingParams(
        max_tokens=job["max_new_tokens"],
        temperature=0.0,
        repetition_penalty=job["repetition_penalty"],
        ignore_eos="conversation" not in job,  # a conversation's replies end where the model ends them, as ours
        output_kind=RequestOutputKind.DELTA,
    )
    if "conversation" in job:
        try:
            async for _ in engine.generate(request_id="warm-up", prompt="Hi", sampling_params=params):
                pass
            await conversation(engine, tokenizer, params, job["conversation"])
        finally:
            engine.shutdown()
        return
    counter = 0
    try:
        for level in [2, *job["levels"]]:  # the first: warm-up, as ours
            started = time.perf_counter()
            streams = await asyncio.gather(
                *(one_stream(engine, prompts[i % len(prompts)], params, f"r{counter + i}") for i in range(level))
            )
            counter += level
            print(json.dumps({"concurrency": level, "started": started, "streams": streams, "warmup": counter == 2}), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(run(json.load(sys.stdin)))
