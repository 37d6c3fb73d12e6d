"""Metrics of both pods, the trace's stage spans, and structured logs."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import synthetic_generator_env, tiny_generator_env
from tests.support.client import scrape, stream_chat
from tests.support.otlp import OtlpReceiver
from tests.support.processes import eventually


async def test_metrics_of_both_pods_move_with_real_requests(stack):
    # 8 tokens at 25/s: a reply holds its permit ~0.3 s, long enough for a scrape to see it.
    generator = stack.generator(synthetic_generator_env(tokens_per_second=25, MAX_NEW_TOKENS="8"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1"})
    before = scrape(api.base_url + "/metrics")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        replies = await asyncio.gather(*[stream_chat(client, "/chat_stream", {"user_input": f"m{i}"}) for i in range(3)])
        assert all(r.status == 200 for r in replies)
        bad = await client.post("/chat_stream", json={"user_input": ""})
        assert bad.status_code == 422
        during = asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": "slow " * 3}))
        await eventually(lambda: scrape(api.base_url + "/metrics")["chatstream_permits_in_use"] == 1, 5, "a permit in use")
        await during
    # The generation releases its permit just after its last entry, which the client may read first.
    await eventually(lambda: scrape(api.base_url + "/metrics")["chatstream_permits_in_use"] == 0, 2, "the permit back")
    after = scrape(api.base_url + "/metrics")
    delta = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert delta('chatstream_requests_total{outcome="success"}') == 4
    assert delta('chatstream_requests_total{outcome="invalid"}') == 1
    assert delta('chatstream_callbacks_total{message="success"}') == 4
    assert delta("chatstream_tokens_relayed_total") == 32
    assert delta("chatstream_time_to_first_token_seconds_count") == 4
    # Tokens read from Redis together go out as one chunk, so there are at most 7 gaps a reply.
    assert 4 <= delta("chatstream_inter_token_latency_seconds_count") <= 28
    assert delta("chatstream_queue_wait_seconds_count") == 4
    assert after["chatstream_queue_wait_seconds_sum"] > 0.05, "three requests competed for one permit"
    assert delta("chatstream_request_duration_seconds_count") == 4
    assert after["chatstream_permits_in_use"] == 0 and after["chatstream_queue_depth"] == 0
    assert after["chatstream_permits_limit"] == 1, "MAX_CONCURRENT_GENERATIONS"
    assert after["chatstream_redis_up"] == 1
    gen = scrape(generator.metrics_url)
    assert gen["chatstream_generator_tokens_generated_total"] == 32
    assert gen["chatstream_generator_time_per_token_seconds_count"] == 28
    assert gen['chatstream_generator_jobs_total{outcome="length"}'] == 4
    assert gen["chatstream_generator_active_jobs"] == 0
    assert gen["chatstream_generator_model_load_seconds"] >= 0
    assert gen["chatstream_generator_slots"] == 1


async def test_trace_shows_every_stage_and_logs_are_json_with_request_and_trace_ids(stack, tiny_model):
    receiver = OtlpReceiver()
    try:
        otel = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "LOG_FORMAT": "json",
        }
        stack.generator({**tiny_generator_env(tiny_model), **otel})
        api = stack.api(otel)
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
            reply = await stream_chat(client, "/chat_stream", {"user_input": "stages"})
        assert reply.status == 200

        def spans():
            found = [s for s in list(receiver.spans) if s.attributes.get("chat.request_id") == reply.request_id]
            return {s.name: s for s in receiver.in_trace(found[0].trace_id)} if found else {}

        await eventually(lambda: {"admission.wait", "job.enqueue", "generate", "relay", "POST /chat_stream"} <= set(spans()), 15, "all stage spans")
        by_name = spans()
        server = by_name["POST /chat_stream"]
        for name in ("admission.wait", "job.enqueue", "relay"):
            assert by_name[name].parent_span_id == server.span_id, name
        assert by_name["generate"].parent_span_id == by_name["job.enqueue"].span_id
        relay = by_name["relay"]
        assert relay.attributes["chat.callback_message"] == "success"
        assert relay.attributes["chat.finish_reason"] == "length"
        assert relay.attributes["gen_ai.usage.output_tokens"] == 24
        assert relay.attributes["chat.worker"].endswith("gen0")
        assert "first_token" in relay.events
        assert "chat.queue_position" in by_name["admission.wait"].attributes
        # The conversation itself is not recorded.
        assert not any("stages" in str(v) for s in by_name.values() for v in s.attributes.values())
        trace_id = server.trace_id
    finally:
        receiver.close()
    for service in stack.services:
        lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
        about = [entry for entry in lines if entry.get("request_id") == reply.request_id]
        assert about, f"{service.name} logged nothing about the request as JSON"
        assert all(entry["trace_id"] == trace_id for entry in about)
        assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in lines)
