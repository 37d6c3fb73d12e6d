"""Pure pieces: the wire contract's encoding and the incremental detokenizer."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
from arq.jobs import serialize_job as arq_envelope

from services.common.contract import (
    GENERATE_FUNCTION,
    ChatMessage,
    Lease,
    EventType,
    GenerationJob,
    HistoryWindow,
    JobRejected,
    SamplingParams,
    StreamEvent,
    deserialize_job,
    new_request_id,
    serialize_job,
)
from services.generator.detokenizer import IncrementalDetokenizer


def test_stream_events_round_trip_through_redis_field_maps():
    events = [
        StreamEvent(EventType.START, worker="gen-1"),
        StreamEvent(EventType.TOKEN, text=" héllo 😀"),
        StreamEvent(EventType.TOKEN, text=" three deltas", tokens=3),
        StreamEvent(EventType.DONE, finish_reason="stop", prompt_tokens=7, completion_tokens=3),
        StreamEvent(EventType.DONE, finish_reason="length", prompt_tokens=7, completion_tokens=3, history_turns=2),
        StreamEvent(EventType.ERROR, code="generation_failed", message="boom"),
    ]
    for event in events:
        wire = {k.encode(): v.encode() for k, v in event.to_fields().items()}
        assert StreamEvent.from_fields(wire) == event


def through_the_queue(job: dict[str, Any]) -> GenerationJob:
    """A job as the API enqueues it (arq's envelope, our serializer) and as a generator reads it."""
    raw = arq_envelope(GENERATE_FUNCTION, (job,), {}, None, 0, serializer=serialize_job)
    return deserialize_job(raw)["a"][0]


def test_jobs_round_trip_and_request_ids_are_128_bit_random():
    job = GenerationJob(
        request_id=new_request_id(),
        messages=[ChatMessage("user", "hi")],
        sampling=SamplingParams(max_new_tokens=5, stop=["\n"]),
        trace_context={"traceparent": "00-abc-def-01"},
        lease=Lease("holder", 1),
    )
    assert through_the_queue(job.to_dict()) == job
    leased = GenerationJob(
        request_id=new_request_id(),
        messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi")],
        sampling=SamplingParams(temperature=0.5, seed=7, stop=["a", "b"]),
        lease=Lease("holder", 42),
        notify_key="chatstream:reader-wake:abc:0",
        history=HistoryWindow(turns=0, max_tokens=100),
    )
    assert leased.to_dict() == asdict(leased)
    assert through_the_queue(leased.to_dict()) == leased
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def detokenize(tokenizer, text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = [detok.push(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(detok.flush())
    return pieces, detok


def test_incremental_decoding_never_splits_a_character(tokenizer):
    text = "Paris est magnifique 😀 日本語 done"
    pieces, detok = detokenize(tokenizer, text)
    assert "".join(pieces) == text == detok.text
    assert not any("\ufffd" in p for p in pieces)
    # The emoji is several byte tokens: nothing is released until it is complete.
    assert "😀" in pieces or any("😀" in p for p in pieces)


def test_stop_string_ends_the_reply_and_is_never_sent(tokenizer):
    pieces, detok = detokenize(tokenizer, "The answer is 42.\nUser: next question", stop=["\nUser:"])
    assert "".join(pieces) == "The answer is 42." == detok.text
    assert detok.stopped


def test_text_that_only_looks_like_a_stop_string_is_released_at_the_end(tokenizer):
    pieces, detok = detokenize(tokenizer, "ends with \nUse", stop=["\nUser:"])
    assert "".join(pieces) == "ends with \nUse"
    assert not detok.stopped


def test_a_generator_accepts_jobs_from_a_newer_api_during_a_rolling_upgrade():
    sent = GenerationJob(request_id=new_request_id(), messages=[ChatMessage("user", "hi")], lease=Lease("h", 1))
    data = sent.to_dict()
    data["sampling"]["a_knob_from_the_future"] = 3
    data["messages"][0]["name"] = "someone"
    data["a_field_from_the_future"] = {"x": 1}
    job = through_the_queue(data)
    assert job.messages == [ChatMessage("user", "hi")]
    assert job.sampling == SamplingParams()


def test_a_job_from_an_api_without_history_windows_keeps_its_whole_conversation():
    # An older API sends no "history": nothing of its conversation may be dropped.
    data = GenerationJob(
        request_id=new_request_id(),
        messages=[ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")],
        lease=Lease("h", 1),
    ).to_dict()
    del data["history"]
    assert through_the_queue(data).history == HistoryWindow()


def test_a_history_window_larger_than_the_conversation_is_rejected():
    data = GenerationJob(
        request_id=new_request_id(),
        messages=[ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")],
        lease=Lease("h", 1),
        history=HistoryWindow(turns=1),
    ).to_dict()
    assert through_the_queue(data).history.turns == 1
    data["history"]["turns"] = 2
    with pytest.raises(JobRejected, match="history.turns"):
        through_the_queue(data)
    data["history"]["turns"] = -1
    with pytest.raises(JobRejected, match="bad_schema"):
        through_the_queue(data)


def test_every_error_code_has_an_http_status_and_an_unknown_code_answers_500():
    from services.common.contract import ErrorCode, http_status_for

    assert {code: http_status_for(code.value) for code in ErrorCode} == {code: code.http_status for code in ErrorCode}
    assert http_status_for(ErrorCode.PROMPT_TOO_LONG) == 422 and http_status_for(ErrorCode.QUEUE_TIMEOUT) == 503
    assert http_status_for("a_code_of_a_newer_generator") == 500
    assert f"error:{ErrorCode.LEASE_LOST}" == "error:lease_lost", "codes format as their wire value"
