"""RelayResponse's outcome when the connection is lost while the pod lags behind its
sockets: uvicorn drops the sends after a lost connection without a word, so only the
``http.disconnect`` it delivers tells the relay that nobody got the reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.api.framing import PlainTextFramer
from services.api.outcome import CallbackMessage
from services.api.response import RelayProgress, RelayResponse
from services.common.contract import EventType, StreamEvent


class InstantReply:
    """A lifecycle whose whole reply is already there (the stream was written while
    the pod was busy elsewhere)."""

    def __init__(self) -> None:
        self.finished: list[CallbackMessage] = []

    async def events(self) -> AsyncIterator[StreamEvent]:
        for i in range(20):
            yield StreamEvent(EventType.TOKEN, text=f" t{i}")
        yield StreamEvent(EventType.DONE, finish_reason="length", completion_tokens=20)

    async def finish(self, message: CallbackMessage, progress: RelayProgress) -> None:
        self.finished.append(message)

    @property
    def can_hand_off(self) -> bool:
        return False


def respond(lifecycle: InstantReply, receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    response = RelayResponse(
        lifecycle=lifecycle,
        framer=PlainTextFramer(),
        headers=[],
        send_headers_early=False,
        deadline_seconds=5,
        send_timeout_seconds=5,
    )
    asyncio.run(response({"type": "http"}, receive, send))
    return sent


def test_a_reply_relayed_after_the_connection_was_lost_is_not_a_success():
    async def lost() -> dict:
        return {"type": "http.disconnect"}

    lifecycle = InstantReply()
    respond(lifecycle, lost)
    assert lifecycle.finished == [CallbackMessage.CLIENT_DISCONNECTED_WHILE_STREAMING]


def test_a_reply_handed_over_before_the_connection_is_lost_is_a_success():
    async def open_connection() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    lifecycle = InstantReply()
    sent = respond(lifecycle, open_connection)
    assert lifecycle.finished == [CallbackMessage.SUCCESS]
    assert sent[-1] == {"type": "http.response.body", "body": sent[-1]["body"], "more_body": False}
    assert b"".join(m.get("body", b"") for m in sent).decode().strip().startswith("t0 t1")
