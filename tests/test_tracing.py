"""One trace across both pods, exported over OTLP/HTTP to a receiver in the test."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import tiny_generator_env
from tests.support.client import stream_chat
from tests.support.otlp import OtlpReceiver
from tests.support.processes import eventually

SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 4, 5


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def otel_env(endpoint: str, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


async def test_one_trace_spans_api_and_generator_and_continues_the_callers_trace(stack, tiny_model, receiver):
    stack.generator({**tiny_generator_env(tiny_model), **otel_env(receiver.endpoint, "test-generator")})
    api = stack.api(otel_env(receiver.endpoint, "test-api"))
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        client.headers["traceparent"] = f"00-{caller_trace}-{caller_span}-01"
        reply = await stream_chat(client, "/chat_stream", {"user_input": "trace me"})
    assert reply.status == 200

    def complete() -> bool:
        names = {s.name for s in receiver.in_trace(caller_trace)}
        return {"generate", "job.enqueue", "POST /chat_stream"} <= names

    await eventually(complete, 15, "spans from both processes")
    spans = receiver.in_trace(caller_trace)
    by_name = {s.name: s for s in spans}
    server, enqueue, generate = by_name["POST /chat_stream"], by_name["job.enqueue"], by_name["generate"]
    # The caller's trace continues through us: our server span is its child.
    assert server.parent_span_id == caller_span
    assert enqueue.kind == SPAN_KIND_PRODUCER and enqueue.service == "test-api"
    assert generate.kind == SPAN_KIND_CONSUMER and generate.service == "test-generator"
    # The generator's span is a child of the enqueue span, through the job's context.
    assert generate.parent_span_id == enqueue.span_id
    assert enqueue.parent_span_id == server.span_id
    assert generate.attributes["chat.request_id"] == reply.request_id
    assert generate.attributes["gen_ai.usage.output_tokens"] > 0
    # The tenant, by name (no TENANTS_FILE here: everyone is `default`), on both sides.
    assert server.attributes["chat.tenant"] == generate.attributes["chat.tenant"] == "default"
    assert "first_token" in generate.events


async def test_a_collector_that_is_down_costs_the_request_nothing(stack, tiny_model):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    stack.generator({**tiny_generator_env(tiny_model), **otel_env(dead, "g")})
    api = stack.api(otel_env(dead, "a"))
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        for _ in range(3):
            reply = await stream_chat(client, "/chat_stream", {"user_input": "still works"})
            assert reply.status == 200 and reply.text
