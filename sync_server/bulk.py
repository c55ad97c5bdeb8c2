"""Statements that write many rows at once, and a lean way to send them.

``UPDATE t SET c = CASE WHEN k = :k_0 THEN :c_0 … ELSE c END, … WHERE k IN (:k_0, …)`` rewrites
several rows of one table, each with its own values, in one round trip (pymysql sends
``executemany`` of an UPDATE as one statement per row). Rows go in chunks of at most
:data:`MAX_ROWS`: the statement for each number of rows is built and compiled once, and a large
batch never becomes one huge statement.

:func:`write` sends such a statement (built once, kept) without SQLAlchemy's per-execution work
on the parameters, which for a multi-row write costs about a third of the driver's own: the
statement is rendered for the dialect once per set of parameter names and handed to the driver
with the values as they are (``exec_driver_sql``: errors, events and transactions stay
SQLAlchemy's). Only on MySQL/MariaDB, whose driver takes our values as they are (strings,
numbers, bytes, datetimes, booleans, None); SQLite, whose dates go through SQLAlchemy's own
conversion, gets the ordinary execution.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Table, Update, bindparam, case, update
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

T = TypeVar("T")

#: Rows per statement, at most.
MAX_ROWS = 64


def chunked(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of at most :data:`MAX_ROWS`."""
    for start in range(0, len(items), MAX_ROWS):
        yield items[start : start + MAX_ROWS]


def update_rows(
    conn: Connection,
    table: Table,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any] | None = None,
) -> None:
    """Rewrite ``rows`` of ``table`` (each a mapping with ``key`` and the same other columns),
    plus the ``shared`` column values given to every one of them."""
    if not rows:
        return
    shared = shared or {}
    columns = tuple(name for name in rows[0] if name != key)
    for chunk in chunked(rows):
        params = dict(shared)
        for i, row in enumerate(chunk):
            for name, value in row.items():
                params[f"{name}_{i}"] = value
        write(conn, _case_update(table, key, columns, tuple(shared), len(chunk)), params)


@lru_cache(maxsize=512)
def _case_update(
    table: Table, key: str, columns: tuple[str, ...], shared: tuple[str, ...], count: int
) -> Update:
    keys = [bindparam(f"{key}_{i}", type_=table.c[key].type) for i in range(count)]
    values: dict[str, Any] = {
        name: case(
            *[
                (table.c[key] == keys[i], bindparam(f"{name}_{i}", type_=table.c[name].type))
                for i in range(count)
            ],
            else_=table.c[name],
        )
        for name in columns
    }
    for name in shared:
        values[name] = bindparam(name, type_=table.c[name].type)
    return update(table).where(table.c[key].in_(keys)).values(values)


def write(
    conn: Connection,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> None:
    """Execute ``statement`` (an INSERT or UPDATE built once and kept) with ``params``: one
    mapping, or a list of mappings with the same names (sent as one multi-row statement)."""
    first = params if isinstance(params, Mapping) else (params[0] if params else None)
    if first is None:
        return
    sql = _rendered(statement, tuple(first), conn.dialect) if conn.dialect.name == "mysql" else None
    if sql is None:
        conn.execute(statement, params)
    elif isinstance(params, Mapping):
        conn.exec_driver_sql(sql, dict(params))
    else:
        conn.exec_driver_sql(sql, [dict(p) for p in params])


@lru_cache(maxsize=1024)
def _rendered(statement: Executable, names: tuple[str, ...], dialect: Dialect) -> str | None:
    """The SQL of ``statement`` for parameters ``names``, in the driver's named style, or None
    when the driver cannot be handed the values as they are (a value SQLAlchemy would supply
    itself, such as a column default; a positional style)."""
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(names))
    assert isinstance(compiled, SQLCompiler)
    if compiled.positional or set(compiled.binds) != set(names):
        return None
    return compiled.string
