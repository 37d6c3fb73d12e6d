"""Bad input, generated from the service's own OpenAPI schema (schemathesis), and the
hand-picked cases of issue 4: each is a 4xx JSON error, none a 5xx, a hang or a leak."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from services.common.semaphore import GENERATIONS
from tests.conftest import synthetic_generator_env


def test_schema_driven_requests_never_break_the_api(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=1000, MAX_NEW_TOKENS="2", GENERATOR_SLOTS="4"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "4"})
    schema = schemathesis.openapi.from_url(api.base_url + "/openapi.json")
    operation = schema["/chat_stream"]["POST"]
    seen: list[int] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            response = case.call(base_url=api.base_url, timeout=20)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                assert response.json()["error"] and response.json()["message"]

        call()
    assert 200 in seen and any(400 <= s < 500 for s in seen)
    assert all(api.alive() for _ in [0])
    assert stack.redis.zcard(GENERATIONS.holders) == 0


async def test_hand_picked_bad_bodies(stack):
    api = stack.api({"MAX_BODY_BYTES": "2048"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        cases = [
            (b'{"user_input": "hi", "regenrate": true}', 422, "regenrate"),
            (b'{"user_input": "caf\\xe9"}'.replace(b"\\xe9", b"\xe9"), 400, "JSON"),
            (b'{"user_input": "' + b"x" * 3000 + b'"}', 413, "2048"),
        ]
        for body, status, mentions in cases:
            response = await client.post("/chat_stream", content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, response.text
            assert mentions in response.json()["message"]


def test_an_oversized_upload_is_refused_before_it_is_read(stack):
    api = stack.api({"MAX_BODY_BYTES": "2048"})
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        # Declares 100 MB, sends 2 KB: the answer must come without waiting for the rest.
        sock.sendall(
            b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b"{" * 2048
        )
        sock.settimeout(5)
        answer = b""
        while b"body_too_large" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"body_too_large" in answer


@pytest.mark.parametrize("size", [200_000, 4_000_000])
def test_a_client_that_sends_its_whole_body_before_reading_gets_the_413(stack, size):
    """urllib writes the whole body, then reads: the API reads (and drops) an
    oversized body of up to 8 MiB before answering, or the client would see its
    connection reset instead of the 413."""
    import urllib.error
    import urllib.request

    api = stack.api()  # MAX_BODY_BYTES: 65536
    body = b'{"user_input": "' + b"x" * size + b'"}'
    request = urllib.request.Request(
        f"{api.base_url}/chat_stream", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    for _ in range(5):  # a reset was intermittent: ask several times
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"] == "body_too_large"
