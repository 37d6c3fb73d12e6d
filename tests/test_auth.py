"""Who may use the API: API keys, production mode's session secret, CORS; and
that keys never reach the logs or the traces."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import synthetic_generator_env
from tests.support.otlp import OtlpReceiver
from tests.support.processes import REPO, eventually, free_port

KEY_A = "sk-test-alpha-0f3c9a1d7e"
KEY_B = "sk-test-bravo-5b2e8c4f1a"
KEY_FROM_FILE = "sk-test-file-9d4a7e2c6b"
WRONG_KEY = "sk-test-wrong-1a2b3c4d5e"

CHAT = {"user_input": "alpha beta"}
COMPLETION = {"model": "m", "messages": [{"role": "user", "content": "alpha beta"}], "max_tokens": 3}

#: (method, path, body) of every route that needs a key.
PROTECTED = [
    ("POST", "/chat_stream", CHAT),
    ("POST", "/clear_context", None),
    ("POST", "/v1/chat/completions", COMPLETION),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/default", None),
    ("GET", "/v1/unknown", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]
PUBLIC = ["/healthz", "/readyz", "/metrics", "/", "/static/chat.js", "/static/chat.css"]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_api_keys_guard_every_route_but_health_readiness_metrics_and_the_page(stack, tmp_path):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# mounted from a Secret\n{KEY_FROM_FILE}\n")
    stack.generator(synthetic_generator_env(tokens_per_second=200))
    api = stack.api({"API_KEYS": f"{KEY_A}, {KEY_B}", "API_KEYS_FILE": str(keys_file), "LOG_LEVEL": "DEBUG"})

    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        for method, path, body in PROTECTED:
            bodies = set()
            for headers in ({}, bearer(WRONG_KEY), {"authorization": KEY_A}, {"authorization": f"Basic {KEY_A}"}):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                bodies.add(response.text)
            assert len(bodies) == 1, f"{path}: missing and wrong keys must be answered alike"
            error = response.json()["error"]
            if path.startswith("/v1/"):
                assert error == {
                    "message": error["message"],
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            else:
                assert error == "unauthorized"
            for key in (KEY_A, KEY_B, KEY_FROM_FILE):
                assert key not in response.text

        for path in PUBLIC:
            assert http.get(path).status_code == 200, path

        for key in (KEY_A, KEY_B, KEY_FROM_FILE):
            reply = http.post("/chat_stream", json=CHAT, headers=bearer(key))
            assert reply.status_code == 200 and reply.text.startswith("alpha beta alpha"), reply.text
            assert http.post("/clear_context", headers=bearer(key), json={}).status_code == 204
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200

        # A rotated Secret: the new key works at once, the old one stops working.
        keys_file.write_text("sk-test-rotated-77aa\n")
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        assert http.get("/v1/models", headers=bearer("sk-test-rotated-77aa")).status_code == 200
        assert http.get("/v1/models", headers=bearer(KEY_FROM_FILE)).status_code == 401
        assert http.get("/v1/models", headers=bearer(KEY_A)).status_code == 200

    good = openai.OpenAI(base_url=api.base_url + "/v1", api_key=KEY_B, max_retries=0)
    completion = good.chat.completions.create(**COMPLETION)
    assert completion.choices[0].message.content == "alpha beta alpha"
    bad = openai.OpenAI(base_url=api.base_url + "/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.chat.completions.create(**COMPLETION)
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()

    log = api.log()
    assert "POST /chat_stream" in log and "401" in log, "the log is there, at DEBUG"
    for secret in (KEY_A, KEY_B, KEY_FROM_FILE, WRONG_KEY, "sk-test-rotated-77aa"):
        assert secret not in log, "an API key reached the API's log"


async def test_authorization_header_is_redacted_from_traces(stack):
    receiver = OtlpReceiver()
    try:
        stack.generator(synthetic_generator_env(tokens_per_second=200))
        api = stack.api(
            {
                "API_KEYS": KEY_A,
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                # Capture every request header: the worst case an operator can configure.
                "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST": ".*",
            }
        )
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as http:
            assert (await http.post("/chat_stream", json=CHAT, headers=bearer(KEY_A))).status_code == 200
            assert (await http.post("/chat_stream", json=CHAT, headers=bearer(WRONG_KEY))).status_code == 401

        def captured() -> list:
            return [s for s in receiver.spans if "http.request.header.authorization" in s.attributes]

        await eventually(lambda: len(captured()) >= 2, 10, "both server spans to be exported")
        assert all("[REDACTED]" in str(s.attributes["http.request.header.authorization"]) for s in captured())
        assert all("http.request.header.content_type" in s.attributes for s in captured()), "headers were captured"
        everything = repr([(s.name, s.attributes) for s in receiver.spans])
        assert KEY_A not in everything and WRONG_KEY not in everything
    finally:
        receiver.close()


def start_api(env: dict[str, str]) -> subprocess.Popen:
    inherited = {k: v for k, v in os.environ.items() if k != "SESSION_SECRET"}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "text", "OTEL_TRACES_EXPORTER": "none", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "services.api"], cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "secret",
    [None, "chatstream-local-development-secret", "short"],
    ids=["unset", "development-default", "too-short"],
)
def test_production_mode_refuses_to_start_without_a_real_session_secret(redis_server, secret):
    env = {"ENVIRONMENT": "production", "REDIS_URL": redis_server.url, "API_PORT": str(free_port())}
    if secret is not None:
        env["SESSION_SECRET"] = secret
    proc = start_api(env)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, output
    assert "refusing to start" in output and "SESSION_SECRET" in output
    assert "Traceback" not in output, "a clear message, not a stack trace"
    if secret:
        assert secret not in output


def test_production_mode_refuses_to_start_without_api_keys_unless_anonymous_is_explicit(redis_server):
    env = {
        "ENVIRONMENT": "production",
        "SESSION_SECRETS": "a-random-production-secret-3f9e1c",
        "REDIS_URL": redis_server.url,
        "API_PORT": str(free_port()),
    }
    proc = start_api(env)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, output
    assert "refusing to start" in output and "API_KEYS" in output and "ALLOW_ANONYMOUS=true" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("access", ["api-key", "anonymous"])
def test_production_mode_starts_with_secrets_and_keys_and_sets_secure_cookies(stack, access):
    stack.generator(synthetic_generator_env(tokens_per_second=200))
    env = {"ENVIRONMENT": "production", "SESSION_SECRETS": "a-random-production-secret-3f9e1c"}
    env |= {"API_KEYS": KEY_A} if access == "api-key" else {"ALLOW_ANONYMOUS": "true"}
    api = stack.api(env)
    reply = httpx.post(api.base_url + "/chat_stream", json=CHAT, headers=bearer(KEY_A), timeout=10)
    assert reply.status_code == 200
    cookie = reply.headers["set-cookie"]
    # Secure although this request came over plain HTTP (as it does behind a TLS-terminating ingress).
    assert cookie.startswith("sid=") and {"HttpOnly", "SameSite=Lax", "Secure"} <= set(cookie.split("; "))
    if access == "anonymous":
        assert "ALLOW_ANONYMOUS: anyone who reaches the API may use it" in api.log(), "open access is called out"


def test_unreadable_key_file_stops_the_start_with_a_clear_message(redis_server, tmp_path):
    proc = start_api({"API_KEYS_FILE": str(tmp_path / "missing"), "REDIS_URL": redis_server.url, "API_PORT": str(free_port())})
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "API_KEYS_FILE" in output and "Traceback" not in output, output


def test_cors_headers_only_for_configured_origins(stack):
    preflight = {
        "origin": "https://chat.example.com",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    closed = stack.api()
    open_ = stack.api({"CORS_ALLOW_ORIGINS": "https://chat.example.com, https://other.example.com", "API_KEYS": KEY_A})
    with httpx.Client(timeout=10) as http:
        response = http.options(closed.base_url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = http.get(closed.base_url + "/healthz", headers={"origin": "https://chat.example.com"})
        assert "access-control-allow-origin" not in response.headers

        # A preflight carries no key; it is answered before the key check.
        response = http.options(open_.base_url + "/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        response = http.get(open_.base_url + "/v1/models", headers={"origin": "https://chat.example.com", **bearer(KEY_A)})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "x-request-id" in response.headers.get("access-control-expose-headers", "").lower()
        # The browser must see a 401 too (to ask for a key), so it carries the header as well.
        response = http.get(open_.base_url + "/v1/models", headers={"origin": "https://chat.example.com"})
        assert response.status_code == 401 and response.headers["access-control-allow-origin"] == "https://chat.example.com"

        response = http.options(open_.base_url + "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
        response = http.get(open_.base_url + "/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
