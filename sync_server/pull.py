"""Pull: the rows a device has not seen, in version order, a bounded page at a time.

The numbered steps are those of ``docs/protocol.md`` § Pull. A page is read in one snapshot
(REPEATABLE READ on InnoDB, a read transaction on SQLite), so its rows, its cursors, the scope
checksums and the device's write checkpoint all describe the same committed state.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine

from domain.registry import ORG_SCOPE, EntitySpec, Registry, filter_fields
from domain.roles import Role
from sync_protocol import messages as m
from sync_protocol.checksums import MOD

from .db import read_transaction, transact
from .directory import DeviceRefused, utcnow
from .tables import devices, sync_rows, sync_scopes

_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode


class ResetRequired(Exception):
    """The device's replica of these scopes must be rebuilt from version 0; ``reason`` says
    why, for the message: ``behind`` (older than the compaction horizon), ``ahead`` (a cursor
    beyond anything this server wrote), ``role`` (the user's role changed since)."""

    def __init__(self, scopes: list[str], reason: str = "behind") -> None:
        super().__init__(f"{reason}: {', '.join(scopes)}")
        self.scopes = scopes
        self.reason = reason


class RowOut(msgspec.Struct, array_like=False):
    """Server-side twin of :class:`~sync_protocol.messages.RowChange` whose ``data`` may be
    the stored MessagePack bytes passed through untouched (no decode, no re-encode)."""

    entity: str
    id: str
    scope: str
    version: int
    deleted: bool
    data: Any


class PullOut(msgspec.Struct):
    protocol: str
    changes: list[RowOut]
    cursors: dict[str, int]
    has_more: bool
    last_applied_seq: int
    page_checksum: int
    scopes: list[m.ScopeState] = []


@dataclass(frozen=True)
class PullScope:
    scope: str
    cursor: int


def _seen_horizons(blob: bytes | None) -> dict[str, tuple[int, int]]:
    if blob is None:
        return {}
    return {scope: (int(h), int(floor)) for scope, (h, floor) in _decode(blob).items()}


def _must_reset(cursor: int, head: Any, seen: tuple[int, int] | None) -> bool:
    """Step 2. A replica at ``cursor`` (0 < cursor < horizon) may hold a row whose tombstone,
    at a version above ``cursor``, was purged: it must be rebuilt — unless the device's last
    pull already saw this horizon with a cursor at most this one. Then every page it holds was
    read after the purge (at most this far back), so it never held those rows: a paged initial
    sync after a compaction goes on. (Horizons only grow: an unchanged one means no purge.)"""
    version, horizon = (head.version, head.horizon) if head is not None else (0, 0)
    if cursor > version:
        return True
    if not 0 < cursor < horizon:
        return False
    return seen is None or seen[0] != horizon or cursor < seen[1]


def _remember_horizons(
    conn: Connection,
    device_id: str,
    seen: dict[str, tuple[int, int]],
    horizons: dict[str, int],
    cursors: dict[str, int],
    *,
    pulled: tuple[bytes | None, dict[str, int]] | None = None,
    role: str | None = None,
    more: bool = False,
    pulled_at: datetime | None = None,
) -> None:
    """After a successful pull: the horizon of each scope in its snapshot, and the lowest
    cursor the device pulled from under it (see :func:`_must_reset`); and, with ``pulled``
    (stored blob, new cursors), the cursors the device now stands at. Written only when they
    change — a device's first pull, after compactions, after a pull that returned rows — so
    idle pulls stay read-only. ``role``: the role the pulled rows were filtered for, when it
    changed (see step 2).

    The cursors are informational (protocol.md § 12): while a device pages through a
    catch-up (``more``), they are stored only when they were not in the last
    :data:`CURSORS_EVERY` (``pulled_at``: when they last were; so, at a first page), and
    at its last page; a write transaction per page cost an initial sync an eighth of its
    server time. The horizons are stored whenever they change: step 2
    depends on them."""
    values: dict[str, Any] = {}
    if role is not None:
        values["pulled_role"] = role
    if pulled is not None:
        stored, moved = pulled
        blob_cursors = _encode(dict(sorted(moved.items())))
        due = not more or pulled_at is None or utcnow() - pulled_at >= CURSORS_EVERY
        if blob_cursors != stored and due:
            values["pull_cursors"] = blob_cursors
            values["last_pulled_at"] = utcnow()
    now: dict[str, tuple[int, int]] = {}
    for scope, horizon in horizons.items():
        cursor = cursors.get(scope, 0)
        before = seen.get(scope)
        floor = min(before[1], cursor) if before is not None and before[0] == horizon else cursor
        now[scope] = (horizon, floor)
    if now != seen:
        values["seen_horizons"] = _encode({scope: list(pair) for scope, pair in now.items()})
    if not values:
        return
    transact(
        conn, lambda c: c.execute(update(devices).where(devices.c.id == device_id).values(**values))
    )


#: How often, at most, the cursors of a device paging through a catch-up are stored.
CURSORS_EVERY = timedelta(seconds=30)

#: A page row as the driver returns it: (entity, row_id, version, deleted, data).
PageRow = tuple[str, str, int, Any, bytes]

_COLUMNS = "entity, row_id, version, deleted, data"
_VERSION: Final = 2  # index of the version in a PageRow


def _page_statements(conn: Connection) -> tuple[str, str]:
    """The two page queries in the driver's own SQL: the next rows after a cursor, and every
    row of one version. Sent as driver SQL and read from the DBAPI cursor, they skip
    SQLAlchemy's statement compilation and its ``Row`` objects (a tenth of initial sync's
    server CPU).

    On MariaDB/MySQL the (scope, version) index is forced: left to itself the optimizer picks
    ``ref`` access on ``scope`` and applies the version bound by index condition pushdown, so
    every page walks the scope's index from its first entry (quadratic in the replica size)."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    hint = (
        " FORCE INDEX (ix_sync_rows_scope_version)"
        if conn.dialect.name in ("mysql", "mariadb")
        else ""
    )
    table = f"{sync_rows.name}{hint}"
    after = (
        f"SELECT {_COLUMNS} FROM {table} WHERE scope = {mark} AND version > {mark}"
        f" ORDER BY version LIMIT {mark}"
    )
    single = (
        f"SELECT {_COLUMNS} FROM {table} WHERE scope = {mark} AND version = {mark}"
        " ORDER BY entity, row_id"
    )
    return after, single


def _fetch(conn: Connection, sql: str, params: tuple[Any, ...]) -> list[PageRow]:
    """Run ``sql`` in the transaction and take its rows straight from the DBAPI cursor, as the
    driver's plain tuples. (Executed through the connection, so engine events, and anything
    that counts statements with them, still see it.)"""
    result = conn.exec_driver_sql(sql, params)
    try:
        return list(result.cursor.fetchall())
    finally:
        result.close()


@dataclass(frozen=True)
class _EntityPlan:
    """What step 5 does with every row of one entity, decided once per page."""

    #: CRC-32 of ``"{entity}:"``: a row's checksum continues it with ``"{row_id}:{version}"``.
    crc_prefix: int
    #: Send the stored MessagePack bytes untouched (no field is hidden from the role).
    passthrough: bool
    spec: EntitySpec | None


def _plan(entity: str, role: Role, registry: Registry, raw_msgpack: bool) -> _EntityPlan:
    spec = registry.entity(entity)
    hidden = spec.hidden.get(role) if spec is not None else None
    return _EntityPlan(zlib.crc32(f"{entity}:".encode()), raw_msgpack and not hidden, spec)


def page_changes(
    rows: Iterable[PageRow],
    scope: str,
    *,
    role: Role,
    registry: Registry,
    raw_msgpack: bool,
    plans: dict[str, _EntityPlan],
    out: list[RowOut],
) -> int:
    """Step 5 for one scope's rows: append each row, its fields filtered for ``role``, to
    ``out`` and return the sum of their row checksums (mod 2**32).

    The checksum is :func:`sync_protocol.checksums.row_checksum` computed incrementally (CRC-32
    continued from the entity's prefix), which tests/unit/test_pull_page.py holds equal to it;
    ``plans`` caches the per-entity decisions across the scopes of a page."""
    crc32 = zlib.crc32
    raw = msgspec.Raw
    append = out.append
    total = 0
    for entity, row_id, version, deleted, blob in rows:
        plan = plans.get(entity)
        if plan is None:
            plan = plans[entity] = _plan(entity, role, registry, raw_msgpack)
        total += crc32(f"{row_id}:{version}".encode(), plan.crc_prefix)
        data: Any = None
        if not deleted:
            if plan.passthrough:
                data = raw(blob)
            elif plan.spec is None:
                data = _decode(blob)
            else:
                data = filter_fields(plan.spec, role, _decode(blob))
        append(RowOut(entity, row_id, scope, version, bool(deleted), data))
    return total % MOD


def visible_scopes(role: Role, branch_ids: frozenset[str]) -> list[str]:
    """The scopes a user's devices replicate: the organisation, then each branch."""
    return [ORG_SCOPE, *sorted(f"branch:{b}" for b in branch_ids)]


def pull(
    db: Engine | Connection,
    *,
    device_id: str,
    role: Role,
    scopes: Sequence[str],
    cursors: dict[str, int],
    limit: int,
    registry: Registry,
    raw_msgpack: bool = False,
    user_id: str | None = None,
) -> PullOut:
    """One page of changes after ``cursors`` for ``scopes`` (see docs/protocol.md § Pull).

    With ``raw_msgpack`` the stored row images are passed through as MessagePack when the role
    may see every field of the entity, which makes initial sync nearly a straight copy.
    With ``user_id`` the device is first checked to be that user's and not revoked (in the
    same snapshot and connection as the page, saving the request a checkout), else
    :class:`DeviceRefused`.

    Given a connection, it must be in a :func:`~sync_server.db.read_transaction`: the page is
    read from that snapshot (the caller may have read there before: authentication), which
    pull then ends; what the device's row must remember is written in a transaction of its
    own on the same connection.
    """
    if isinstance(db, Engine):
        with read_transaction(db) as conn:
            return pull(
                conn,
                device_id=device_id,
                role=role,
                scopes=scopes,
                cursors=cursors,
                limit=limit,
                registry=registry,
                raw_msgpack=raw_msgpack,
                user_id=user_id,
            )
    conn = db
    changes: list[RowOut] = []
    out_cursors: dict[str, int] = {}
    finished: list[m.ScopeState] = []
    has_more = False
    page_sum = 0
    # Step 1: the write checkpoint and the scope heads, from the same snapshot as the rows.
    device = conn.execute(
        select(
            devices.c.last_applied_seq,
            devices.c.seen_horizons,
            devices.c.pull_cursors,
            devices.c.pulled_role,
            devices.c.last_pulled_at,
            devices.c.user_id,
            devices.c.revoked_at,
        ).where(devices.c.id == device_id)
    ).first()
    if device is None:
        raise DeviceRefused(unregistered=True)
    if user_id is not None and (device.user_id != user_id or device.revoked_at is not None):
        raise DeviceRefused(unregistered=False)
    last_seq = device.last_applied_seq
    seen = _seen_horizons(device.seen_horizons)
    stored_cursors: bytes | None = device.pull_cursors
    heads = {
        r.scope: r
        for r in conn.execute(select(sync_scopes).where(sync_scopes.c.scope.in_(list(scopes))))
    }
    # Step 2: a cursor above the head (a replica of another database) cannot be continued,
    # nor one below the compaction horizon whose tombstones the device may need.
    stale = [
        scope
        for scope in scopes
        if _must_reset(cursors.get(scope, 0), heads.get(scope), seen.get(scope))
    ]
    # A role change changes which fields the replica may hold (a manager demoted to staff
    # must lose the contact data of the staff directory; a promoted one must gain it): what
    # the device holds was filtered for its old role, so every scope it holds is rebuilt.
    reason = "behind"
    if any(cursors.get(s, 0) > (h.version if (h := heads.get(s)) else 0) for s in stale):
        reason = "ahead"
    if device.pulled_role is not None and device.pulled_role != role.value:
        held = {s for s in scopes if cursors.get(s, 0) > 0}
        if held - set(stale):
            reason = "role"
        stale = sorted(set(stale) | held)
    if stale:
        raise ResetRequired(stale, reason)
    horizons = {scope: (h.horizon if (h := heads.get(scope)) else 0) for scope in scopes}

    after_sql, single_sql = _page_statements(conn)
    plans: dict[str, _EntityPlan] = {}
    remaining = limit
    for scope in scopes:
        cursor = cursors.get(scope, 0)
        head = heads.get(scope)
        if head is None:
            out_cursors[scope] = 0
            finished.append(m.ScopeState(scope, 0, 0, 0))
            continue
        if has_more:
            out_cursors[scope] = cursor
            continue
        # Step 3: the next rows in version order, one more than fits, to see the boundary.
        rows = _fetch(conn, after_sql, (scope, cursor, remaining + 1))
        cut = len(rows) > remaining
        if cut:
            # Step 4: never split a version (one transaction's writes) across pages.
            page = rows[:remaining]
            boundary = rows[remaining][_VERSION]
            if page and page[-1][_VERSION] == boundary:
                page = [r for r in page if r[_VERSION] != boundary]
                # A version larger than the whole limit is sent alone, in one page of its
                # own; when earlier scopes already filled part of this page, it waits.
                if not page and not changes:
                    page = _fetch(conn, single_sql, (scope, boundary))
            rows = page
        if not cut or (rows and rows[-1][_VERSION] == head.version):
            # Everything up to the head fits (or the oversized version was the last one).
            out_cursors[scope] = head.version
            finished.append(m.ScopeState(scope, head.version, head.row_count, head.checksum))
        else:
            has_more = True
            out_cursors[scope] = rows[-1][_VERSION] if rows else cursor
        remaining -= len(rows)
        # Step 5: role filtering and checksums.
        scope_sum = page_changes(
            rows,
            scope,
            role=role,
            registry=registry,
            raw_msgpack=raw_msgpack,
            plans=plans,
            out=changes,
        )
        page_sum = (page_sum + scope_sum) % MOD
        if remaining <= 0 and not has_more:
            # The page is full exactly at the end of this scope; later scopes go next time.
            has_more = scope != scopes[-1]
            if has_more:
                remaining = 0
    for scope in scopes:
        out_cursors.setdefault(scope, cursors.get(scope, 0))
    conn.rollback()  # the snapshot ends here; what follows writes, at READ COMMITTED
    _remember_horizons(
        conn,
        device_id,
        seen,
        horizons,
        cursors,
        pulled=(stored_cursors, out_cursors),
        role=None if device.pulled_role == role.value else role.value,
        more=has_more,
        pulled_at=device.last_pulled_at,
    )
    return PullOut(
        protocol=m.PROTOCOL_VERSION,
        changes=changes,
        cursors=out_cursors,
        has_more=has_more,
        last_applied_seq=int(last_seq),
        page_checksum=page_sum,
        scopes=finished,
    )
