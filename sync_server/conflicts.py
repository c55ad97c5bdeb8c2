"""Flagged conflicts for managers: listing them and resolving them (the imperative shell of
:mod:`conflict.workflow`).

Visibility: an admin sees every conflict; anyone else those of the organisation scope and of
their own branches. A conflict outside that is reported exactly like one that does not exist.

Resolving runs in one transaction: lock the conflict row (``SELECT … FOR UPDATE``, so two
managers resolving at once queue and the second one sees it resolved: 409 ``already_resolved``),
lock the row's scope through :class:`~sync_server.changelog.ChangeLog` (so no push writes the row
between reading it and writing it), let the pure workflow decide, write the decision through the
change log and the entity's own table, mark the conflict resolved and append the audit entry.
A refusal rolls everything back: nothing is ever half-resolved.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from conflict.workflow import ACCEPT, ConflictRecord, Holders, decide, unique_candidates
from domain.registry import ORG_SCOPE, Registry, branch_scope
from domain.roles import Role

from . import audit
from .changelog import ChangeLog
from .db import run_in_transaction
from .errors import ApiError
from .records import save, unique_holders
from .tables import conflicts

log = logging.getLogger(__name__)

CONFLICT_RESOLVED = "conflict.resolved"
OPEN = "open"
RESOLVED = "resolved"


@dataclass(frozen=True)
class Resolver:
    """Who resolves, and what they may see."""

    user_id: str
    role: Role
    branch_ids: frozenset[str]
    ip: str | None = None


@dataclass(frozen=True)
class StoredConflict:
    """A row of the ``conflicts`` table, JSON decoded."""

    id: str
    scope: str
    entity: str
    row_id: str
    kind: str
    device_id: str | None
    user_id: str | None
    change_set_id: str | None
    op_index: int | None
    base_version: int | None
    server_version: int | None
    proposed: dict[str, Any]
    server_state: dict[str, Any]
    status: str
    resolution: str | None
    resolved_by: str | None
    created_at: datetime
    resolved_at: datetime | None

    def record(self) -> ConflictRecord:
        return ConflictRecord(
            id=self.id,
            entity=self.entity,
            row_id=self.row_id,
            scope=self.scope,
            kind=self.kind,
            base_version=self.base_version,
            server_version=self.server_version,
            proposed=self.proposed,
            server_state=self.server_state,
        )


@dataclass(frozen=True)
class Outcome:
    """A resolved conflict and, when the resolution wrote the row, the scope version."""

    conflict: StoredConflict
    versions: dict[str, int]


def _stored(row: Any) -> StoredConflict:
    return StoredConflict(
        id=row.id,
        scope=row.scope,
        entity=row.entity,
        row_id=row.row_id,
        kind=row.kind,
        device_id=row.device_id,
        user_id=row.user_id,
        change_set_id=row.change_set_id,
        op_index=row.op_index,
        base_version=row.base_version,
        server_version=row.server_version,
        proposed=json.loads(row.proposed),
        server_state=json.loads(row.server_state),
        status=row.status,
        resolution=row.resolution,
        resolved_by=row.resolved_by,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
    )


def visible_scopes(role: Role, branch_ids: Iterable[str]) -> set[str] | None:
    """The scopes whose conflicts a user sees (None: all of them, for an admin)."""
    if role is Role.ADMIN:
        return None
    return {ORG_SCOPE} | {branch_scope(b) for b in branch_ids}


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "No such conflict.")


def list_conflicts(
    conn: Connection,
    scopes: set[str] | None,
    *,
    status: str | None = OPEN,
    after: tuple[datetime, str] | None = None,
    limit: int = 25,
) -> list[StoredConflict]:
    """Conflicts in ``scopes`` (None: all), oldest first, after the ``(created_at, id)`` cursor."""
    query = select(conflicts).order_by(conflicts.c.created_at, conflicts.c.id).limit(limit)
    if scopes is not None:
        query = query.where(conflicts.c.scope.in_(sorted(scopes)))
    if status is not None:
        query = query.where(conflicts.c.status == status)
    if after is not None:
        moment, last_id = after
        query = query.where(
            or_(
                conflicts.c.created_at > moment,
                and_(conflicts.c.created_at == moment, conflicts.c.id > last_id),
            )
        )
    return [_stored(row) for row in conn.execute(query)]


def get_conflict(
    conn: Connection, conflict_id: str, scopes: set[str] | None, *, lock: bool = False
) -> StoredConflict:
    """One conflict the caller may see, or a 404 (also for one outside their scopes)."""
    query = select(conflicts).where(conflicts.c.id == conflict_id.lower())
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None or (scopes is not None and row.scope not in scopes):
        raise _not_found()
    return _stored(row)


def _holders(
    conn: Connection, registry: Registry, record: ConflictRecord, candidates: list[Any]
) -> Holders:
    spec = registry.entity(record.entity)
    if spec is None or not candidates:
        return {}
    found = unique_holders(conn, spec, record.scope, [values for _, values in candidates])
    return {(group, values): owner for (_, _, group, values), owner in found.items()}


def resolve_in(
    conn: Connection,
    conflict_id: str,
    resolution: str,
    *,
    resolver: Resolver,
    registry: Registry,
    now: datetime,
    note: str | None = None,
) -> Outcome:
    """Resolve one conflict inside the caller's transaction (see the module docstring)."""
    scopes = visible_scopes(resolver.role, resolver.branch_ids)
    stored = get_conflict(conn, conflict_id, scopes, lock=True)
    if stored.status != OPEN:
        raise ApiError(
            409,
            "already_resolved",
            f"This conflict was already resolved ({stored.resolution}).",
            {"status": [stored.status]},
        )
    record = stored.record()
    versions: dict[str, int] = {}
    changelog = ChangeLog(conn, now)
    if resolution == ACCEPT:
        # The engine's lock order (see sync_server.changelog): the row, then the counter.
        key = (record.entity, record.row_id)
        current = changelog.load_rows([key], lock=True)[key]
        changelog.lock_scopes([record.scope])
        if current is not None and current.scope != record.scope:
            raise ApiError(409, "invalid_proposal", "The row is no longer in this scope.")
        candidates = unique_candidates(record, current, registry)
        holders = _holders(conn, registry, record, candidates)
        decision = decide(record, resolution, current, registry, resolver.role, holders)
    else:
        decision = decide(record, resolution, None, registry, resolver.role)
    if decision.refusal is not None:
        refusal = decision.refusal
        status = 403 if refusal.code == "forbidden" else 409
        if refusal.code == "invalid_resolution":
            status = 422
        raise ApiError(status, refusal.code, refusal.message, refusal.details)
    written: int | None = None
    if decision.write is not None:
        write = decision.write
        written = changelog.write(write.entity, write.id, write.scope, write.data, write.changed)
        save(
            conn,
            write.entity,
            write.id,
            write.data,
            version=written,
            created=write.created,
            now=now,
        )
        versions = changelog.finish()
    conn.execute(
        update(conflicts)
        .where(conflicts.c.id == record.id)
        .values(
            status=RESOLVED,
            resolution=resolution,
            resolved_by=resolver.user_id,
            resolved_at=now,
        )
    )
    audit.record(
        conn,
        CONFLICT_RESOLVED,
        actor=resolver.user_id,
        subject=stored.user_id,
        ip=resolver.ip,
        details={
            "conflict_id": record.id,
            "kind": record.kind,
            "entity": record.entity,
            "row_id": record.row_id,
            "resolution": resolution,
            "version": written,
            "note": note,
        },
        now=now,
    )
    return Outcome(get_conflict(conn, record.id, None), versions)


def resolve(
    engine: Engine,
    conflict_id: str,
    resolution: str,
    *,
    resolver: Resolver,
    registry: Registry,
    now: datetime,
    note: str | None = None,
) -> Outcome:
    """Resolve one conflict in a transaction of its own (retried on deadlock as a whole)."""
    try:
        return run_in_transaction(
            engine,
            lambda conn: resolve_in(
                conn,
                conflict_id,
                resolution,
                resolver=resolver,
                registry=registry,
                now=now,
                note=note,
            ),
        )
    except (IntegrityError, DataError) as exc:
        # A constraint the workflow did not foresee: rolled back, and the conflict stays open.
        log.warning("resolving conflict %s refused by the database: %s", conflict_id, exc.orig)
        raise ApiError(
            409,
            "constraint_violation",
            "The database refused the resolution: a value clashes with an existing row.",
        ) from None
