"""ChatStream 0.3.0 itself with its mock model, for the relay benchmark.

Runs in ``bench/.venv-chatstream`` (created by ``bench/relay_bench.py``), served with
``uvicorn --factory bench.chatstream_app:create``. ``CHATSTREAM_TIME_PER_TOKEN``
sets the mock's delay per token; the mock echoes the user's words, so a prompt
of N words is an N-token reply, as with the synthetic generator backend.
"""

from __future__ import annotations

import os

from chatstream import ChatStream
from chatstream.chat_prompt_presets.chat_prompt_databricks_dolly import ChatPromptDatabricksDolly
from fastapi import FastAPI, Request


def create() -> FastAPI:
    """The article's app, with concurrency and queue raised so that the benchmark,
    not ChatStream's defaults (2 and 5), decides how many streams run at once."""
    limit = int(os.environ.get("CHATSTREAM_CONCURRENCY", "2000"))
    chat_stream = ChatStream(
        use_mock_response=True,
        mock_params={"type": "echo", "time_per_token_sec": float(os.environ["CHATSTREAM_TIME_PER_TOKEN"])},
        num_of_concurrent_executions=limit,
        max_queue_size=limit,
        chat_prompt_clazz=ChatPromptDatabricksDolly,  # any preset: the mock only echoes
    )
    app = FastAPI()
    chat_stream.append_middlewares(app)

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.on_event("startup")
    async def startup() -> None:
        await chat_stream.start_queue_worker()

    return app
