"""The OpenAI-compatible routes, driven by the real ``openai`` client and by curl,
through real API and generator processes.

The synthetic generator echoes the last user message word by word, one word per
token, up to ``max_tokens``: replies and token counts are known exactly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.conftest import synthetic_generator_env, tiny_generator_env
from tests.support.processes import eventually, wait_until

PROMPT = [
    {"role": "system", "content": "Echo."},
    {"role": "user", "content": "alpha beta gamma"},
]


def client_for(api, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key="not-checked", max_retries=0, **kwargs)


def no_streams_left(stack) -> bool:
    """Every finished request's stream is deleted (just after its response ended)."""
    wait_until(lambda: not stack.redis.keys("chatstream:stream:*"), 5, "finished streams to be deleted")
    return True


def test_openai_client_streams_chunks_with_usage_and_gets_whole_completions(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=50))
    api = stack.api({"MODEL_NAME": "house-model"})
    client = client_for(api)

    chunks = list(
        client.chat.completions.create(
            model="my-model",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=6,
        )
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == "alpha beta gamma alpha beta gamma"
    # One chunk per relayed delta (the relay may merge deltas that reach it together).
    assert len(content) >= 3, "the reply streams in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == (
        4,
        6,
        10,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"my-model"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}

    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model="m", messages=PROMPT, stream=True, max_tokens=2))
    assert all(c.usage is None and c.choices for c in plain)

    completion = client.chat.completions.create(model="my-model", messages=PROMPT, max_completion_tokens=4)
    assert completion.object == "chat.completion"
    assert completion.model == "my-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "alpha beta gamma alpha"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 4)

    # The openai client always names a model; others may not.
    raw = httpx.post(api.base_url + "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 1}, timeout=10)
    assert raw.headers["content-type"] == "application/json"
    assert len(raw.headers["x-request-id"]) == 32
    assert raw.json()["id"] == f"chatcmpl-{raw.headers['x-request-id']}"
    assert raw.json()["model"] == "house-model", "a request without a model gets MODEL_NAME"

    models = client.models.list()
    assert [m.id for m in models.data] == ["house-model"]
    assert client.models.retrieve("house-model").id == "house-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert no_streams_left(stack)


def test_curl_streams_openai_chunks_ending_with_done(stack):
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test (apt-get install curl)"
    stack.generator(synthetic_generator_env(tokens_per_second=50))
    api = stack.api()
    body = json.dumps({"model": "any", "messages": PROMPT, "stream": True, "max_tokens": 5})
    result = subprocess.run(
        [curl, "-N", "-sS", "-D", "-", "-X", "POST", api.base_url + "/v1/chat/completions",
         "-H", "content-type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    head, _, stream = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    events = [line for line in stream.split("\n") if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "alpha beta gamma alpha beta"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_bad_requests_get_openai_shaped_errors_with_the_right_status(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=100))
    api = stack.api({"OPENAI_MAX_BODY_BYTES": "4096"})
    client = client_for(api)

    with pytest.raises(openai.BadRequestError) as n_error:
        client.chat.completions.create(model="m", messages=PROMPT, n=2)
    assert (n_error.value.param, n_error.value.type, n_error.value.code) == ("n", "invalid_request_error", "unsupported_parameter")

    with pytest.raises(openai.BadRequestError) as temperature:
        client.chat.completions.create(model="m", messages=PROMPT, temperature=5)
    assert temperature.value.param == "temperature"
    # Outside the job contract's range: refused here, never a job the generator drops.
    with pytest.raises(openai.BadRequestError) as top_p:
        client.chat.completions.create(model="m", messages=PROMPT, top_p=0)
    assert top_p.value.param == "top_p" and "greater than 0" in top_p.value.message

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError) as stop:
        client.chat.completions.create(model="m", messages=PROMPT, stop=["a", "b", "c", "d", "e"])
    assert stop.value.param == "stop"
    for long_stop in ("x" * 257, ["a", "x" * 257]):
        with pytest.raises(openai.BadRequestError) as stop:
            client.chat.completions.create(model="m", messages=PROMPT, stop=long_stop)
        assert stop.value.param == "stop" and "at most 256 characters" in stop.value.message

    def check_shape(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code and error["message"]

    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        check_shape(http.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
        check_shape(http.post("/v1/chat/completions", content=b""), 400, "invalid_request")
        huge = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
        check_shape(http.post("/v1/chat/completions", content=huge), 413, "body_too_large")
        check_shape(http.post("/v1/completions", json={"prompt": "hi"}), 404, "not_found")
        check_shape(http.get("/v1/no/such/route"), 404, "not_found")
    assert no_streams_left(stack)


async def test_full_queue_is_a_rate_limit_error_and_queue_timeout_a_503(stack):
    generator = stack.generator(synthetic_generator_env(tokens_per_second=20, MAX_NEW_TOKENS="60"))
    full = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "0", "RETRY_AFTER_SECONDS": "3"})
    waiting = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT_SECONDS": "0.5"})
    busy_client = openai.AsyncOpenAI(base_url=full.base_url + "/v1", api_key="x", max_retries=0)

    async def busy() -> str:
        stream = await busy_client.chat.completions.create(model="m", messages=PROMPT, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    busy_task = asyncio.create_task(busy())
    await eventually(lambda: "started" in generator.log(), 10, "the busy request to start")
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            await asyncio.to_thread(client_for(full).chat.completions.create, model="m", messages=PROMPT)
        assert limited.value.status_code == 429
        assert limited.value.response.headers["retry-after"] == "3"
        assert (limited.value.type, limited.value.code) == ("rate_limit_error", "too_many_requests")

        # Queued, then timed out before the first token: still an HTTP status, for a stream too.
        with pytest.raises(openai.InternalServerError) as timed_out:
            await asyncio.to_thread(
                client_for(waiting).chat.completions.create, model="m", messages=PROMPT, stream=True
            )
        assert timed_out.value.status_code == 503
        assert (timed_out.value.type, timed_out.value.code) == ("server_error", "queue_timeout")
    finally:
        reply = await busy_task
        await busy_client.close()
    assert reply.startswith("alpha beta gamma")


def test_generation_failure_reaches_the_openai_client(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=100, SYNTHETIC_FAIL_AFTER_TOKENS="3"))
    api = stack.api()
    client = client_for(api)

    seen = []
    with pytest.raises(openai.APIError) as in_stream:
        for chunk in client.chat.completions.create(model="m", messages=PROMPT, stream=True, max_tokens=10):
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert "".join(seen) == "alpha beta gamma", "the tokens before the failure arrived"
    assert in_stream.value.code == "generation_failed"

    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model="m", messages=PROMPT, max_tokens=10)
    assert whole.value.status_code == 500 and whole.value.code == "generation_failed"


@pytest.mark.parametrize("slots", ["1", "2"], ids=["sequential", "batched"])
def test_seed_makes_sampled_replies_reproducible_and_long_prompts_are_422(stack, tiny_model, slots):
    stack.generator(tiny_generator_env(tiny_model, MAX_NEW_TOKENS="16", GENERATOR_SLOTS=slots))
    api = stack.api()
    client = client_for(api, timeout=60)

    def sample(seed: int | None) -> str:
        completion = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], temperature=1.0, seed=seed
        )
        return completion.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "other seeds sample other replies"

    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 2000}])
    assert too_long.value.code == "prompt_too_long"
    assert no_streams_left(stack)
