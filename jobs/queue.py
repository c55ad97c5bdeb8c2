"""The huey instance, built from settings: Redis when configured, SQLite otherwise.

Built by :func:`build_huey` (never at import time); task functions are registered on it there, so
a test can build an immediate-mode queue and the consumer a real one from the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey, crontab

from sync_server.settings import Settings

from . import tasks


def build_huey(settings: Settings, *, immediate: bool = False) -> Huey:
    if settings.redis_url and not immediate:
        huey: Huey = RedisHuey("galley", url=settings.redis_url)
    else:
        Path(settings.huey_sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        huey = SqliteHuey("galley", filename=settings.huey_sqlite_path, immediate=immediate)
    register(huey, settings)
    return huey


def register(huey: Huey, settings: Settings) -> dict[str, Any]:
    """Register every task on ``huey``; returns them by name for enqueuing."""
    registered: dict[str, Any] = {
        "compact_tombstones": huey.periodic_task(crontab(minute="17", hour="3"))(
            lambda: tasks.compact_tombstones(settings)
        ),
    }
    huey.galley_tasks = registered  # type: ignore[attr-defined]
    return registered
