"""The huey instance, built from settings: Redis when configured, SQLite otherwise.

Built by :func:`build_huey` (never at import time); the task functions are registered on it there,
under fixed names, so the web process that enqueues and the ``galley worker`` process that consumes
agree on them, and a test can build an immediate-mode queue from the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey, crontab

from sync_server.settings import Settings

from . import tasks

#: The queue's name (the Redis key prefix / the SQLite table's namespace).
QUEUE_NAME = "galley"


def build_huey(settings: Settings, *, immediate: bool = False) -> Huey:
    """The queue for ``settings``: RedisHuey with ``REDIS_URL``, SqliteHuey otherwise.

    ``immediate`` (tests) runs each task synchronously when it is enqueued, in memory.
    """
    if settings.redis_url and not immediate:
        huey: Huey = RedisHuey(QUEUE_NAME, url=settings.redis_url)
    else:
        if not immediate:
            Path(settings.huey_sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        huey = SqliteHuey(QUEUE_NAME, filename=settings.huey_sqlite_path, immediate=immediate)
    register(huey, settings)
    return huey


def register(huey: Huey, settings: Settings) -> dict[str, Any]:
    """Register every task on ``huey``; returns the enqueueable ones by name.

    A job that also runs on a schedule is registered twice: as a plain task (enqueue it by hand,
    its result is kept) and as a periodic task named ``<name>_daily`` (huey keeps no result for
    periodic runs).
    """

    def compact_tombstones() -> int:
        return tasks.compact_tombstones(settings)

    as_task: Any = huey.task(name="compact_tombstones")
    daily_at_0317: Any = huey.periodic_task(
        crontab(minute="17", hour="3"), name="compact_tombstones_daily"
    )
    daily_at_0317(compact_tombstones)

    def purge_expired_sessions() -> dict[str, int]:
        return tasks.purge_expired_sessions(settings)

    purge_task: Any = huey.task(name="purge_expired_sessions")
    hourly_at_41: Any = huey.periodic_task(
        crontab(minute="41"), name="purge_expired_sessions_hourly"
    )
    hourly_at_41(purge_expired_sessions)
    registered: dict[str, Any] = {
        "compact_tombstones": as_task(compact_tombstones),
        "purge_expired_sessions": purge_task(purge_expired_sessions),
    }
    huey.galley_tasks = registered  # type: ignore[attr-defined]
    return registered


def task_named(huey: Huey, name: str) -> Any:
    """The task wrapper registered as ``name`` by :func:`build_huey` (call it to enqueue)."""
    registered: dict[str, Any] = huey.galley_tasks  # type: ignore[attr-defined]
    return registered[name]
