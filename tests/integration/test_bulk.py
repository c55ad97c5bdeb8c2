"""Held writes (``bulk.held``): the last writes of a transaction sent in one round trip.

What is promised, on MariaDB for real:

* the writes reach the database in the order they were made, as one command, and store exactly
  what they would have stored one by one (values with quotes, ``%``, ``;``; the push tests
  cover bytes and datetimes, which every push writes);
* an error in any statement of the batch, not only the first, is raised as SQLAlchemy's own
  error (an ``IntegrityError`` for a duplicate key), and rolling back leaves nothing behind;
* a connection lost while the batch is sent is reported as lost (invalidated), not as a
  puzzling later error;
* a write that cannot be held (a type SQLAlchemy must convert) sends what is held first, so
  the order stays the caller's;
* on SQLite the block changes nothing: each write goes out at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pymysql.connections  # type: ignore[import-untyped]
import pytest
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from sync_server import bulk
from sync_server.tables import sync_scopes

_scratch = MetaData()
#: A table of its own: writes of ``price`` (Numeric, which SQLAlchemy converts) cannot be held,
#: writes of the other columns can.
_priced = Table(
    "test_bulk_priced",
    _scratch,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False),
    Column("price", Numeric(10, 2)),
)


#: Rows of any size (MEDIUMBLOB on MariaDB).
_blobs = Table(
    "test_bulk_blobs",
    _scratch,
    Column("id", Integer, primary_key=True),
    Column("body", LargeBinary(2**24), nullable=False),
)


@contextmanager
def _scratch_tables(engine: Engine) -> Iterator[None]:
    _scratch.drop_all(engine)
    _scratch.create_all(engine)
    yield
    _scratch.drop_all(engine)


@pytest.fixture
def priced(db: Engine) -> Iterator[Table]:
    with _scratch_tables(db):
        yield _priced


@pytest.fixture
def blobs(mysql_engine: Engine) -> Iterator[Table]:
    with _scratch_tables(mysql_engine):
        yield _blobs


@pytest.fixture
def commands() -> Iterator[list[bytes]]:
    """The queries the driver sends (every command it writes to the server)."""
    sent: list[bytes] = []
    original = pymysql.connections.Connection._execute_command

    def counting(conn: object, command: int, sql: str | bytes) -> object:
        sent.append(sql.encode() if isinstance(sql, str) else sql)
        return original(conn, command, sql)

    pymysql.connections.Connection._execute_command = counting
    yield sent
    pymysql.connections.Connection._execute_command = original


_ADD_SCOPE = insert(sync_scopes)
_NASTY = "it's 50% off; DROP TABLE sync_scopes; -- \\'\""


def _scope(name: str, version: int = 0) -> dict[str, object]:
    return {"scope": name, "version": version, "horizon": 0, "row_count": 0, "checksum": 0}


def _scopes(conn: Connection) -> dict[str, int]:
    return {r.scope: r.version for r in conn.execute(select(sync_scopes))}


@pytest.mark.integration
def test_held_writes_go_in_one_round_trip_in_order_and_store_what_they_say(
    mysql_engine: Engine, commands: list[bytes]
) -> None:
    with mysql_engine.connect() as conn:
        conn.begin()
        commands.clear()
        with bulk.held(conn):
            bulk.write(conn, _ADD_SCOPE, [_scope("a"), _scope(_NASTY, 7)])
            bulk.update_rows(conn, sync_scopes, "scope", [{"scope": "a", "version": 3}])
            bulk.update_rows(conn, sync_scopes, "scope", [{"scope": "a", "version": 4}])
            assert commands == []  # nothing sent yet
        assert len(commands) == 1
        conn.commit()
    with mysql_engine.connect() as conn:
        # The later update of "a" came after the earlier one, and the text arrived verbatim.
        assert _scopes(conn) == {"a": 4, _NASTY: 7}


@pytest.mark.integration
def test_an_error_in_a_later_statement_of_the_batch_is_raised_and_rolls_back_all(
    mysql_engine: Engine,
) -> None:
    with mysql_engine.connect() as conn:
        conn.begin()
        with pytest.raises(IntegrityError), bulk.held(conn):
            bulk.write(conn, _ADD_SCOPE, [_scope("first")])
            bulk.update_rows(conn, sync_scopes, "scope", [{"scope": "first", "version": 9}])
            bulk.write(conn, _ADD_SCOPE, [_scope("first")])  # the same key again
            bulk.write(conn, _ADD_SCOPE, [_scope("after")])
        conn.rollback()
        assert _scopes(conn) == {}
        # The connection is usable after the failed batch.
        with bulk.held(conn):
            bulk.write(conn, _ADD_SCOPE, [_scope("again")])
        conn.commit()
        assert _scopes(conn) == {"again": 0}


@pytest.mark.integration
def test_a_connection_lost_before_the_batch_is_sent_is_reported_lost(
    mysql_engine: Engine,
) -> None:
    with mysql_engine.connect() as conn:
        conn.begin()
        victim = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        with pytest.raises(DBAPIError) as lost, bulk.held(conn):
            bulk.write(conn, _ADD_SCOPE, [_scope("lost")])
            with mysql_engine.connect() as other:
                other.exec_driver_sql(f"KILL {int(victim)}")
        assert lost.value.connection_invalidated
    with mysql_engine.connect() as conn:
        assert _scopes(conn) == {}


def test_a_write_that_cannot_be_held_sends_the_held_ones_first(db: Engine, priced: Table) -> None:
    # The price update names the row the held insert creates: sent before it, it would find
    # nothing to update.
    with db.connect() as conn:
        conn.begin()
        with bulk.held(conn):
            bulk.write(conn, insert(priced), [{"id": 1, "name": "tea"}])
            bulk.update_rows(conn, priced, "id", [{"id": 1, "price": Decimal("2.25")}])
            bulk.write(conn, insert(priced), [{"id": 2, "name": "cake"}])
        conn.commit()
        rows = {r.id: r.price for r in conn.execute(select(priced.c.id, priced.c.price))}
    assert rows == {1: Decimal("2.25"), 2: None}


def test_writes_in_a_held_block_store_the_same_on_every_database(db: Engine) -> None:
    with db.connect() as conn:
        conn.begin()
        with bulk.held(conn):
            bulk.write(conn, _ADD_SCOPE, [_scope("x"), _scope(_NASTY)])
            bulk.update_rows(conn, sync_scopes, "scope", [{"scope": "x", "version": 2}])
        conn.commit()
        assert _scopes(conn) == {"x": 2, _NASTY: 0}


@pytest.mark.integration
def test_a_held_insert_of_many_large_rows_goes_in_statements_of_bounded_size(
    mysql_engine: Engine, blobs: Table, commands: list[bytes]
) -> None:
    # As pymysql's own executemany: however many rows, no statement outgrows the server's
    # packet limit (a group of pushes storing large rejected ops must not lose its connection).
    rows = [{"id": i, "body": bytes([i]) * 300_000} for i in range(1, 9)]
    with mysql_engine.connect() as conn:
        conn.begin()
        commands.clear()
        with bulk.held(conn):
            bulk.write(conn, insert(blobs), rows)
        conn.commit()
        stored = {r.id: r.body for r in conn.execute(select(blobs))}
    assert stored == {r["id"]: r["body"] for r in rows}
    assert len(commands) > 1
    assert all(len(c) < 2 * 1_024_000 for c in commands)  # ~1 MB of rows, and one more


@pytest.mark.integration
def test_a_failed_batch_quotes_only_the_head_of_its_sql(mysql_engine: Engine, blobs: Table) -> None:
    # Its error (logged, perhaps) would otherwise carry every value of the batch.
    with mysql_engine.connect() as conn:
        conn.begin()
        with pytest.raises(IntegrityError) as refused, bulk.held(conn):
            bulk.write(conn, insert(blobs), [{"id": 1, "body": b"x" * 200_000}])
            bulk.write(conn, insert(blobs), [{"id": 1, "body": b"again"}])
        conn.rollback()
    assert "Duplicate entry" in str(refused.value)
    assert len(str(refused.value)) < 10_000
