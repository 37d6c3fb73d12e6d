"""Client-side helpers: read a streamed reply the way a user's client would."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamedReply:
    """What a client saw: status, headers, and each body chunk with its arrival time."""

    status: int
    headers: httpx.Headers
    chunks: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    started: float = 0.0
    error: Exception | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def sse_events(self) -> list[tuple[str, dict]]:
        """Parse the body as server-sent events: [(event name, JSON data)]."""
        return [(name, data) for name, data, _ in self.sse_events_with_ids()]

    def sse_events_with_ids(self) -> list[tuple[str, dict, str]]:
        """[(event name, JSON data, id or '')]; blocks without data (``retry:``) are skipped."""
        events = []
        for block in self.text.split("\n\n"):
            name, data, event_id, _ = parse_sse_block(block)
            if data is not None:
                events.append((name, data, event_id))
        return events


async def stream_chat(
    client: httpx.AsyncClient,
    path: str,
    payload: dict,
    *,
    sse: bool = False,
    stop_after_chunks: int | None = None,
    headers: dict[str, str] | None = None,
) -> StreamedReply:
    """POST a chat request and read the streamed reply chunk by chunk.

    ``stop_after_chunks`` closes the connection after that many chunks, like a
    user closing the tab mid-reply.
    """
    headers = {**({"accept": "text/event-stream"} if sse else {}), **(headers or {})}
    started = time.monotonic()
    async with client.stream("POST", path, json=payload, headers=headers) as response:
        reply = StreamedReply(response.status_code, response.headers, started=started)
        try:
            async for chunk in response.aiter_raw():
                reply.chunks.append(chunk)
                reply.times.append(time.monotonic())
                if stop_after_chunks is not None and len(reply.chunks) >= stop_after_chunks:
                    break
        except httpx.HTTPError as exc:
            reply.error = exc
    return reply


def scrape(url: str) -> dict[str, float]:
    """Samples of a Prometheus endpoint: 'name{label="v",...}' → value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@dataclass
class ResumedStream:
    """What a resuming client got: every event once, and how often it reconnected."""

    request_id: str = ""
    events: list[tuple[str, dict, str]] = field(default_factory=list)
    connections: int = 0
    refused: int = 0  # answers other than 200 (a draining pod's 503) before it got through
    handed_off: int = 0  # ``reconnect`` events (a draining pod sent the client elsewhere)

    @property
    def text(self) -> str:
        return "".join(data["text"] for name, data, _ in self.events if name == "token")

    @property
    def end(self) -> tuple[str, dict] | None:
        terminal = [(name, data) for name, data, _ in self.events if name in ("done", "error")]
        return terminal[-1] if terminal else None


async def stream_resuming(
    client: httpx.AsyncClient,
    payload: dict,
    *,
    path: str = "/chat_stream",
    give_up_after: float = 60,
    result: ResumedStream | None = None,
) -> ResumedStream:
    """POST an SSE chat request to ``path`` and read it to its ``done`` or ``error`` the
    way the chat page does: when the connection drops or the stream ends without
    either, wait the server's ``retry:`` and ``GET /chat_stream/{request_id}`` with
    ``Last-Event-ID``; a 5xx (a draining pod) or a refused connection is retried the
    same way. ``result``: filled in as events arrive (for a caller watching progress)."""
    result = result if result is not None else ResumedStream()
    retry, last_id = 1.0, ""
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        headers = {"accept": "text/event-stream"}
        if result.request_id:
            method, url, body = "GET", f"/chat_stream/{result.request_id}", None
            if last_id:
                headers["last-event-id"] = last_id
        else:
            method, url, body = "POST", path, payload
        try:
            async with client.stream(method, url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    if response.status_code < 500:
                        raise AssertionError(f"{method} {url}: {response.status_code} {response.text}")
                    result.refused += 1
                else:
                    result.connections += 1
                    result.request_id = result.request_id or response.headers["x-request-id"]
                    buffer = ""
                    async for chunk in response.aiter_text():
                        buffer += chunk
                        *blocks, buffer = buffer.split("\n\n")
                        for block in blocks:
                            name, data, event_id, block_retry = parse_sse_block(block)
                            if block_retry is not None:
                                retry = block_retry / 1000
                            if data is None:
                                continue
                            if event_id:
                                last_id = event_id
                            if name == "reconnect":
                                result.handed_off += 1
                            else:
                                result.events.append((name, data, event_id))
                            if name in ("done", "error"):
                                return result
        except httpx.TransportError:
            pass  # the pod (or the network) went away: resume after the retry
        await asyncio.sleep(retry)
    raise TimeoutError(f"no end of {result.request_id or 'the request'} within {give_up_after}s: {result}")


def parse_sse_block(block: str) -> tuple[str, dict | None, str, int | None]:
    """One server-sent event: (event name, JSON data or None, id, retry)."""
    name, data, event_id, retry = "message", "", "", None
    for line in block.split("\n"):
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data += line[len("data: ") :]
        elif line.startswith("id: "):
            event_id = line[len("id: ") :]
        elif line.startswith("retry: "):
            retry = int(line[len("retry: ") :])
    return name, (json.loads(data) if data else None), event_id, retry


def assert_openai_client_streams_paris(base_url: str, api_key: str = "unused") -> None:
    """The ``openai`` client streams a greedy (deterministic) reply through ``/v1`` that
    names Paris and ends with a finish reason."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, timeout=120)
    chunks = list(client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, stream=True,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
