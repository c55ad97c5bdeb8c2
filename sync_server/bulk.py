"""Statements that write many rows at once.

``UPDATE t SET c = CASE WHEN k = :k_0 THEN :c_0 … ELSE c END, … WHERE k IN (:k_0, …)`` rewrites
several rows of one table, each with its own values, in one round trip (pymysql sends
``executemany`` of an UPDATE as one statement per row). Rows go in chunks of at most
:data:`MAX_ROWS`: the statement for each number of rows is built and compiled once, and a large
batch never becomes one huge statement.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Table, Update, bindparam, case, update
from sqlalchemy.engine import Connection

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
        conn.execute(_case_update(table, key, columns, tuple(shared), len(chunk)), params)


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
