"""Background jobs: the queue built from settings, the compaction task, and ``galley worker``.

The queue is huey on Redis when ``REDIS_URL`` is set and on a SQLite file otherwise; tasks are
enqueued through the real queue and executed the way the consumer executes them (or by the real
``galley worker`` process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from huey import RedisHuey, SqliteHuey
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from domain.registry import ORG_SCOPE
from jobs.queue import build_huey, task_named
from sync_server.changelog import publish
from sync_server.db import run_in_transaction
from sync_server.directory import utcnow
from sync_server.settings import Settings
from sync_server.tables import sync_rows, sync_scopes
from tests.conftest import TEST_SECRET, make_settings


@dataclass(frozen=True)
class Tombstones:
    expired: str  # deleted 40 days ago: past the 30-day retention
    recent: str  # deleted yesterday: devices may still need it
    alive: str  # never deleted
    expired_version: int


def _write_history(engine: Engine) -> Tombstones:
    now = utcnow()
    long_ago, yesterday = now - timedelta(days=40), now - timedelta(days=1)
    expired, recent, alive = (str(uuid.uuid4()) for _ in range(3))

    def work(conn: Connection) -> int:
        publish(conn, long_ago, "menu_items", expired, ORG_SCOPE, {"name": "Old special"})
        expired_version = publish(conn, long_ago, "menu_items", expired, ORG_SCOPE, None)
        publish(conn, long_ago, "menu_items", alive, ORG_SCOPE, {"name": "Espresso"})
        publish(conn, yesterday, "menu_items", recent, ORG_SCOPE, {"name": "Pumpkin latte"})
        publish(conn, yesterday, "menu_items", recent, ORG_SCOPE, None)
        return expired_version

    return Tombstones(expired, recent, alive, run_in_transaction(engine, work))


def _rows(engine: Engine) -> dict[str, bool]:
    """row id -> deleted, for what the replication log still holds."""
    with engine.connect() as conn:
        found = {r.row_id: bool(r.deleted) for r in conn.execute(select(sync_rows))}
        conn.rollback()
    return found


def _horizon(engine: Engine) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            select(sync_scopes.c.horizon).where(sync_scopes.c.scope == ORG_SCOPE)
        ).scalar_one()
        conn.rollback()
    return int(value)


def _assert_compacted(engine: Engine, history: Tombstones) -> None:
    assert _rows(engine) == {history.recent: True, history.alive: False}
    assert _horizon(engine) == history.expired_version


def _settings(db: Engine, tmp_path: Path, redis_url: str | None = None) -> Settings:
    return make_settings(
        db.url.render_as_string(hide_password=False),
        redis_url=redis_url,
        huey_sqlite_path=str(tmp_path / "huey.db"),
    )


# --- the queue built from settings ---------------------------------------------------------------


def test_without_redis_the_queue_is_a_sqlite_file_and_runs_the_compaction(
    db: Engine, tmp_path: Path
) -> None:
    history = _write_history(db)
    huey = build_huey(_settings(db, tmp_path))
    assert isinstance(huey, SqliteHuey)

    result = task_named(huey, "compact_tombstones")()
    assert huey.pending_count() == 1
    assert (tmp_path / "huey.db").is_file(), "the queue is persisted in the configured file"
    assert _rows(db)[history.expired] is True, "enqueuing ran nothing"

    huey.execute(huey.dequeue())

    assert result.get() == 1
    _assert_compacted(db, history)


@pytest.mark.integration
def test_with_redis_the_queue_is_redis_and_runs_the_compaction(
    db: Engine, tmp_path: Path, redis_client: Any, redis_url: str
) -> None:
    history = _write_history(db)
    huey = build_huey(_settings(db, tmp_path, redis_url))
    assert isinstance(huey, RedisHuey)

    result = task_named(huey, "compact_tombstones")()
    assert huey.pending_count() == 1
    assert any(b"galley" in key for key in redis_client.scan_iter()), "queued in the test Redis"
    assert not (tmp_path / "huey.db").exists(), "no SQLite queue when Redis is configured"

    huey.execute(huey.dequeue())

    assert result.get() == 1
    _assert_compacted(db, history)


def test_compaction_purges_only_expired_tombstones_moves_the_horizon_and_is_idempotent(
    db: Engine, tmp_path: Path
) -> None:
    history = _write_history(db)
    huey = build_huey(_settings(db, tmp_path), immediate=True)
    compact = task_named(huey, "compact_tombstones")

    assert compact().get() == 1
    _assert_compacted(db, history)
    assert compact().get() == 0, "running it twice changes nothing"
    _assert_compacted(db, history)


def test_compaction_is_scheduled_daily_at_0317_utc() -> None:
    huey = build_huey(make_settings("sqlite://"), immediate=True)
    due = [task.name for task in huey.read_periodic(datetime(2026, 3, 1, 3, 17))]
    assert due == ["compact_tombstones_daily"]
    assert huey.read_periodic(datetime(2026, 3, 1, 3, 18)) == []
    assert huey.read_periodic(datetime(2026, 3, 1, 4, 17)) == []


def test_expired_sessions_are_purged_hourly_through_the_queue(db: Engine, tmp_path: Path) -> None:
    huey = build_huey(_settings(db, tmp_path), immediate=True)
    purge = task_named(huey, "purge_expired_sessions")

    # What it deletes is specified in tests/api/test_housekeeping.py; here: the queue runs it.
    assert purge().get() == {"refresh_tokens": 0, "biometric_challenges": 0, "idempotency_keys": 0}
    due = [task.name for task in huey.read_periodic(datetime(2026, 3, 1, 14, 41))]
    assert due == ["purge_expired_sessions_hourly"]
    assert huey.read_periodic(datetime(2026, 3, 1, 14, 42)) == []


# --- galley worker ------------------------------------------------------------------------------


def _galley() -> list[str]:
    script = Path(sys.executable).parent / "galley"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sync_server.cli"]


@dataclass(frozen=True)
class Stack:
    engine: Engine
    queue_url: str | None  # Redis URL, or None for the SQLite queue


@pytest.fixture(
    params=[
        "embedded: SQLite + SQLite queue",
        pytest.param("production: MariaDB + Redis queue", marks=pytest.mark.integration),
    ]
)
def stack(request: pytest.FixtureRequest) -> Stack:
    if request.param.startswith("embedded"):
        from tests.conftest import clean_database

        engine: Engine = request.getfixturevalue("sqlite_engine")
        clean_database(engine)
        return Stack(engine, None)
    request.getfixturevalue("redis_client")  # skips/fails when not configured; flushed
    return Stack(request.getfixturevalue("mysql_engine"), request.getfixturevalue("redis_url"))


@pytest.fixture
def worker(stack: Stack, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``galley worker`` in its own process, configured through the environment only."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "GALLEY_ENV": "test",
        "GALLEY_SECRET_KEY": TEST_SECRET,
        "DATABASE_URL": stack.engine.url.render_as_string(hide_password=False),
        "GALLEY_HUEY_SQLITE": str(tmp_path / "huey.db"),
    }
    if stack.queue_url:
        env["REDIS_URL"] = stack.queue_url
    proc = subprocess.Popen(
        [*_galley(), "worker", "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_galley_worker_starts_and_executes_enqueued_tasks(
    worker: subprocess.Popen[str], stack: Stack, tmp_path: Path
) -> None:
    history = _write_history(stack.engine)
    huey = build_huey(_settings(stack.engine, tmp_path, stack.queue_url))

    result = task_named(huey, "compact_tombstones")()

    assert result.get(blocking=True, timeout=30) == 1, "the worker ran the task"
    _assert_compacted(stack.engine, history)
    assert worker.poll() is None, "the worker keeps running"

    worker.send_signal(signal.SIGINT)  # graceful stop
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    assert "Traceback" not in output, output
    assert ("Redis" if stack.queue_url else "SQLite") in output
