"""``python -m services.generator``: run one generator worker in the foreground."""

from __future__ import annotations

import asyncio
import logging

from services.common.settings import settings_from_command_line
from services.common.logs import setup_logging
from services.common.telemetry import setup_tracing
from services.generator.settings import GeneratorSettings


def main(argv: list[str] | None = None) -> None:
    """Parse the (settings-only) command line and run the worker until SIGINT/SIGTERM."""
    settings, _ = settings_from_command_line(
        GeneratorSettings,
        "python -m services.generator",
        "Generator worker: takes generation jobs from the arq queue in Redis, runs the model, and publishes "
        "tokens to each request's Redis Stream.",
        argv,
    )
    setup_logging(settings.log_level, settings.log_format)
    if logging.getLogger().level > logging.DEBUG:
        # arq logs every job's arguments, which hold the user's conversation.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
    setup_tracing("chatstream-generator")
    from services.generator.worker import build_worker

    # arq runs on the event loop current when the worker is built. uvloop's costs less
    # per token relayed (timers, socket writes), and per-token work on the event loop
    # competes with the model's decode loop for the GIL.
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(settings).run()


if __name__ == "__main__":
    main()
