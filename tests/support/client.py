"""Client-side helpers: read a streamed reply the way a user's client would."""

from __future__ import annotations

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
            name, data, event_id = "message", "", ""
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    data += line[len("data: ") :]
                elif line.startswith("id: "):
                    event_id = line[len("id: ") :]
            if data:
                events.append((name, json.loads(data), event_id))
        return events


async def stream_chat(
    client: httpx.AsyncClient,
    path: str,
    payload: dict,
    *,
    sse: bool = False,
    stop_after_chunks: int | None = None,
) -> StreamedReply:
    """POST a chat request and read the streamed reply chunk by chunk.

    ``stop_after_chunks`` closes the connection after that many chunks, like a
    user closing the tab mid-reply.
    """
    headers = {"accept": "text/event-stream"} if sse else {}
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
