"""Engines and transactions.

Two databases are supported and they behave differently under concurrency, so the differences are
handled here once:

* **MySQL 8 / MariaDB** (production). InnoDB, utf8mb4, ``READ COMMITTED`` for writers: the sync
  engine serialises what must be serialised with explicit locking reads (``SELECT … FOR UPDATE`` on
  the per-scope version counter and the device row), and READ COMMITTED keeps InnoDB from taking gap
  locks that would otherwise turn unrelated inserts into deadlocks. Deadlocks (1213) and lock-wait
  timeouts (1205) can still happen. After a deadlock InnoDB has rolled the whole transaction back;
  after a lock-wait timeout only the statement (``innodb_rollback_on_timeout`` is off by default),
  so we roll the rest back ourselves. Either way the whole unit of work is then run again from the
  start (bounded, with jittered backoff).
* **SQLite** (the embedded default). One writer at a time. Writers start with ``BEGIN IMMEDIATE``
  so that the write lock is taken up front: a deferred transaction that reads and later tries to
  write can fail with SQLITE_BUSY without waiting, which the busy timeout cannot fix.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from .bulk import allow_statement_batches

log = logging.getLogger("galley.db")

T = TypeVar("T")

#: MySQL error codes after which the transaction has been rolled back and may be retried whole.
RETRYABLE_MYSQL_ERRORS = {1213, 1205}


def create_db_engine(
    database_url: str, *, echo: bool = False, pool_size: int = 10, max_overflow: int | None = None
) -> Engine:
    """Build the engine for ``database_url`` with Galley's connection policy."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 30},
            # The driver's own transaction handling is switched off (isolation_level=None below)
            # so that BEGIN can be issued by us, IMMEDIATE.
            poolclass=NullPool if url.database in (None, "", ":memory:") else None,
        )
        _configure_sqlite(engine)
        return engine
    if url.get_backend_name() in ("mysql", "mariadb"):
        query = dict(url.query)
        query.setdefault("charset", "utf8mb4")
        url = url.set(query=query)
        engine = create_engine(
            url,
            echo=echo,
            pool_size=pool_size,
            max_overflow=pool_size if max_overflow is None else max_overflow,
            pool_pre_ping=True,
            pool_recycle=3600,
            # The pool's own reset would send a ROLLBACK whenever a connection comes back,
            # even after a COMMIT (one round trip per request, for nothing): it is replaced by
            # _roll_back_open_transactions, which rolls back only what is still open.
            pool_reset_on_return=None,
            isolation_level="READ COMMITTED",
        )
        _roll_back_open_transactions(engine)
        allow_statement_batches(engine)
        return engine
    raise ValueError(f"unsupported database: {url.get_backend_name()}")


def _roll_back_open_transactions(engine: Engine) -> None:
    """Roll back, when a connection returns to the pool, a transaction that is still open.

    Every transaction begun through a :class:`Connection` is tracked on its pooled connection
    (begin, commit and rollback events, and errors; no round trip). A Connection closed
    normally has ended its transaction itself; one dropped without being closed
    (garbage-collected), or whose COMMIT or ROLLBACK failed, comes back with the transaction
    still marked open, and is rolled back here before anyone else can use it (an open
    snapshot or lock leaking into the next request would be served stale data, or fail its
    ``SET TRANSACTION``).
    """

    def mark(conn: Connection, is_open: bool) -> None:
        if conn.invalidated or conn.closed:
            return  # its DBAPI connection is gone; a reconnect starts with a clean .info
        # .info lives with the DBAPI connection: the pool's reset event sees the same dict.
        info = conn.connection.info
        info["open_transaction"] = is_open
        if not is_open:
            info.pop(_SNAPSHOT, None)  # a snapshot ends with its transaction

    def reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        if record is not None and record.info.get("open_transaction"):
            record.info["open_transaction"] = False
            record.info.pop(_SNAPSHOT, None)
            dbapi_connection.rollback()

    def failed(context: Any) -> None:
        # The commit and rollback events fire before the statement: if it then fails (other
        # than by a lost connection, which the pool discards), the transaction may still be
        # open on the server. Mark it so, for the reset to roll back.
        conn = context.connection
        if conn is not None and not context.is_disconnect:
            mark(conn, True)

    event.listen(engine, "begin", lambda conn: mark(conn, True))
    event.listen(engine, "commit", lambda conn: mark(conn, False))
    event.listen(engine, "rollback", lambda conn: mark(conn, False))
    event.listen(engine, "handle_error", failed)
    event.listen(engine.pool, "reset", reset)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _mysql_error_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", None)
    args = getattr(orig, "args", None)
    if args and isinstance(args[0], int):
        return args[0]
    return None


def is_retryable(exc: BaseException) -> bool:
    """True when the failed transaction was rolled back by the database and may be run again."""
    if not isinstance(exc, DBAPIError):
        return False
    code = _mysql_error_code(exc)
    if code in RETRYABLE_MYSQL_ERRORS:
        return True
    # SQLite: another writer held the lock for longer than busy_timeout.
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


@contextmanager
def read_transaction(engine: Engine, *, snapshot: bool = True) -> Iterator[Connection]:
    """A read-only transaction. With ``snapshot`` every statement sees the same committed state
    (REPEATABLE READ on InnoDB; a deferred transaction on SQLite, whose reads are snapshots).

    On InnoDB the level is set for this one transaction (``SET TRANSACTION``, one round trip;
    the next transaction is back at the session's READ COMMITTED by itself) rather than for the
    session and back again (four). The transaction is rolled back at the end: nothing to keep.
    """
    with engine.connect() as conn:
        if snapshot and engine.dialect.name != "sqlite":
            # Allowed only between transactions: a pooled connection has none open.
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.info[_SNAPSHOT] = True  # until the transaction ends (see _roll_back_open…)
        try:
            yield conn
        finally:
            if not (conn.invalidated or conn.closed):
                conn.info.pop(_SNAPSHOT, None)


def run_in_transaction(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.02,
) -> T:
    """Run ``work`` in one write transaction on a connection of its own, committing on success
    (see :func:`transact`)."""
    with engine.connect() as conn:
        return transact(conn, work, attempts=attempts, base_delay=base_delay)


def transact(
    conn: Connection,
    work: Callable[[Connection], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.02,
) -> T:
    """Run ``work`` in one write transaction on ``conn``, committing on success.

    ``work`` must be safe to run again from the start: on a deadlock or lock-wait timeout the
    transaction is rolled back and the whole unit of work is retried a bounded number of times
    before the original error is raised. Nothing outside the database (a publish, an enqueue)
    belongs in ``work``: it could run twice.

    A transaction already open on ``conn`` (reads the caller made just before, such as the
    request's authentication) becomes part of this one rather than costing a round trip to end
    it; on SQLite it is ended first, so that this one starts with ``BEGIN IMMEDIATE``. Callers
    holding one connection for several transactions (a push request) pay one pool checkout.
    """
    if conn.in_transaction() and not conn.invalidated and conn.info.get(_SNAPSHOT):
        # Writes planned on a REPEATABLE READ snapshot would judge rows as they were when it
        # began: end the snapshot first (pull does).
        raise RuntimeError("transact() on a connection still in a read_transaction snapshot")
    sqlite = conn.dialect.name == "sqlite"
    try:
        for attempt in range(1, attempts + 1):
            try:
                if sqlite and conn.in_transaction() and not _immediate(conn):
                    conn.rollback()
                if not conn.in_transaction():
                    if sqlite:
                        conn.execution_options(sqlite_begin="IMMEDIATE")
                    conn.begin()
                result = work(conn)
                conn.commit()
                return result
            except DBAPIError as exc:
                conn.rollback()
                if attempt == attempts or not is_retryable(exc):
                    raise
                delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
                log.info("retrying transaction after %s (attempt %d)", exc.orig, attempt)
                time.sleep(delay)
            except BaseException:
                conn.rollback()
                raise
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        if sqlite:
            # Later reads on this connection begin deferred again, not holding the write lock.
            conn.execution_options(sqlite_begin="DEFERRED")


#: Marks a connection whose open transaction is a read_transaction snapshot.
_SNAPSHOT = "galley_snapshot"


def _immediate(conn: Connection) -> bool:
    return bool(conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE")


def ping(engine: Engine) -> None:
    """Raise when the database cannot answer a trivial query."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
