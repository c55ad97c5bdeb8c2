"""The system of record behind device-writable entities: their own relational tables.

The replication log (:mod:`sync_server.changelog`) keeps what devices pull; these tables keep the
same rows in columns for constraints, reports and /api/v1. Both are written in the same
transaction by the push engine, so they never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    Delete,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection

from domain.registry import EntitySpec, Registry, branch_scope, scope_branch

from .bulk import update_rows, write
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
        conn.execute(_statements(table)[0], _insert_params(row_id, columns, version, now))
    else:
        conn.execute(
            _statements(table)[1],
            {"k_id": row_id, "version": version, "updated_at": now, **columns},
        )


def _insert_params(
    row_id: str, columns: Mapping[str, Any], version: int, now: datetime
) -> dict[str, Any]:
    return {"id": row_id, "version": version, "created_at": now, "updated_at": now, **columns}


class RecordWriter:
    """Mirrors planned writes (of one change-set, or of several in one transaction) into the
    entities' tables, in as few statements as is safe.

    Writes go out in plan order, one statement each, except rewrites of existing rows that
    change no unique column (a rename, a new price: most of them). Those cannot collide with
    any other write in a unique index, so their order does not matter: they are held back and
    sent by :meth:`flush` as one ``UPDATE … SET col = CASE id …`` per table and set of
    changed columns (only those: the others already hold the image's values). A write that
    moves a unique value (a new SKU) keeps its place in the order, since a delete, a create and
    a rename of the same SKU must reach the unique index in the order the devices made them.
    Every image is the row's whole state, so a later write of a row replaces a held one (a
    held rename followed by a new SKU sends only the second image, which carries both).
    Creates are held too, and sent as multi-row inserts before the next write that keeps its
    place (a delete or a unique move, which may release a value a held create takes, or touch
    the created row) and at :meth:`flush`, before the held rewrites (which may be of them).
    Two creates never contend for one unique value: the planner refuses the second.
    """

    def __init__(self, conn: Connection, registry: Registry, now: datetime) -> None:
        self.conn = conn
        self.registry = registry
        self.now = now
        #: (entity, id) -> (version, image, fields changed since the row was last sent).
        self._held: dict[tuple[str, str], tuple[int, Mapping[str, Any], frozenset[str]]] = {}
        self._creates: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}

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
        earlier = self._held.pop(key, None)
        if data is not None and not created and unique.isdisjoint(changed):
            # Only the changed columns are sent, so the fields an earlier held write of the
            # row changed (in an earlier change-set of the group) go too.
            fields = frozenset(changed) | (earlier[2] if earlier is not None else frozenset())
            self._held[key] = (version, data, fields)
            return
        if data is not None and created:
            table = RECORD_TABLES[entity].table
            columns = {k: v for k, v in data.items() if k in table.c}
            self._creates.setdefault((entity, tuple(sorted(columns))), []).append(
                _insert_params(row_id, columns, version, self.now)
            )
            return
        self._send_creates()
        save(self.conn, entity, row_id, data, version=version, created=created, now=self.now)

    def _send_creates(self) -> None:
        for (entity, _), rows in self._creates.items():
            write(self.conn, _statements(RECORD_TABLES[entity].table)[0], rows)
        self._creates.clear()

    def flush(self) -> None:
        self._send_creates()
        by_shape: dict[tuple[str, tuple[str, ...]], list[tuple[str, int, Mapping[str, Any]]]] = {}
        for (entity, row_id), (version, data, fields) in self._held.items():
            table = RECORD_TABLES[entity].table
            columns = tuple(
                sorted(n for n in fields if n in table.c and n not in ("id", "version"))
            )
            by_shape.setdefault((entity, columns), []).append((row_id, version, data))
        self._held.clear()
        for (entity, columns), rows in by_shape.items():
            _rewrite(self.conn, RECORD_TABLES[entity], columns, rows, now=self.now)


#: Columns of a record table not taken from the image.
_NOT_IMAGED = ("id", "version", "created_at", "updated_at")


def _rewrite(
    conn: Connection,
    record: RecordTable,
    columns: tuple[str, ...],
    rows: Sequence[tuple[str, int, Mapping[str, Any]]],
    *,
    now: datetime,
) -> None:
    """Set ``columns`` (and the version) of ``rows`` from their images, in bulk."""
    update_rows(
        conn,
        record.table,
        "id",
        [
            {"id": row_id, "version": version, **{name: data[name] for name in columns}}
            for row_id, version, data in rows
        ],
        {"updated_at": now},
    )


@cache
def _holders_query(record: RecordTable, group: tuple[str, ...], by_branch: bool) -> Select[Any]:
    """Built once per (table, unique group): the values arrive as an expanding parameter,
    each led by its branch when ``by_branch`` (so one query serves several branches)."""
    table = record.table
    columns = [table.c[name] for name in group]
    if by_branch:
        assert record.branch_column is not None
        columns.insert(0, table.c[record.branch_column])
    return select(table.c.id, *columns).where(
        tuple_(*columns).in_(bindparam("values", expanding=True))
    )


@cache
def _statements(table: Table) -> tuple[Insert, Update, Delete]:
    by_id = table.c.id == bindparam("k_id")
    return insert(table), update(table).where(by_id), delete(table).where(by_id)


def unique_holders(
    conn: Connection, spec: EntitySpec, scope: str, candidates: Iterable[tuple[Any, ...]]
) -> dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str]:
    """For each unique group of ``spec``, which live row of ``scope`` holds each candidate
    value."""
    return unique_holders_by_scope(conn, spec, {scope: candidates})


def unique_holders_by_scope(
    conn: Connection, spec: EntitySpec, candidates: Mapping[str, Iterable[tuple[Any, ...]]]
) -> dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str]:
    """:func:`unique_holders` for candidates in several scopes (scope -> candidates), in one
    query per unique group."""
    record = RECORD_TABLES.get(spec.name)
    wanted = {scope: list(dict.fromkeys(values)) for scope, values in candidates.items()}
    found: dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str] = {}
    if record is None:
        return found
    for group in spec.unique:
        branched: list[tuple[Any, ...]] = []
        for scope, values in wanted.items():
            values = [c for c in values if len(c) == len(group)]
            branch = scope_branch(scope)
            if not values:
                continue
            if record.branch_column is None or branch is None:
                query = _holders_query(record, group, False)
                for row in conn.execute(query, {"values": values}):
                    found[(spec.name, scope, group, tuple(row[1:]))] = row[0]
            else:
                branched.extend((branch, *c) for c in values)
        if branched:
            query = _holders_query(record, group, True)
            for row in conn.execute(query, {"values": branched}):
                found[(spec.name, branch_scope(row[1]), group, tuple(row[2:]))] = row[0]
    return found
