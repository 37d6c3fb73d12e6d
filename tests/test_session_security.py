"""Session cookies and the routes they authenticate: signed with HMAC-SHA-256 and a
timestamp the server checks, rotatable secrets, Secure where it must be, no
cross-site use, a bounded history; metrics and probes off the public port."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from itsdangerous import TimestampSigner

from services.api.settings import DEV_SESSION_SECRET
from tests.conftest import synthetic_generator_env

OLD = "old-session-secret-5e1d9c0a7b"
NEW = "new-session-secret-8a2f4b6c1d"


def chat(api, cookie: str | None = None, *, regenerate: bool = False, text: str = "alpha beta", headers=None):
    cookies = {"sid": cookie} if cookie else None
    body = {"user_input": text, "regenerate": regenerate} if regenerate else {"user_input": text}
    return httpx.post(api.base_url + "/chat_stream", json=body, cookies=cookies, headers=headers, timeout=20)


def session_cookie(response: httpx.Response) -> str:
    return response.headers["set-cookie"].split(";", 1)[0].removeprefix("sid=")


def continues(api, cookie: str) -> bool:
    """Whether ``cookie`` names a session with history: regenerate needs one (409 otherwise)."""
    response = chat(api, cookie, regenerate=True)
    assert response.status_code in (200, 409), response.text
    return response.status_code == 200


def test_a_secret_is_rotated_without_ending_anyones_session(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=500))
    before = stack.api({"SESSION_SECRETS": OLD})
    cookie = session_cookie(chat(before))
    assert continues(before, cookie)

    during = stack.api({"SESSION_SECRETS": f"{NEW},{OLD}"})  # newest first: it signs, both verify
    assert continues(during, cookie)
    reissued = session_cookie(chat(during, cookie))
    assert reissued != cookie and reissued.split(".")[0] == cookie.split(".")[0], "same session, new signature"

    after = stack.api({"SESSION_SECRETS": NEW})  # the old secret retired
    assert continues(after, reissued)
    assert not continues(after, cookie), "a cookie signed only with a retired secret is refused"


def test_an_old_cookie_expires_on_the_server_whatever_the_browser_keeps(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=500))
    api = stack.api({"SESSION_TTL_SECONDS": "3600"})
    fresh = session_cookie(chat(api))
    session_id = fresh.split(".")[0]
    assert continues(api, fresh)

    class SignedLongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 7200

    stale = SignedLongAgo(DEV_SESSION_SECRET, salt="chatstream-session", key_derivation="hmac", digest_method=hashlib.sha256)
    assert not continues(api, stale.sign(session_id).decode()), "a two-hour-old signature outlives a one-hour TTL"
    assert continues(api, fresh)
    # A signature of the same id with another algorithm (itsdangerous' SHA-1 default) is no key either.
    sha1 = TimestampSigner(DEV_SESSION_SECRET, salt="chatstream-session", key_derivation="hmac")
    assert not continues(api, sha1.sign(session_id).decode())


@pytest.mark.parametrize(("env", "secure"), [({}, False), ({"SESSION_COOKIE_SECURE": "true"}, True)])
def test_the_cookie_is_secure_when_told_even_over_plain_http(stack, env, secure):
    stack.generator(synthetic_generator_env(tokens_per_second=500))
    attributes = chat(stack.api(env)).headers["set-cookie"].split("; ")
    assert {"HttpOnly", "SameSite=Lax"} <= set(attributes)
    assert ("Secure" in attributes) is secure


def test_cookie_routes_refuse_other_sites_and_bodies_not_declared_json(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=500))
    api = stack.api({"CORS_ALLOW_ORIGINS": "https://partner.example"})
    cookie = session_cookie(chat(api))
    host = f"127.0.0.1:{api.port}"
    body = json.dumps({"user_input": "x"})
    with httpx.Client(base_url=api.base_url, timeout=20, cookies={"sid": cookie}) as http:
        def post(path: str, headers: dict[str, str], content: str = body) -> httpx.Response:
            return http.post(path, content=content, headers=headers)

        for path in ("/chat_stream", "/clear_context"):
            # What an HTML form on another site can send without a preflight.
            for kind in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
                refused = post(path, {"content-type": kind})
                assert refused.status_code == 415 and refused.json()["error"] == "unsupported_media_type"
            for headers in (
                {"sec-fetch-site": "cross-site", "origin": "https://evil.example"},
                {"sec-fetch-site": "same-site", "origin": "https://other.127.0.0.1.nip.io"},
                {"origin": "https://evil.example"},  # an older browser: Origin alone
                {"origin": "null"},  # sandboxed frames, file: pages
            ):
                refused = post(path, {"content-type": "application/json", **headers})
                assert refused.status_code == 403 and refused.json()["error"] == "cross_site_request", headers
        assert continues(api, cookie), "nothing refused reached the session"

        for headers in (
            {"sec-fetch-site": "same-origin", "origin": f"http://{host}"},
            {"origin": f"http://{host}"},
            {"sec-fetch-site": "cross-site", "origin": "https://partner.example"},  # listed in CORS_ALLOW_ORIGINS
            {},  # curl, SDKs: no browser headers at all
        ):
            assert post("/chat_stream", {"content-type": "application/json; charset=utf-8", **headers}).status_code == 200
        assert post("/clear_context", {"content-type": "application/json", "sec-fetch-site": "same-origin"}, "").status_code == 204
    assert not continues(api, cookie)


def test_a_sessions_stored_history_is_capped_in_bytes_keeping_the_newest_turns(stack):
    stack.generator(synthetic_generator_env(tokens_per_second=2000, MAX_NEW_TOKENS="8"))
    api = stack.api({"HISTORY_MAX_BYTES": "2048", "MAX_INPUT_CHARS": "8000"})
    cookie = session_cookie(chat(api, text="first"))
    for i in range(8):
        assert chat(api, cookie, text=f"turn{i} " + "mot été " * 40).status_code == 200
    (key,) = stack.redis.keys("chatstream:session:*")
    turns = stack.redis.lrange(key, 0, -1)
    assert sum(len(t) for t in turns) <= 2048, [(len(t), t[:40]) for t in turns]
    assert 1 <= len(turns) < 9
    assert json.loads(turns[-1])["user"].startswith("turn7 "), "the newest turn is kept"
    assert all(not json.loads(t)["user"].startswith("first") for t in turns), "the oldest went first"
    # A single turn larger than the cap is still kept (it is the conversation's context).
    assert chat(api, cookie, text="big " + "x" * 4000).status_code == 200
    assert [json.loads(t)["user"][:4] for t in stack.redis.lrange(key, 0, -1)] == ["big "]


def test_metrics_and_probes_can_leave_the_public_port(stack):
    from tests.support.processes import free_port

    stack.generator(synthetic_generator_env(tokens_per_second=500))
    internal = free_port()
    api = stack.api({"API_INTERNAL_PORT": str(internal), "API_KEYS": "sk-internal-test-1"})
    with httpx.Client(timeout=10) as http:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert http.get(api.base_url + path).status_code == 404, f"{path} is still on the public port"
        assert http.get(f"http://127.0.0.1:{internal}/healthz").json() == {"status": "ok"}
        assert http.get(f"http://127.0.0.1:{internal}/readyz").status_code == 200
        assert "chatstream_permits_in_use" in http.get(f"http://127.0.0.1:{internal}/metrics").text
        reply = http.post(api.base_url + "/chat_stream", json={"user_input": "a"}, headers={"authorization": "Bearer sk-internal-test-1"})
        assert reply.status_code == 200
        assert http.post(f"http://127.0.0.1:{internal}/chat_stream", json={"user_input": "a"}).status_code == 404
