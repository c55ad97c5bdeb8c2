"""The system of record behind device-writable entities: their own relational tables.

The replication log (:mod:`sync_server.changelog`) keeps what devices pull; these tables keep the
same rows in columns for constraints, reports and /api/v1. Both are written in the same
transaction by the push engine, so they never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import (
    Delete,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    case,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection

from domain.registry import EntitySpec, Registry, scope_branch

from .tables import inventory_items, menu_items


@dataclass(frozen=True)
class RecordTable:
    table: Table
    #: Column holding the branch of branch-scoped rows.
    branch_column: str | None = None


RECORD_TABLES: dict[str, RecordTable] = {
    "inventory_items": RecordTable(inventory_items, branch_column="branch_id"),
    "menu_items": RecordTable(menu_items),
}


def save(
    conn: Connection,
    entity: str,
    row_id: str,
    data: Mapping[str, Any] | None,
    *,
    version: int,
    created: bool,
    now: datetime,
) -> None:
    """Mirror one planned write into the entity's table (deleted rows leave the table: their
    tombstone lives in the replication log)."""
    record = RECORD_TABLES.get(entity)
    if record is None:
        return
    table = record.table
    # Statements are built once per table and run with parameters: building and compiling a
    # statement with its values inlined, per row, was a large share of a push's CPU.
    # Each write is sent in order (not batched): a delete and a create of the same SKU in one
    # change-set must reach the unique index in that order.
    if data is None:
        conn.execute(_statements(table)[2], {"k_id": row_id})
        return
    columns = {k: v for k, v in data.items() if k in table.c}
    if created:
        conn.execute(
            _statements(table)[0],
            {"id": row_id, "version": version, "created_at": now, "updated_at": now, **columns},
        )
    else:
        conn.execute(
            _statements(table)[1],
            {"k_id": row_id, "version": version, "updated_at": now, **columns},
        )


class RecordWriter:
    """Mirrors planned writes (of one change-set, or of several in one transaction) into the
    entities' tables, in as few statements as is safe.

    Writes go out in plan order, one statement each, except rewrites of existing rows that
    change no unique column (a rename, a new price: most of them). Those cannot collide with
    any other write in a unique index, so their order does not matter: they are held back and
    sent by :meth:`flush` as one ``UPDATE … SET col = CASE id …`` per table. A write that
    moves a unique value (a new SKU) keeps its place in the order, since a delete, a create and
    a rename of the same SKU must reach the unique index in the order the devices made them.
    Every image is the row's whole state, so a later write of a row replaces a held one (a
    held rename followed by a new SKU sends only the second image, which carries both).
    """

    def __init__(self, conn: Connection, registry: Registry, now: datetime) -> None:
        self.conn = conn
        self.registry = registry
        self.now = now
        self._held: dict[tuple[str, str], tuple[int, Mapping[str, Any]]] = {}

    def save(
        self,
        entity: str,
        row_id: str,
        data: Mapping[str, Any] | None,
        *,
        version: int,
        created: bool,
        changed: Iterable[str],
    ) -> None:
        if entity not in RECORD_TABLES:
            return
        spec = self.registry.entity(entity)
        unique = {name for group in spec.unique for name in group} if spec else set()
        key = (entity, row_id)
        # Popped, not overwritten: the dict keeps the order of each row's last write.
        self._held.pop(key, None)
        if data is not None and not created and unique.isdisjoint(changed):
            self._held[key] = (version, data)
            return
        save(self.conn, entity, row_id, data, version=version, created=created, now=self.now)

    def flush(self) -> None:
        by_entity: dict[str, list[tuple[str, int, Mapping[str, Any]]]] = {}
        for (entity, row_id), (version, data) in self._held.items():
            by_entity.setdefault(entity, []).append((row_id, version, data))
        self._held.clear()
        for entity, rows in by_entity.items():
            _rewrite(self.conn, RECORD_TABLES[entity], rows, now=self.now)


def _rewrite(
    conn: Connection,
    record: RecordTable,
    rows: Sequence[tuple[str, int, Mapping[str, Any]]],
    *,
    now: datetime,
) -> None:
    table = record.table
    shapes = {
        tuple(sorted(k for k in data if k in table.c and k not in ("id", "version")))
        for _, _, data in rows
    }
    if len(rows) == 1 or len(shapes) != 1:
        # One row, or images of different shapes (not produced by the planner, which writes
        # whole images): one statement per row.
        for row_id, version, data in rows:
            save(conn, table.name, row_id, data, version=version, created=False, now=now)
        return
    (columns,) = shapes
    # In chunks of a few fixed sizes: a handful of statement shapes per table stay compiled,
    # and a 500-op change-set never builds one huge CASE.
    start = 0
    while start < len(rows):
        size = next(n for n in _CHUNKS if n <= len(rows) - start)
        chunk = rows[start : start + size]
        start += size
        if size == 1:
            ((row_id, version, data),) = chunk
            save(conn, table.name, row_id, data, version=version, created=False, now=now)
            continue
        params: dict[str, Any] = {"updated_at": now}
        for i, (row_id, version, data) in enumerate(chunk):
            params[f"id_{i}"] = row_id
            params[f"version_{i}"] = version
            for name in columns:
                params[f"{name}_{i}"] = data[name]
        conn.execute(_rewrite_statement(record, columns, size), params)


#: Rows per CASE update, largest first (the remainder goes in smaller ones).
_CHUNKS = (32, 16, 8, 4, 2, 1)


@lru_cache(maxsize=256)
def _rewrite_statement(record: RecordTable, columns: tuple[str, ...], count: int) -> Update:
    """``UPDATE t SET c = CASE WHEN id = :id_0 THEN :c_0 … END, … WHERE id IN (…)``, built
    once per (table, columns, number of rows); each row keeps its own version."""
    table = record.table
    ids = [bindparam(f"id_{i}", type_=table.c.id.type) for i in range(count)]
    values: dict[str, Any] = {
        name: case(
            *[
                (table.c.id == ids[i], bindparam(f"{name}_{i}", type_=table.c[name].type))
                for i in range(count)
            ],
            else_=table.c[name],
        )
        for name in (*columns, "version")
    }
    values["updated_at"] = bindparam("updated_at", type_=table.c.updated_at.type)
    return update(table).where(table.c.id.in_(ids)).values(values)


@cache
def _holders_query(record: RecordTable, group: tuple[str, ...], by_branch: bool) -> Select[Any]:
    """Built once per (table, unique group): the values arrive as an expanding parameter."""
    table = record.table
    columns = [table.c[name] for name in group]
    query = select(table.c.id, *columns).where(
        tuple_(*columns).in_(bindparam("values", expanding=True))
    )
    if by_branch:
        assert record.branch_column is not None
        query = query.where(table.c[record.branch_column] == bindparam("branch"))
    return query


@cache
def _statements(table: Table) -> tuple[Insert, Update, Delete]:
    by_id = table.c.id == bindparam("k_id")
    return insert(table), update(table).where(by_id), delete(table).where(by_id)


def unique_holders(
    conn: Connection, spec: EntitySpec, scope: str, candidates: Iterable[tuple[Any, ...]]
) -> dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str]:
    """For each unique group of ``spec``, which live row holds each candidate value."""
    record = RECORD_TABLES.get(spec.name)
    wanted = list(dict.fromkeys(candidates))
    if record is None or not wanted:
        return {}
    found: dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str] = {}
    for group in spec.unique:
        values = [c for c in wanted if len(c) == len(group)]
        if not values:
            continue
        branch = scope_branch(scope)
        by_branch = record.branch_column is not None and branch is not None
        params: dict[str, Any] = {"values": values}
        if by_branch:
            params["branch"] = branch
        for row in conn.execute(_holders_query(record, group, by_branch), params):
            found[(spec.name, scope, group, tuple(row[1:]))] = row[0]
    return found
