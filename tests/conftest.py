"""Shared fixtures: real databases (SQLite always, MariaDB when configured), Redis, the app.

Tiers:
* unit (tests/unit): no I/O.
* integration (tests/integration): a migrated database. Tests taking ``db`` run on SQLite and,
  when ``TEST_MYSQL_URL`` is set, on MariaDB too; ``mysql_engine``/``redis_client`` need the real
  services. Without them those tests are reported as skipped ("not configured") — unless
  ``GALLEY_REQUIRE_SERVICES=1`` (CI), where a missing service is a failure.
* e2e (tests/e2e): over HTTP through the ASGI app.

Each xdist worker gets its own MariaDB database (``<name>_gwN``), migrated once, and its own Redis
database (configured + N): take URLs from the ``mysql_url``/``redis_url`` fixtures, never from
``TEST_MYSQL_URL``/``TEST_REDIS_URL`` directly. Each test starts from empty tables (the sync
engine commits its own transactions, so rolling back a wrapper transaction would not isolate it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, text
from sqlalchemy.engine import Engine, make_url

from sync_server import account_tables, migrate  # noqa: F401  (account_tables joins metadata)
from sync_server.db import create_db_engine
from sync_server.resources import Resources, build_resources
from sync_server.settings import Settings
from sync_server.tables import metadata
from tests.factories import Factory

REQUIRE_SERVICES = os.environ.get("GALLEY_REQUIRE_SERVICES") == "1"
TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL")
TEST_SECRET = "test-secret-key-that-is-long-enough-for-production-checks"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front whether the integration tier runs against real services."""

    def where(url: str | None) -> str:
        return make_url(url).render_as_string() if url and "://" in url else "not configured"

    redis = TEST_REDIS_URL or "not configured"
    lines = [f"integration tier: MariaDB {where(TEST_MYSQL_URL)}, Redis {redis}"]
    if not (TEST_MYSQL_URL and TEST_REDIS_URL):
        lines.append("  (set TEST_MYSQL_URL and TEST_REDIS_URL to run it; those tests are skipped)")
    if REQUIRE_SERVICES:
        lines.append("  GALLEY_REQUIRE_SERVICES=1: a missing service fails the run")
    return lines


def _not_configured(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (GALLEY_REQUIRE_SERVICES=1) but not configured")
    pytest.skip(f"integration tier not configured: set {what}")


def make_settings(database_url: str, redis_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "database_url": database_url,
        "redis_url": redis_url,
        "secret_key": TEST_SECRET,
        "huey_sqlite_path": str(Path(tempfile.gettempdir()) / "galley-test-huey.db"),
        # Simulated devices sync at machine speed, far beyond a person's pace (the stateful
        # convergence test sends thousands of requests a minute for one user): the sync rate
        # limit is off unless a test installs one (tests/api/test_rate_limits.py).
        "sync_rate_limit": None,
    }
    values.update(overrides)
    return Settings(**values)


#: Reference data seeded by the migrations (the RBAC catalogue): kept between tests.
SEEDED_TABLES = {"permissions", "role_permissions"}


def clean_database(engine: Engine) -> None:
    """Empty every application table (children first), keeping the schema and alembic_version."""
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name in SEEDED_TABLES:
                continue
            conn.execute(delete(table))


@pytest.fixture(scope="session")
def worker_id_suffix(request: pytest.FixtureRequest) -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("sqlite") / "galley-test.db"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def _mysql_url_for_worker(worker: str) -> str:
    assert TEST_MYSQL_URL is not None
    url = make_url(TEST_MYSQL_URL)
    return url.set(database=f"{url.database}_{worker}").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def mysql_url(worker_id_suffix: str) -> Iterator[str]:
    if not TEST_MYSQL_URL:
        _not_configured("TEST_MYSQL_URL")
    url = _mysql_url_for_worker(worker_id_suffix)
    name = make_url(url).database
    # Connect without selecting a database: the configured one need not exist yet.
    admin = create_db_engine(
        make_url(TEST_MYSQL_URL)._replace(database=None).render_as_string(hide_password=False)  # type: ignore[arg-type]
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    except Exception as exc:
        pytest.fail(f"MariaDB at TEST_MYSQL_URL is unreachable: {exc}")
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


@pytest.fixture(scope="session")
def mysql_engine_session(mysql_url: str) -> Iterator[Engine]:
    engine = create_db_engine(mysql_url, pool_size=20)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def mysql_engine(mysql_engine_session: Engine) -> Engine:
    clean_database(mysql_engine_session)
    return mysql_engine_session


@pytest.fixture(
    params=["sqlite", pytest.param("mysql", marks=pytest.mark.integration)],
)
def db(request: pytest.FixtureRequest) -> Engine:
    """A migrated, empty database: SQLite, then MariaDB when configured."""
    if request.param == "sqlite":
        engine: Engine = request.getfixturevalue("sqlite_engine")
    else:
        engine = request.getfixturevalue("mysql_engine_session")
    clean_database(engine)
    return engine


def _redis_url_for_worker(worker: str) -> str:
    """xdist worker gwN gets Redis database (configured + N), so that one worker's FLUSHDB never
    empties another's queue. (Pub/sub channels are server-wide: tests name theirs uniquely.)"""
    from urllib.parse import urlsplit, urlunsplit

    assert TEST_REDIS_URL is not None
    parts = urlsplit(TEST_REDIS_URL)
    base = int(parts.path.strip("/") or 0)
    number = base + int(worker.removeprefix("gw") or 0)
    if number > 15:
        pytest.fail(f"TEST_REDIS_URL database {base} + xdist worker {worker} exceeds 15")
    return urlunsplit(parts._replace(path=f"/{number}"))


@pytest.fixture(scope="session")
def redis_url(worker_id_suffix: str) -> str:
    """This worker's Redis URL (see :func:`_redis_url_for_worker`)."""
    if not TEST_REDIS_URL:
        _not_configured("TEST_REDIS_URL")
    return _redis_url_for_worker(worker_id_suffix)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client on this worker's Redis database, flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at TEST_REDIS_URL is unreachable: {exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def resources(db: Engine) -> Iterator[Resources]:
    settings = make_settings(db.url.render_as_string(hide_password=False))
    res = build_resources(settings, engine=db)
    yield res
    res.release()  # not close(): the engine is the session's


@pytest.fixture
def factory(resources: Resources) -> Factory:
    return Factory(resources)


@pytest.fixture
def client(resources: Resources) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from sync_server.app import create_app

    with TestClient(create_app(resources=resources)) as test_client:
        yield test_client


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing() -> Iterator[None]:
    """argon2id at its minimum cost inside the test process.

    The production parameters spend ~100 ms of CPU per hash on purpose; the suite creates
    hundreds of users and signs many of them in, which roughly doubled its run time. The
    algorithm and the hash format are unchanged (real ``$argon2id$`` hashes that
    ``verify_password`` checks); only ``sync_server.passwords`` in this process is affected
    (servers started as subprocesses hash with the real parameters).
    """
    from argon2 import PasswordHasher

    from sync_server import passwords

    original = passwords._hasher
    passwords._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    passwords._hasher = original
