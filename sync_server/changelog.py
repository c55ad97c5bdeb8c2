"""The replication log: scope version counters and the latest synced image of every row.

Every write to a synced row goes through a :class:`ChangeLog` bound to the writing transaction:

1. :meth:`ChangeLog.lock_scopes` locks the counter row of every scope the transaction will write,
   always in sorted order (two transactions that both write "org" and "branch:x" take the locks
   in the same order, so they queue instead of deadlocking). The lock is held until commit.
   Rows a transaction reads in order to decide what to write are locked *before* the counters
   (:meth:`ChangeLog.load_rows` with ``lock=True``): the counter, which every writer of the scope
   queues on, is then held only for the writes themselves.
2. Each scope gets exactly one new version for the transaction: ``counter + 1``. Because the
   counter stays locked until commit, the next writer of the scope cannot take ``counter + 2``
   before this one is committed: **within a scope, version order is commit order**, so a reader
   that has seen version N has seen everything at or below N, and a cursor never skips a write
   that commits late (the failure of timestamp cursors).
3. :meth:`ChangeLog.write` replaces the row's image (or writes its tombstone) at that version and
   keeps the scope's live-row count and checksum current.
4. :meth:`ChangeLog.finish` stores the new counters. The caller commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import msgspec
from sqlalchemy import Select, bindparam, insert, select, tuple_
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection

from domain.ops import RowState
from sync_protocol.checksums import MOD, row_checksum

from .bulk import IN_LENGTHS, execute, in_binds, in_length, in_list, update_rows, write
from .tables import sync_rows, sync_scopes

Key = tuple[str, str]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


@dataclass
class ScopeHead:
    scope: str
    version: int
    horizon: int
    row_count: int
    checksum: int
    #: The version this transaction writes at (set when the first row is written).
    writing: int | None = None
    #: Whether ``version`` moved since the counter was read (finish() must store it).
    advanced: bool = False


# Statements built once and executed with parameters (executemany for rows): the SQL is
# compiled once per process instead of once per row.
_INSERT_ROW = insert(sync_rows)
#: Columns a rewrite of an existing row replaces (a row never changes scope).
_REWRITTEN = ("version", "deleted", "data", "field_versions", "changed_at")
_mysql_upsert = mysql.insert(sync_rows)
_sqlite_upsert = sqlite.insert(sync_rows)
#: Rewrites of existing rows, all in one statement: an "upsert" whose insert never happens,
#: because only rows this transaction has read (and so knows to exist) are sent through it;
#: ``sync_rows`` has no unique key but its primary key, so the update hits exactly that row.
#: Rows believed new go through the plain insert instead, which fails if another transaction
#: created them meanwhile (an upsert would silently overwrite that row).
_REWRITE_ROWS = {
    "mysql": _mysql_upsert.on_duplicate_key_update(
        {name: _mysql_upsert.inserted[name] for name in _REWRITTEN}
    ),
    "sqlite": _sqlite_upsert.on_conflict_do_update(
        index_elements=[sync_rows.c.entity, sync_rows.c.row_id],
        set_={name: _sqlite_upsert.excluded[name] for name in _REWRITTEN},
    ),
}
_LOCK_SCOPES = (
    select(
        sync_scopes.c.scope,
        sync_scopes.c.version,
        sync_scopes.c.horizon,
        sync_scopes.c.row_count,
        sync_scopes.c.checksum,
    )
    .where(sync_scopes.c.scope.in_(bindparam("scopes", expanding=True)))
    .order_by(sync_scopes.c.scope)
    .with_for_update()
)
_ROW_COLUMNS = select(
    sync_rows.c.entity,
    sync_rows.c.row_id,
    sync_rows.c.scope,
    sync_rows.c.version,
    sync_rows.c.deleted,
    sync_rows.c.data,
    sync_rows.c.field_versions,
)


@lru_cache(maxsize=64)
def _load_rows(length: int, lock: bool) -> Select[Any]:
    """The rows of an ``IN`` list of ``length`` keys (see :func:`bulk.in_list`), plain or
    locking (FOR UPDATE; SQLite renders no clause: its writers hold the database lock from
    BEGIN IMMEDIATE)."""
    key = (sync_rows.c.entity, sync_rows.c.row_id)
    query = _ROW_COLUMNS.where(tuple_(*key).in_(in_binds("k", key, length)))
    return query.with_for_update() if lock else query


def _family(conn: Connection) -> str:
    return "sqlite" if conn.dialect.name == "sqlite" else "mysql"


class ScopeNotLocked(RuntimeError):
    """A write to a scope the transaction did not lock: a programming error, or a row whose
    scope was unknown before locking (the caller retries with the right scopes)."""


class ChangeLog:
    """Writes to synced rows inside one transaction (see the module docstring)."""

    def __init__(self, conn: Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.heads: dict[str, ScopeHead] = {}
        self._rows: dict[Key, RowState | None] = {}
        self._pending: dict[Key, tuple[str, dict[str, Any]]] = {}

    # Step 1 --------------------------------------------------------------------------------
    def lock_scopes(self, scopes: Iterable[str]) -> dict[str, ScopeHead]:
        """Lock the counters of ``scopes`` (sorted order; created on first use)."""
        wanted = sorted(set(scopes) - set(self.heads))
        if not wanted:
            return self.heads
        if self.heads and wanted[0] < max(self.heads):
            # Locking out of order could deadlock against a transaction doing it in order.
            raise ScopeNotLocked(f"scope {wanted[0]} must be locked before {max(self.heads)}")
        # One statement for all of them: InnoDB locks the rows as it walks the primary key,
        # in sorted order, as separate statements would.
        heads = self._select_for_update(wanted)
        missing = [scope for scope in wanted if scope not in heads]
        if missing:
            # A scope's first writer creates its counter. It may then hold a later scope's lock
            # while creating an earlier one: a deadlock with another first writer is possible,
            # detected by the database and retried (``transact``); it happens once per scope.
            for scope in missing:
                self._create_scope(scope)
            heads.update(self._select_for_update(missing))
        for scope in wanted:
            self.heads[scope] = heads[scope]
        return self.heads

    def _select_for_update(self, scopes: list[str]) -> dict[str, ScopeHead]:
        return {
            row.scope: ScopeHead(row.scope, row.version, row.horizon, row.row_count, row.checksum)
            for row in self.conn.execute(_LOCK_SCOPES, {"scopes": scopes})
        }

    def _create_scope(self, scope: str) -> None:
        # INSERT IGNORE / OR IGNORE: two first writers may race to create the counter.
        stmt = (
            insert(sync_scopes)
            .values(scope=scope, version=0, horizon=0, row_count=0, checksum=0)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("IGNORE", dialect="mariadb")
            .prefix_with("OR IGNORE", dialect="sqlite")
        )
        self.conn.execute(stmt)

    # Reading -------------------------------------------------------------------------------
    def load_rows(self, keys: Iterable[Key], *, lock: bool = False) -> dict[Key, RowState | None]:
        """The current image of each row (None when it never existed). With ``lock`` the rows
        are read with ``FOR UPDATE``, so nobody else changes them until this transaction ends;
        lock them before any scope counter (the engine's lock order: rows, then counters)."""
        # Sorted: rows are locked in key order however the ops name them, so two transactions
        # locking overlapping rows in several statements queue instead of deadlocking.
        wanted = sorted(k for k in dict.fromkeys(keys) if k not in self._rows)
        for start in range(0, len(wanted), IN_LENGTHS[-1]):
            chunk = wanted[start : start + IN_LENGTHS[-1]]
            found: dict[Key, RowState] = {}
            query = _load_rows(in_length(len(chunk)), lock)
            for r in execute(self.conn, query, in_list("k", chunk)):
                found[(r.entity, r.row_id)] = RowState(
                    entity=r.entity,
                    id=r.row_id,
                    scope=r.scope,
                    version=r.version,
                    deleted=bool(r.deleted),
                    data=_decode(r.data),
                    field_versions=_decode(r.field_versions),
                )
            for key in chunk:
                self._rows[key] = found.get(key)
        return {k: self._rows[k] for k in dict.fromkeys(keys)}

    def current(self, keys: Iterable[Key]) -> dict[Key, RowState | None]:
        """The images of rows already loaded, as this transaction's writes left them."""
        return {k: self._rows[k] for k in dict.fromkeys(keys)}

    # Steps 2 and 3 -------------------------------------------------------------------------
    def write(
        self,
        entity: str,
        row_id: str,
        scope: str,
        data: Mapping[str, Any] | None,
        changed: Iterable[str] | None = None,
    ) -> int:
        """Write the new image of a row (``data``) or its tombstone (None); returns its version.

        ``changed`` names the fields this write changes (default: all of ``data``); their field
        versions move to the new version, which field-level merges compare against.
        """
        head = self.heads.get(scope)
        if head is None:
            raise ScopeNotLocked(f"scope {scope} is not locked by this transaction")
        if head.writing is None:
            head.writing = head.version + 1
        version = head.writing
        key = (entity, row_id)
        current = self._rows[key] if key in self._rows else self.load_rows([key])[key]
        if current is not None and current.scope != scope:
            raise ScopeNotLocked(f"{entity} {row_id} belongs to {current.scope}, not {scope}")

        if current is not None and not current.deleted:
            head.row_count -= 1
            head.checksum = (head.checksum - row_checksum(entity, row_id, current.version)) % MOD
        if data is not None:
            head.row_count += 1
            head.checksum = (head.checksum + row_checksum(entity, row_id, version)) % MOD

        field_versions = dict(current.field_versions) if current is not None else {}
        if data is None:
            field_versions = {}
        else:
            for name in changed if changed is not None else data:
                field_versions[name] = version
        values = {
            "scope": scope,
            "version": version,
            "deleted": data is None,
            "data": _encode(dict(data) if data is not None else {}),
            "field_versions": _encode(field_versions),
            "changed_at": self.now,
        }
        # Buffered until finish(): one multi-row statement per kind instead of one per row
        # (fewer round trips while the scope counter is locked). A row written twice keeps
        # the kind of its first write with the values of the last.
        pending = self._pending.get(key)
        creates = current is None if pending is None else pending[0] == "insert"
        self._pending[key] = (
            "insert" if creates else "rewrite",
            {"entity": entity, "row_id": row_id, **values},
        )
        self._rows[key] = RowState(
            entity, row_id, scope, version, data is None, dict(data or {}), field_versions
        )
        return version

    def flush(self) -> None:
        """Send the buffered row writes (finish() does; call it before reading ``sync_rows``
        with other SQL in the same transaction)."""
        inserts = [params for kind, params in self._pending.values() if kind == "insert"]
        rewrites = [params for kind, params in self._pending.values() if kind == "rewrite"]
        self._pending.clear()
        if inserts:
            write(self.conn, _INSERT_ROW, inserts)
        if rewrites:
            write(self.conn, _REWRITE_ROWS[_family(self.conn)], rewrites)

    # Step 4 --------------------------------------------------------------------------------
    def seal(self) -> dict[str, int]:
        """End one change-set of a transaction that writes several (group commit): the
        versions it wrote become the scopes' heads, so the next write takes a new version.
        Returns scope -> version written by the change-set just ended."""
        written: dict[str, int] = {}
        for head in self.heads.values():
            if head.writing is None:
                continue
            head.version = head.writing
            head.writing = None
            head.advanced = True
            written[head.scope] = head.version
        return written

    def finish(self) -> dict[str, int]:
        """Store the buffered rows and the advanced counters; returns scope -> version
        written since the last :meth:`seal` (scopes written only)."""
        self.flush()
        written = self.seal()
        advanced = [head for head in self.heads.values() if head.advanced]
        update_rows(
            self.conn,
            sync_scopes,
            "scope",
            [
                {
                    "scope": head.scope,
                    "version": head.version,
                    "row_count": head.row_count,
                    "checksum": head.checksum,
                }
                for head in advanced
            ],
        )
        for head in advanced:
            head.advanced = False
        return written


def publish(
    conn: Connection,
    now: datetime,
    entity: str,
    row_id: str,
    scope: str,
    data: Mapping[str, Any] | None,
) -> int:
    """Write one server-owned row (a branch, a staff member, a device) to the log in its own
    scope lock; for code outside the push path (CLI, /api/v1). Returns the version."""
    log = ChangeLog(conn, now)
    log.load_rows([(entity, row_id)], lock=True)  # rows before counters
    log.lock_scopes([scope])
    version = log.write(entity, row_id, scope, data)
    log.finish()
    return version
