"""The persistence policy of ``sync_server.db`` on the real databases.

Deadlocks and lock-wait timeouts are provoked on MariaDB for real (two threads, two rows, opposite
lock order); SQLite writers are hammered from threads. What is promised:

* a unit of work that loses a deadlock is run again and succeeds;
* a lock that is never released ends in the original error after the bounded attempts;
* SQLite writers queue (``BEGIN IMMEDIATE``) instead of failing with "database is locked";
* MySQL sessions run READ COMMITTED, snapshot reads REPEATABLE READ (that transaction only),
  text is utf8mb4.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from sync_server.db import create_db_engine, read_transaction, run_in_transaction, transact
from sync_server.directory import create_branch
from sync_server.tables import branches, sync_scopes


def _mysql_code(exc: BaseException) -> int:
    assert isinstance(exc, DBAPIError)
    return int(exc.orig.args[0])  # type: ignore[union-attr]


def _add_counters(engine: Engine, *names: str) -> None:
    with engine.begin() as conn:
        for name in names:
            conn.execute(
                insert(sync_scopes).values(
                    scope=name, version=0, horizon=0, row_count=0, checksum=0
                )
            )


def _counter(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            select(sync_scopes.c.version).where(sync_scopes.c.scope == name)
        ).scalar_one()
        conn.rollback()
    return int(value)


def _lock(conn: Connection, name: str) -> int:
    return int(
        conn.execute(
            select(sync_scopes.c.version).where(sync_scopes.c.scope == name).with_for_update()
        ).scalar_one()
    )


def _bump(conn: Connection, name: str) -> None:
    conn.execute(
        update(sync_scopes)
        .where(sync_scopes.c.scope == name)
        .values(version=sync_scopes.c.version + 1)
    )


@pytest.fixture
def short_lock_wait_engine(mysql_engine: Engine) -> Iterator[Engine]:
    """An engine of its own whose sessions give up on a row lock after one second."""
    engine = create_db_engine(mysql_engine.url.render_as_string(hide_password=False), pool_size=2)
    yield engine
    engine.dispose()


# --- MariaDB: deadlocks and lock waits ----------------------------------------------------------


def test_a_unit_of_work_that_loses_a_real_deadlock_is_retried_and_both_commit(
    mysql_engine: Engine,
) -> None:
    _add_counters(mysql_engine, "row:a", "row:b")
    both_hold_their_first_lock = threading.Barrier(2, timeout=10)
    errors: list[int] = []
    attempts = {"a-then-b": 0, "b-then-a": 0}

    def transfer(name: str, first: str, second: str) -> Callable[[Connection], str]:
        def work(conn: Connection) -> str:
            attempts[name] += 1
            _lock(conn, first)
            if attempts[name] == 1:
                # Only the first attempts meet here, so the two transactions wait for each
                # other's row: InnoDB picks one as the deadlock victim and rolls it back.
                both_hold_their_first_lock.wait()
            try:
                _lock(conn, second)
            except DBAPIError as exc:
                errors.append(_mysql_code(exc))
                raise
            _bump(conn, first)
            _bump(conn, second)
            return name

        return work

    with ThreadPoolExecutor(max_workers=2) as pool:
        one = pool.submit(run_in_transaction, mysql_engine, transfer("a-then-b", "row:a", "row:b"))
        two = pool.submit(run_in_transaction, mysql_engine, transfer("b-then-a", "row:b", "row:a"))
        results = {one.result(timeout=60), two.result(timeout=60)}

    assert results == {"a-then-b", "b-then-a"}
    assert errors == [1213], "exactly one transaction was chosen as the deadlock victim"
    assert sorted(attempts.values()) == [1, 2], "the victim ran again, the winner ran once"
    # Both units of work are applied exactly once: nothing lost, nothing doubled.
    assert _counter(mysql_engine, "row:a") == 2
    assert _counter(mysql_engine, "row:b") == 2


def test_a_lock_that_is_never_released_fails_after_the_bounded_attempts_with_1205(
    mysql_engine: Engine, short_lock_wait_engine: Engine
) -> None:
    _add_counters(mysql_engine, "row:held")
    attempts = 0

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        _lock(conn, "row:held")
        _bump(conn, "row:held")

    with mysql_engine.connect() as holder, holder.begin():
        _lock(holder, "row:held")
        started = time.monotonic()
        with pytest.raises(OperationalError) as failure:
            run_in_transaction(short_lock_wait_engine, work, attempts=3, base_delay=0.01)
        elapsed = time.monotonic() - started

    assert _mysql_code(failure.value) == 1205
    assert attempts == 3
    assert elapsed >= 3, "each attempt waited for the lock"
    assert _counter(mysql_engine, "row:held") == 0, "nothing was applied"


def test_a_lock_released_while_retrying_lets_the_unit_of_work_commit(
    mysql_engine: Engine, short_lock_wait_engine: Engine
) -> None:
    _add_counters(mysql_engine, "row:busy")
    attempts = 0
    released = threading.Event()

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        _lock(conn, "row:busy")
        _bump(conn, "row:busy")

    def hold_then_release(ready: threading.Event) -> None:
        with mysql_engine.connect() as holder, holder.begin():
            _lock(holder, "row:busy")
            ready.set()
            time.sleep(1.5)
        released.set()

    ready = threading.Event()
    holder = threading.Thread(target=hold_then_release, args=(ready,))
    holder.start()
    assert ready.wait(10)
    try:
        run_in_transaction(short_lock_wait_engine, work, attempts=5, base_delay=0.01)
    finally:
        holder.join()

    assert released.is_set()
    assert attempts >= 2, "the first attempt timed out on the held lock"
    assert _counter(mysql_engine, "row:busy") == 1


def test_errors_that_are_not_deadlocks_are_raised_at_once(db: Engine) -> None:
    _add_counters(db, "row:dup")
    attempts = 0

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.execute(
            insert(sync_scopes).values(
                scope="row:dup", version=0, horizon=0, row_count=0, checksum=0
            )
        )

    with pytest.raises(IntegrityError):
        run_in_transaction(db, work)
    assert attempts == 1


def test_a_failed_unit_of_work_leaves_nothing_behind(db: Engine) -> None:
    def work(conn: Connection) -> None:
        create_branch(conn, "HALF", "Half applied")
        raise RuntimeError("boom after the insert")

    with pytest.raises(RuntimeError):
        run_in_transaction(db, work)
    with db.connect() as conn:
        assert conn.execute(select(branches.c.id).where(branches.c.code == "HALF")).first() is None
        conn.rollback()


def test_transact_continues_the_reads_open_on_a_held_connection_and_commits(db: Engine) -> None:
    # A push request authenticates and applies its change-sets on one connection: the reads
    # of authentication are part of the first transaction, each change-set commits on its own.
    _add_counters(db, "held")
    with db.connect() as conn:
        assert _counter_on(conn, "held") == 0  # a read: a transaction is now open
        transact(conn, lambda c: _bump(c, "held"))
        transact(conn, lambda c: _bump(c, "held"))
        assert not conn.in_transaction()
    assert _counter(db, "held") == 2


def test_a_failed_unit_of_work_on_a_held_connection_leaves_it_usable(db: Engine) -> None:
    _add_counters(db, "usable")
    with db.connect() as conn:

        def half(c: Connection) -> None:
            _bump(c, "usable")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            transact(conn, half)
        assert not conn.in_transaction()
        transact(conn, lambda c: _bump(c, "usable"))
    assert _counter(db, "usable") == 1


def test_a_connection_returned_with_its_transaction_open_leaks_nothing_into_the_pool(
    db: Engine,
) -> None:
    # The pool does not reset connections itself (pool_reset_on_return=None, to save a
    # ROLLBACK per request): closing the Connection must roll its open transaction back.
    _add_counters(db, "leak")
    conn = db.connect()
    _bump(conn, "leak")
    conn.close()
    assert _counter(db, "leak") == 0
    for _ in range(3):  # whichever pooled connection comes next holds no lock nor change
        with db.connect() as other:
            transact(other, lambda c: _bump(c, "leak"))
    assert _counter(db, "leak") == 3


def _counter_on(conn: Connection, name: str) -> int:
    return int(
        conn.execute(select(sync_scopes.c.version).where(sync_scopes.c.scope == name)).scalar_one()
    )


# --- MariaDB: isolation and character set -------------------------------------------------------


def test_mysql_connections_run_read_committed_and_snapshots_repeatable_read(
    mysql_engine: Engine,
) -> None:
    with mysql_engine.connect() as conn:
        assert conn.get_isolation_level() == "READ COMMITTED"
        conn.rollback()
    run_in_transaction(
        mysql_engine,
        lambda conn: (
            pytest.fail("wrong isolation")
            if conn.get_isolation_level() != "READ COMMITTED"
            else None
        ),
    )
    # A read transaction is a snapshot: a change committed meanwhile is not seen in it...
    _add_counters(mysql_engine, "snap")
    with read_transaction(mysql_engine) as conn:
        assert _counter_on(conn, "snap") == 0
        run_in_transaction(mysql_engine, lambda c: _bump(c, "snap"))
        assert _counter_on(conn, "snap") == 0
        # ...and its level was set for that transaction alone: the next one on the same
        # connection reads committed data again.
        conn.rollback()
        assert conn.get_isolation_level() == "READ COMMITTED"
        assert _counter_on(conn, "snap") == 1
        run_in_transaction(mysql_engine, lambda c: _bump(c, "snap"))
        assert _counter_on(conn, "snap") == 2


def test_mysql_connections_speak_utf8mb4(mysql_engine: Engine) -> None:
    with mysql_engine.connect() as conn:
        charset = conn.exec_driver_sql("SELECT @@character_set_connection").scalar()
        table_charset = conn.exec_driver_sql(
            "SELECT CCSA.character_set_name FROM information_schema.TABLES T "
            "JOIN information_schema.COLLATION_CHARACTER_SET_APPLICABILITY CCSA "
            "ON CCSA.collation_name = T.table_collation "
            "WHERE T.table_schema = DATABASE() AND T.table_name = 'branches'"
        ).scalar()
        conn.rollback()
    assert charset == "utf8mb4"
    assert table_charset == "utf8mb4"


def test_names_with_emoji_and_accents_round_trip(db: Engine) -> None:
    name = "Café Ünter den Linden 🍕🥐 — 東京"
    branch = run_in_transaction(db, lambda conn: create_branch(conn, "EMOJI", name))
    with db.connect() as conn:
        stored = conn.execute(select(branches.c.name).where(branches.c.id == branch.id)).scalar()
        conn.rollback()
    assert stored == name


# --- SQLite: concurrent writers -----------------------------------------------------------------


def test_sqlite_writers_from_many_threads_queue_instead_of_failing(sqlite_engine: Engine) -> None:
    from tests.conftest import clean_database

    clean_database(sqlite_engine)
    _add_counters(sqlite_engine, "row:shared")
    threads, per_thread = 8, 15
    runs = 0
    runs_lock = threading.Lock()

    def increment(conn: Connection) -> None:
        nonlocal runs
        with runs_lock:
            runs += 1
        # Read, pause, write: with a deferred BEGIN two threads would both read the same value
        # and the later writer would fail with SQLITE_BUSY ("database is locked").
        current = _lock(conn, "row:shared")
        time.sleep(0.001)
        conn.execute(
            update(sync_scopes)
            .where(sync_scopes.c.scope == "row:shared")
            .values(version=current + 1)
        )

    def writer() -> None:
        for _ in range(per_thread):
            # attempts=1: a single "database is locked" would fail the test.
            run_in_transaction(sqlite_engine, increment, attempts=1)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(writer) for _ in range(threads)]:
            future.result(timeout=120)

    assert _counter(sqlite_engine, "row:shared") == threads * per_thread, "no lost update"
    assert runs == threads * per_thread, "no transaction had to be retried"


def test_sqlite_connections_use_wal_and_enforce_foreign_keys(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        conn.rollback()


@pytest.mark.integration
def test_a_connection_dropped_without_closing_comes_back_to_the_pool_rolled_back(
    mysql_engine: Engine, mysql_url: str
) -> None:
    # The pool sends no ROLLBACK after a committed transaction (a round trip saved per
    # request), but one still open — a Connection garbage-collected without being closed —
    # is rolled back before the next user gets it: no stale snapshot, no leaked lock.
    import gc

    engine = create_db_engine(mysql_url, pool_size=1)  # migrated by mysql_engine
    try:
        _add_counters(engine, "dropped")
        conn = engine.connect()
        _bump(conn, "dropped")  # uncommitted, holding the counter's row lock
        del conn
        gc.collect()
        for committed in range(3):  # whichever pooled connection comes next
            with read_transaction(engine) as snap:  # would fail: transaction in progress
                assert _counter_on(snap, "dropped") == committed
            run_in_transaction(engine, lambda c: _bump(c, "dropped"))  # no lock left behind
        assert _counter(engine, "dropped") == 3
    finally:
        run_in_transaction(
            engine,
            lambda c: c.execute(sync_scopes.delete().where(sync_scopes.c.scope == "dropped")),
        )
        engine.dispose()


@pytest.mark.integration
def test_writes_are_refused_on_a_snapshot_until_it_ends(mysql_engine: Engine) -> None:
    _add_counters(mysql_engine, "snapshot-write")
    with read_transaction(mysql_engine) as conn:
        _counter_on(conn, "snapshot-write")
        with pytest.raises(RuntimeError, match="snapshot"):
            transact(conn, lambda c: _bump(c, "snapshot-write"))
        conn.rollback()  # the snapshot ends: writes may follow, at READ COMMITTED
        transact(conn, lambda c: _bump(c, "snapshot-write"))
    assert _counter(mysql_engine, "snapshot-write") == 1


def test_a_held_connection_reads_without_the_write_lock_after_a_transaction(
    sqlite_engine: Engine,
) -> None:
    # SQLite writers begin IMMEDIATE (the write lock up front); a read made afterwards on the
    # same held connection must not keep holding it, or every other writer would wait on it.
    from sqlalchemy import delete

    _add_counters(sqlite_engine, "held-read")
    try:
        with sqlite_engine.connect() as conn:
            transact(conn, lambda c: _bump(c, "held-read"))
            assert _counter_on(conn, "held-read") == 1  # a deferred read transaction
            run_in_transaction(sqlite_engine, lambda c: _bump(c, "held-read"), attempts=1)
            conn.rollback()
        assert _counter(sqlite_engine, "held-read") == 2
    finally:
        with sqlite_engine.begin() as conn:
            conn.execute(delete(sync_scopes).where(sync_scopes.c.scope == "held-read"))


@pytest.mark.integration
def test_a_connection_lost_mid_transaction_raises_the_real_error_and_the_pool_recovers(
    mysql_engine: Engine,
) -> None:
    # The bookkeeping of open transactions must not turn a lost connection into a confusing
    # "Can't reconnect until invalid transaction is rolled back".
    _add_counters(mysql_engine, "lost")

    def killed_midway(conn: Connection) -> None:
        _bump(conn, "lost")
        victim = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        with mysql_engine.connect() as other:
            other.exec_driver_sql(f"KILL {int(victim)}")
        _bump(conn, "lost")

    with pytest.raises(DBAPIError) as lost:
        run_in_transaction(mysql_engine, killed_midway)
    assert _mysql_code(lost.value) in (2006, 2013)  # server gone / lost connection
    with read_transaction(mysql_engine) as conn:
        assert _counter_on(conn, "lost") == 0
    run_in_transaction(mysql_engine, lambda c: _bump(c, "lost"))
    assert _counter(mysql_engine, "lost") == 1
