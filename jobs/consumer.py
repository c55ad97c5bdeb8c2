"""Running the huey consumer (``galley worker``)."""

from __future__ import annotations

import logging

from sync_server.settings import Settings

from .queue import build_huey

log = logging.getLogger("galley.jobs")


def run_consumer(settings: Settings, *, workers: int = 2) -> int:
    """Consume the queue of ``settings`` (Redis or SQLite) until interrupted; runs periodic
    tasks too. SIGINT stops gracefully (running tasks finish), SIGTERM at once."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    huey = build_huey(settings)
    log.info(
        "worker consuming %s queue %r with %d thread(s)",
        "Redis" if settings.redis_url else f"SQLite ({settings.huey_sqlite_path})",
        huey.name,
        workers,
    )
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=True)
    consumer.run()
    return 0
