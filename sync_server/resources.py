"""The long-lived resources of a running Galley process, built from settings.

Built once in the application lifespan (or by the CLI), never at import time, and closed on
shutdown. Every request handler reaches them through ``request.app.state.resources``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from .crypto import FieldCipher
from .db import create_db_engine
from .pubsub import PubSub, create_pubsub
from .settings import Settings
from .tokens import TokenService

log = logging.getLogger("galley.resources")
T = TypeVar("T")


@dataclass
class Resources:
    settings: Settings
    engine: Engine
    tokens: TokenService
    cipher: FieldCipher
    pubsub: PubSub
    redis: Any | None = None  # redis.Redis when REDIS_URL is configured
    extras: dict[str, Any] = field(default_factory=dict)
    #: Bounds the threads doing blocking work for requests at once (``settings.db_workers``).
    slots: threading.BoundedSemaphore | None = None

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run blocking ``fn`` (database, Redis) in a worker thread, at most
        ``settings.db_workers`` at once in this process.

        The work is mostly Python holding the GIL between short waits on the database: a few
        threads keep the process busy, and dozens (the thread pool holds 40) only take the
        GIL from each other, which costs CPU (measured: ~25 % more per push with 16 devices
        pushing at once). The others wait on a semaphore, where waiting costs nothing. (A
        thread semaphore rather than an event-loop limiter: it works whichever loop calls,
        as test clients each run their own.)
        """
        if self.slots is None:
            self.slots = threading.BoundedSemaphore(self.settings.db_workers)
        slots = self.slots

        def bounded() -> T:
            with slots:
                return fn()

        return await run_in_threadpool(bounded)

    def close(self) -> None:
        self.pubsub.close()
        if self.redis is not None:
            self.redis.close()
        self.engine.dispose()


def build_resources(settings: Settings, *, engine: Engine | None = None) -> Resources:
    """Create the engine, Redis client, pub/sub and token service for ``settings``."""
    redis_client = None
    if settings.redis_url:
        import redis

        redis_client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
        )
    return Resources(
        settings=settings,
        engine=engine or create_db_engine(settings.database_url),
        tokens=TokenService(settings),
        cipher=FieldCipher.from_settings(settings),
        pubsub=create_pubsub(redis_client),
        redis=redis_client,
        slots=threading.BoundedSemaphore(settings.db_workers),
    )
