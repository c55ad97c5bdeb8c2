"""The long-lived resources of a running Galley process, built from settings.

Built once in the application lifespan (or by the CLI), never at import time, and closed on
shutdown. Every request handler reaches them through ``request.app.state.resources``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from domain.catalog import default_registry

from .committer import PushCommitter
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
    #: The threads doing the blocking work of /sync/v1 writes (push, device registration):
    #: ``settings.db_workers`` of them.
    executor: ThreadPoolExecutor = field(init=False)
    #: The threads doing pulls (:func:`read_workers` of them): a pull never waits for a
    #: thread behind pushes queued on a contended scope counter.
    read_executor: ThreadPoolExecutor = field(init=False)
    #: Where pushes wait to be applied, in groups, on ``executor``'s threads.
    committer: PushCommitter = field(init=False)
    closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.db_workers, thread_name_prefix="galley-sync"
        )
        self.read_executor = ThreadPoolExecutor(
            max_workers=read_workers(self.settings), thread_name_prefix="galley-pull"
        )
        self.committer = PushCommitter(
            self.engine,
            self.executor,
            default_registry(),
            group_limit=self.settings.push_group_limit,
            gather_for=self.settings.push_gather_ms / 1000,
            max_running=self.settings.db_workers,
            published=self.publish_versions,
        )

    def publish_versions(self, versions: dict[str, int]) -> None:
        """Tell listeners (live pulls) that these scopes moved on; only once committed."""
        for scope, version in versions.items():
            self.pubsub.publish(f"galley:scope:{scope}", str(version).encode())

    async def run_blocking(self, fn: Callable[[], T], *, read: bool = False) -> T:
        """Run the blocking work of a /sync/v1 request (database, Redis) on one of
        ``settings.db_workers`` threads, or with ``read`` (a pull) on one of the pull threads.

        That work is mostly Python holding the GIL between short waits on the database: a few
        threads keep the process busy, and dozens (the default thread pool holds 40) only take
        the GIL from each other, which costs CPU (measured: ~25 % more per push with 16 devices
        pushing at once); requests beyond the bound wait their turn, which costs nothing. The
        event loop's own executor hand-off is also lighter than anyio's (measured: ~1 ms of a
        small push's CPU went to the thread hop). Pushes may wait long on a scope's counter
        while another device writes the branch; pulls, the bulk of a server's requests, have
        threads of their own so they never queue behind such a convoy. /api/v1, whose requests
        may spend 100 ms hashing a password, keeps Starlette's thread pool.
        """
        if self.closed:
            raise RuntimeError("the server is shutting down")
        executor = self.read_executor if read else self.executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    def close(self) -> None:
        self.release()
        self.engine.dispose()

    def release(self) -> None:
        """Close everything but the engine: the threads (after their work), the push
        connection, pub/sub, Redis. For a caller that lent the engine (tests) and keeps it."""
        self.closed = True
        self.executor.shutdown(wait=True)
        self.read_executor.shutdown(wait=True)
        self.committer.close()
        self.pubsub.close()
        if self.redis is not None:
            self.redis.close()


def read_workers(settings: Settings) -> int:
    """Pull threads per process: half as many as for writes, at least two."""
    return max(2, settings.db_workers // 2)


#: anyio's default thread limit, which Starlette's run_in_threadpool uses.
_API_THREADS = 40


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
        # Room in the pool for every sync thread, pushes' and pulls' (kept open) and, as
        # overflow, for each of the 40 threads of Starlette's pool that /api/v1 and background
        # work run on: sync never waits for a connection behind sign-ins.
        engine=engine
        or create_db_engine(
            settings.database_url,
            pool_size=max(10, settings.db_workers + read_workers(settings) + 2),
            max_overflow=_API_THREADS,
        ),
        tokens=TokenService(settings),
        cipher=FieldCipher.from_settings(settings),
        pubsub=create_pubsub(redis_client),
        redis=redis_client,
    )
