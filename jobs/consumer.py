"""Running the huey consumer (``galley worker``)."""

from __future__ import annotations

import logging

from sync_server.settings import Settings

from .queue import build_huey


def run_consumer(settings: Settings, *, workers: int = 2) -> int:
    logging.basicConfig(level=settings.log_level)
    huey = build_huey(settings)
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=True)
    consumer.run()
    return 0
