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

from sqlalchemy import Table, Update, bindparam, case, tuple_, update
from sqlalchemy.engine import Connection, Dialect, Result
from sqlalchemy.sql import Executable, sqltypes
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
    sql = _rendered(statement, tuple(first), conn.dialect) if _lean(conn) else None
    if sql is None:
        conn.execute(statement, params)
    elif isinstance(params, Mapping):
        conn.exec_driver_sql(sql, dict(params))
    else:
        conn.exec_driver_sql(sql, [dict(p) for p in params])


def execute(conn: Connection, statement: Executable, params: Mapping[str, Any]) -> Result[Any]:
    """:func:`write`'s lean path for a statement that returns rows (a locking read built once,
    its ``IN`` lists spelled out with :func:`in_list`)."""
    sql = (
        _rendered(statement, tuple(params), conn.dialect) if conn.dialect.name == "mysql" else None
    )
    if sql is None:
        return conn.execute(statement, params)
    return conn.exec_driver_sql(sql, dict(params))


#: Lengths ``IN`` lists are padded to (repeating their last value), so that a few statements
#: per query serve every length.
IN_LENGTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def in_length(count: int) -> int:
    """The padded length of an ``IN`` list of ``count`` values (at most 512)."""
    return next(n for n in IN_LENGTHS if n >= count)


def in_list(name: str, values: Sequence[Any]) -> dict[str, Any]:
    """Parameters ``{name}_{i}`` (or ``{name}_{i}_{j}`` for tuples) for an ``IN`` list of
    ``values`` padded to :func:`in_length`, as :func:`in_binds` names them."""
    padded = list(values) + [values[-1]] * (in_length(len(values)) - len(values))
    params: dict[str, Any] = {}
    for i, value in enumerate(padded):
        if isinstance(value, tuple):
            for j, part in enumerate(value):
                params[f"{name}_{i}_{j}"] = part
        else:
            params[f"{name}_{i}"] = value
    return params


def in_binds(name: str, columns: Sequence[Any], length: int) -> list[Any]:
    """The bound parameters of an ``IN`` list of ``length`` values of ``columns`` (several
    columns: a list of tuples), named as :func:`in_list` fills them."""
    if len(columns) == 1:
        (column,) = columns
        return [bindparam(f"{name}_{i}", type_=column.type) for i in range(length)]
    return [
        tuple_(*(bindparam(f"{name}_{i}_{j}", type_=c.type) for j, c in enumerate(columns)))
        for i in range(length)
    ]


def _lean(conn: Connection) -> bool:
    return conn.dialect.name in ("mysql", "mariadb") and conn.dialect.driver == "pymysql"


#: Column types whose values pymysql takes as they are (SQLAlchemy's own processing of them on
#: MySQL is nothing, or bool -> int and bytes -> bytes, which pymysql does alike).
_PLAIN_TYPES = (
    sqltypes.String,
    sqltypes.Integer,
    sqltypes.DateTime,
    sqltypes.Boolean,
    sqltypes._Binary,
    sqltypes.NullType,
)


@lru_cache(maxsize=1024)
def _rendered(statement: Executable, names: tuple[str, ...], dialect: Dialect) -> str | None:
    """The SQL of ``statement`` for parameters ``names``, in the driver's named style, or None
    when the driver cannot be handed the values as they are (a value SQLAlchemy would supply
    itself, such as a column default; a type SQLAlchemy converts; a positional style)."""
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(names))
    assert isinstance(compiled, SQLCompiler)
    if compiled.positional or set(compiled.binds) != set(names):
        return None
    if not all(isinstance(b.type, _PLAIN_TYPES) for b in compiled.binds.values()):
        return None  # a type SQLAlchemy converts (Numeric, JSON, a TypeDecorator…)
    return compiled.string
