"""Per-session generation settings (GET/POST /generation_params) and the cluster's load
(GET /load), against real API and generator processes and a real Redis."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis.asyncio
from arq.constants import job_key_prefix

from services.common.contract import GENERATOR_INFO_KEY, GeneratorInfo, SamplingDefaults
from services.common.registry import live_generators, register_generator
from tests.conftest import synthetic_generator_env
from tests.support.client import stream_chat
from tests.support.processes import eventually

JSON = {"content-type": "application/json"}


def session_cookie(response: httpx.Response) -> dict[str, str]:
    """The signed session cookie a response set, to send to another API process."""
    value = response.cookies.get("sid")
    assert value, f"no session cookie in {response.headers.get_list('set-cookie')}"
    return {"sid": value}


def params_keys(stack) -> list[bytes]:
    return stack.redis.keys("chatstream:session:*:params")


async def load_until(client: httpx.AsyncClient, predicate, what: str, timeout: float = 15) -> dict:
    """Poll GET /load until ``predicate(load)`` holds; the load that satisfied it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        load = (await client.get("/load")).json()
        if predicate(load):
            return load
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last load: {load}")
        await asyncio.sleep(0.05)


async def test_each_setting_is_checked_and_a_refusal_names_the_field(stack):
    api = stack.api()
    cases = [
        ({"temperature": 2.5}, "temperature: must be between 0 and 2"),
        ({"temperature": -0.1}, "temperature: must be between 0 and 2"),
        ({"temperature": "0.7"}, "temperature: must be a number (between 0 and 2) or null for the default"),
        ({"temperature": True}, "temperature: must be a number"),
        ({"top_p": 0}, "top_p: must be greater than 0 and at most 1"),
        ({"top_p": 1.01}, "top_p: must be greater than 0 and at most 1"),
        ({"top_k": -1}, "top_k: must be at least 0"),
        ({"top_k": 2.5}, "top_k: must be an integer (at least 0)"),
        ({"repetition_penalty": 0}, "repetition_penalty: must be greater than 0"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be at least 1"),
        ({"max_new_tokens": "many"}, "max_new_tokens: must be an integer"),
        ({"seed": -1}, "seed: must be between 0 and 9223372036854775807"),
        ({"seed": 2**63}, "seed: must be between 0 and 9223372036854775807"),
        ({"seed": 1.5}, "seed: must be an integer"),
        ({"temprature": 0.5}, "temprature: unknown field; the fields are max_new_tokens, temperature, top_p"),
    ]
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        for body, message in cases:
            response = await client.post("/generation_params", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"] == "invalid_request"
            assert response.json()["message"].startswith(message), (body, response.json())
            assert "set-cookie" not in response.headers

        # Every bad field of one body is named, each in detail for a page to mark.
        both = await client.post("/generation_params", json={"top_k": -2, "repetition_penalty": -1, "temperature": 1})
        assert both.status_code == 422
        assert [d["field"] for d in both.json()["detail"]] == ["top_k", "repetition_penalty"]

        raw_cases = [
            (b"", 400, "invalid_request"),
            (b"{not json", 400, "invalid_json"),
            (b'{"repetition_penalty": Infinity}', 422, "invalid_request"),
            (b'{"temperature": NaN}', 422, "invalid_request"),
            (b"[0.5]", 422, "invalid_request"),
            (b"\xff\xfe", 400, "invalid_json"),
        ]
        for body, status, code in raw_cases:
            response = await client.post("/generation_params", content=body, headers=JSON)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"] == code and response.json()["message"]
    assert params_keys(stack) == [], "a refused body stored nothing"


async def test_other_sites_non_json_and_oversized_bodies_are_refused(stack):
    api = stack.api({"MAX_BODY_BYTES": "1024"})
    good = json.dumps({"temperature": 0.5}).encode()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        as_form = await client.post("/generation_params", content=good, headers={"content-type": "text/plain"})
        assert as_form.status_code == 415 and as_form.json()["error"] == "unsupported_media_type"
        for cross_site in ({"sec-fetch-site": "cross-site"}, {"origin": "https://evil.example"}):
            response = await client.post("/generation_params", content=good, headers={**JSON, **cross_site})
            assert response.status_code == 403 and response.json()["error"] == "cross_site_request", cross_site
        padded = b'{"temperature": 0.5' + b" " * 2000 + b"}"
        too_big = await client.post("/generation_params", content=padded, headers=JSON)
        assert too_big.status_code == 413 and too_big.json()["error"] == "body_too_large"
        assert params_keys(stack) == []
        # The same body from the page's own origin is taken.
        same_site = await client.post(
            "/generation_params", content=good, headers={**JSON, "sec-fetch-site": "same-origin"}
        )
        assert same_site.status_code == 200 and same_site.json()["session"] == {"temperature": 0.5}
    assert len(params_keys(stack)) == 1


async def test_defaults_and_limits_come_from_the_live_generators(stack):
    shared = {"TOP_P": "0.8", "TOP_K": "7", "REPETITION_PENALTY": "1.3", "MAX_NEW_TOKENS": "5"}
    stack.generator(synthetic_generator_env(**shared, TEMPERATURE="0.7", MAX_NEW_TOKENS_LIMIT="64"))
    stack.generator(synthetic_generator_env(**shared, TEMPERATURE="0.4", MAX_NEW_TOKENS_LIMIT="32"))
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        state = (await client.get("/generation_params")).json()
        assert state["generators"] == 2
        # The two disagree on the temperature (a rolling change): which one serves decides.
        assert state["defaults"] == {
            "max_new_tokens": 5, "temperature": None, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.3,
            "seed": None,  # generators sample unseeded unless asked
        }
        assert state["session"] == {} and state["effective"] == state["defaults"]
        assert state["limits"]["max_new_tokens"] == {"type": "integer", "minimum": 1, "maximum": 32}
        assert state["limits"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}
        assert state["limits"]["top_p"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
        assert state["limits"]["seed"] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

        # Both generators must honour a value: the smaller limit counts.
        above = await client.post("/generation_params", json={"max_new_tokens": 33})
        assert above.status_code == 422
        assert above.json()["message"] == (
            "max_new_tokens: must be between 1 and 32 (the live generators' MAX_NEW_TOKENS_LIMIT)"
        )
        at = await client.post("/generation_params", json={"max_new_tokens": 32, "temperature": 0.1})
        assert at.status_code == 200, at.text
        assert at.json()["effective"] == {
            "max_new_tokens": 32, "temperature": 0.1, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.3,
            "seed": None,
        }


async def test_settings_persist_across_api_processes_and_null_resets_one(stack):
    stack.generator(synthetic_generator_env(TEMPERATURE="0.2", TOP_K="50"))
    first, second = stack.api(), stack.api()
    async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as one:
        created = await one.post("/generation_params", json={"temperature": 0.5, "top_k": 3})
        assert created.status_code == 200, created.text
        assert created.json()["session"] == {"temperature": 0.5, "top_k": 3}
        cookie = session_cookie(created)
        set_cookie = created.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    async with httpx.AsyncClient(base_url=second.base_url, timeout=10, cookies=cookie) as two:
        seen = (await two.get("/generation_params")).json()
        assert seen["session"] == {"temperature": 0.5, "top_k": 3}
        assert seen["effective"]["temperature"] == 0.5 and seen["effective"]["top_k"] == 3
        reset = await two.post("/generation_params", json={"temperature": None})
        assert reset.status_code == 200 and reset.json()["session"] == {"top_k": 3}
        assert reset.json()["effective"]["temperature"] == 0.2, "the generator's default again"
        # A field left out keeps its value; an empty body changes nothing.
        assert (await two.post("/generation_params", json={})).json()["session"] == {"top_k": 3}
    async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as anyone:
        assert (await anyone.get("/generation_params")).json()["session"] == {}, "another session sees its own"
        assert "set-cookie" not in (await anyone.get("/generation_params")).headers
        anyone.cookies.update(cookie)
        assert (await anyone.get("/generation_params")).json()["session"] == {"top_k": 3}
        await anyone.post("/generation_params", json={"top_k": None})
    assert params_keys(stack) == [], "a session with nothing set keeps no key"


async def test_chat_stream_generates_with_the_sessions_settings(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=200, MAX_NEW_TOKENS="10"))
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        default = await stream_chat(client, "/chat_stream", {"user_input": "one two"}, sse=True)
        assert default.sse_events()[-1][1]["usage"]["completion_tokens"] == 10
        saved = await client.post("/generation_params", json={"max_new_tokens": 3})
        assert saved.status_code == 200
        reply = await stream_chat(client, "/chat_stream", {"user_input": "one two"}, sse=True)
        done = reply.sse_events()[-1]
        assert done[0] == "done" and done[1]["usage"]["completion_tokens"] == 3
        assert "".join(d["text"] for n, d in reply.sse_events() if n == "token") == "one two one"


async def test_the_queued_job_carries_the_sessions_settings(stack):
    api = stack.api()  # no generator: the job stays queued, to be read
    settings = {
        "temperature": 0.35, "top_p": 0.5, "top_k": 4, "repetition_penalty": 1.2, "max_new_tokens": 7, "seed": 2**63 - 1
    }
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        assert (await client.post("/generation_params", json=settings)).status_code == 200
        request = asyncio.create_task(client.post("/chat_stream", json={"user_input": "hi"}))
        await eventually(lambda: stack.redis.keys(job_key_prefix + "*"), 10, "the job to be enqueued")
        (key,) = stack.redis.keys(job_key_prefix + "*")
        job = stack.redis.get(key)  # read before the client leaves: leaving withdraws the job
        request.cancel()
    sampling = json.loads(job)["a"][0]["sampling"]
    assert {name: sampling[name] for name in settings} == settings


async def test_without_a_live_generator_defaults_are_unknown_and_only_fixed_ranges_apply(stack):
    api = stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        state = (await client.get("/generation_params")).json()
        assert state["generators"] == 0
        assert state["defaults"] == dict.fromkeys(state["defaults"], None) and len(state["defaults"]) == 6
        assert state["limits"]["max_new_tokens"] == {"type": "integer", "minimum": 1}
        assert (await client.post("/generation_params", json={"temperature": 3})).status_code == 422
        big = await client.post("/generation_params", json={"max_new_tokens": 100_000})
        assert big.status_code == 200 and big.json()["effective"]["max_new_tokens"] == 100_000

        # A generator arrives: what a request gets is capped at its limit, and a new
        # value above it is refused.
        stack.generator(synthetic_generator_env(MAX_NEW_TOKENS_LIMIT="64"))
        now = (await client.get("/generation_params")).json()
        assert now["session"] == {"max_new_tokens": 100_000}
        assert now["effective"]["max_new_tokens"] == 64
        assert (await client.post("/generation_params", json={"max_new_tokens": 100_000})).status_code == 422


async def test_load_counts_permits_queue_jobs_and_each_generators_slots(stack):
    slow = {"tokens_per_second": 5, "MAX_NEW_TOKENS": "200"}
    stack.generator(synthetic_generator_env(**slow, GENERATOR_SLOTS="1", WORKER_ID="gen-one"))
    stack.generator(synthetic_generator_env(**slow, GENERATOR_SLOTS="2", WORKER_ID="gen-two", TEMPERATURE="0.6"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "10", "ADMISSION_FOLLOWS_GENERATORS": "true", "MAX_QUEUE_SIZE": "5"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        idle = (await client.get("/load")).json()
        assert idle["busy"] is False
        assert idle["permits"] == {"in_use": 0, "limit": 3}, "the limit follows the generators' 1 + 2 slots"
        assert idle["queue"] == {"waiting": 0, "max": 5, "full": False}
        assert idle["jobs_queued"] == 0 and idle["slots"] == 3
        generators = {g["worker_id"]: g for g in idle["generators"]}
        assert {name: g["slots"] for name, g in generators.items()} == {"gen-one": 1, "gen-two": 2}
        assert generators["gen-two"]["model_id"] == "synthetic"
        assert generators["gen-two"]["defaults"]["temperature"] == 0.6
        assert generators["gen-one"]["max_new_tokens_limit"] == 4096
        assert generators["gen-one"]["context_length"] is None

        # Four streams: three generate (every slot), the fourth waits for a permit.
        streams = [asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": f"s{i}"})) for i in range(4)]
        try:
            load = await load_until(
                client, lambda l: l["permits"]["in_use"] == 3 and l["queue"]["waiting"] == 1, "3 generating, 1 waiting"
            )
            assert load["busy"] is True
            assert load["queue"] == {"waiting": 1, "max": 5, "full": False}
            assert load["jobs_queued"] == 3, "only admitted requests are enqueued"
        finally:
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        after = await load_until(client, lambda l: l["permits"]["in_use"] == 0, "the permits to come back")
        assert after["busy"] is False and after["queue"]["waiting"] == 0


async def test_a_full_queue_shows_in_the_load(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=5, MAX_NEW_TOKENS="200"))
    api = stack.api({"MAX_CONCURRENT_GENERATIONS": "1", "MAX_QUEUE_SIZE": "1"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        streams = [asyncio.create_task(stream_chat(client, "/chat_stream", {"user_input": f"s{i}"})) for i in range(2)]
        try:
            load = await load_until(client, lambda l: l["queue"]["waiting"] == 1, "one request waiting")
            assert load["busy"] and load["queue"] == {"waiting": 1, "max": 1, "full": True}
            refused = await client.post("/chat_stream", json={"user_input": "one too many"})
            assert refused.status_code == 429, "full, as /load said"
        finally:
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)


async def test_load_and_settings_answer_503_while_redis_is_down(private_stack):
    api = private_stack.api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        up = await client.get("/load")
        assert up.status_code == 200 and up.json()["permits"] == {"in_use": 0, "limit": 2}
        private_stack.redis_server.stop()
        try:
            routes = [("GET", "/load", None), ("GET", "/generation_params", None), ("POST", "/generation_params", {})]
            for method, path, body in routes:
                response = await client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.json() == {"error": "redis_unavailable", "message": response.json()["message"]}
                assert "127.0.0.1" not in response.text and "Error" not in response.text
        finally:
            private_stack.redis_server.start()
        assert (await client.get("/load")).status_code == 200
        assert (await client.post("/generation_params", json={"top_k": 5})).status_code == 200
    assert api.alive()


async def test_the_routes_need_the_api_key_like_chat_stream(stack):
    api = stack.api({"API_KEYS": "sk-params-1f2e"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        for method, path in (("GET", "/load"), ("GET", "/generation_params"), ("POST", "/generation_params")):
            response = await client.request(method, path, json={})
            assert response.status_code == 401 and response.json()["error"] == "unauthorized", path
            authorized = await client.request(method, path, json={}, headers={"authorization": "Bearer sk-params-1f2e"})
            assert authorized.status_code == 200, (path, authorized.text)


async def test_an_expired_registration_takes_its_published_info_with_it(stack):
    info = GeneratorInfo("m", SamplingDefaults(8, 0.2, 0.9, 50, 1.1), 64)
    client = redis.asyncio.Redis.from_url(stack.redis_server.url)
    try:
        await register_generator(client, "short-lived", 0.2, 1, info)
        assert [g.info for g in await live_generators(client)] == [info]
        while await live_generators(client):  # it lives 0.2 s; the test's timeout bounds the wait
            await asyncio.sleep(0.05)
        await register_generator(client, "newcomer", 10, 2, info)  # every registration purges
        assert await client.hkeys(GENERATOR_INFO_KEY) == [b"newcomer"]
        # An entry this version cannot read leaves the generator counted, its info unknown.
        await client.hset(GENERATOR_INFO_KEY, "newcomer", "not json")
        (newcomer,) = await live_generators(client)
        assert newcomer.slots == 2 and newcomer.info is None
    finally:
        await client.aclose()


def test_generator_info_decoding_ignores_fields_it_does_not_know():
    info = GeneratorInfo("m", SamplingDefaults(8, 0.2, 0.9, 50, 1.1), 64, 2048)
    newer = json.loads(info.to_json()) | {"quantization": "int4"}
    newer["defaults"]["min_p"] = 0.05
    assert GeneratorInfo.from_json(json.dumps(newer)) == info
    with pytest.raises(ValueError):
        GeneratorInfo.from_json('{"model_id": "m"}')
