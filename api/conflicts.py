"""``/conflicts``: managers list and resolve the conflicts the sync engine flagged.

Object-level rule: an admin sees every conflict; a manager those of the organisation scope
(menu items, …) and of their own branches. A conflict of another branch answers 404, exactly
like an id that does not exist. Resolving (``accept`` applies the device's proposal as a new
write that devices pull; ``dismiss`` keeps the server's state) is decided by
:mod:`conflict.workflow` and written by :mod:`sync_server.conflicts` in one transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from domain.catalog import default_registry
from sync_server.conflicts import (
    Resolver,
    StoredConflict,
    get_conflict,
    list_conflicts,
    resolve,
    visible_scopes,
)
from sync_server.errors import ApiError

from . import schemas
from .contract import Context, Reply
from .v1 import api

REGISTRY = default_registry()

ConflictKind = Literal[
    "concurrent_update", "update_deleted", "delete_modified", "unique_violation",
    "blocked_by_conflict",
]  # fmt: skip


class ConflictQuery(Struct, kw_only=True):
    status: Literal["open", "resolved", "all"] = "open"


class ConflictResolve(schemas.Request):
    """``accept`` applies the device's proposal now; ``dismiss`` keeps the server's state."""

    resolution: Literal["accept", "dismiss"]
    note: Annotated[str, Meta(max_length=500)] | None = None


class Conflict(Struct, kw_only=True):
    id: str
    scope: str
    entity: str
    row_id: str
    kind: ConflictKind
    device_id: str | None
    user_id: str | None
    change_set_id: str | None
    op_index: int | None
    base_version: int | None
    server_version: int | None
    proposed: dict[str, Any]
    server_state: dict[str, Any]
    status: Literal["open", "resolved"]
    resolution: Literal["accept", "dismiss"] | None
    resolved_by: str | None
    created_at: datetime
    resolved_at: datetime | None


class ConflictResolution(Struct, kw_only=True):
    conflict: Conflict
    #: scope -> the version the resolution wrote at ({} when it wrote nothing).
    versions: dict[str, int]


def _conflict(c: StoredConflict) -> Conflict:
    return Conflict(
        id=c.id,
        scope=c.scope,
        entity=c.entity,
        row_id=c.row_id,
        kind=c.kind,  # type: ignore[arg-type]  # stored by the planner: one of ConflictKind
        device_id=c.device_id,
        user_id=c.user_id,
        change_set_id=c.change_set_id,
        op_index=c.op_index,
        base_version=c.base_version,
        server_version=c.server_version,
        proposed=c.proposed,
        server_state=c.server_state,
        status=c.status,  # type: ignore[arg-type]
        resolution=c.resolution,  # type: ignore[arg-type]
        resolved_by=c.resolved_by,
        created_at=schemas.utc(c.created_at),
        resolved_at=schemas.utc_or_none(c.resolved_at),
    )


def _cursor(after: Any) -> tuple[datetime, str] | None:
    if after is None:
        return None
    try:
        moment, last_id = after
        if not isinstance(moment, str) or not isinstance(last_id, str):
            raise TypeError
        return datetime.fromisoformat(moment), last_id
    except (TypeError, ValueError):
        raise ApiError(
            422, "validation_error", "Invalid cursor.", {"cursor": ["invalid"]}
        ) from None


@api.operation(
    "GET",
    "/conflicts",
    access="conflicts.read",
    summary="Conflicts of the caller's branches and the organisation, oldest first, paginated",
    tag="conflicts",
    query=ConflictQuery,
    response=list[Conflict],
    paginated=True,
)
def list_conflicts_op(ctx: Context, _body: None) -> Reply:
    assert ctx.page is not None
    after = _cursor(ctx.page.after)
    status = None if ctx.query.status == "all" else ctx.query.status
    scopes = visible_scopes(ctx.user.role, ctx.user.branch_ids)
    with ctx.resources.engine.connect() as conn:
        rows = list_conflicts(conn, scopes, status=status, after=after, limit=ctx.page.limit + 1)
        conn.rollback()
    rows, meta = ctx.page.meta(rows, key=lambda c: [c.created_at.isoformat(), c.id])
    return Reply([_conflict(c) for c in rows], meta)


@api.operation(
    "GET",
    "/conflicts/{conflict_id}",
    access="conflicts.read",
    summary="One conflict of the caller's branches or the organisation",
    tag="conflicts",
    response=Conflict,
    errors=(404,),
)
def get_conflict_op(ctx: Context, _body: None) -> Conflict:
    scopes = visible_scopes(ctx.user.role, ctx.user.branch_ids)
    with ctx.resources.engine.connect() as conn:
        stored = get_conflict(conn, ctx.path["conflict_id"], scopes)
        conn.rollback()
    return _conflict(stored)


@api.operation(
    "POST",
    "/conflicts/{conflict_id}/resolve",
    access="conflicts.resolve",
    summary="Resolve a conflict: accept the device's proposal (a new write) or dismiss it",
    tag="conflicts",
    body=ConflictResolve,
    response=ConflictResolution,
    errors=(403, 404, 409),
)
def resolve_conflict_op(ctx: Context, body: ConflictResolve) -> ConflictResolution:
    user = ctx.user
    outcome = resolve(
        ctx.resources.engine,
        ctx.path["conflict_id"],
        body.resolution,
        resolver=Resolver(user.user_id, user.role, user.branch_ids, ctx.ip),
        registry=REGISTRY,
        now=ctx.now,
        note=body.note,
    )
    # After the commit: tell live pulls the scope moved on (as a push does).
    for scope, version in outcome.versions.items():
        ctx.resources.pubsub.publish(f"galley:scope:{scope}", str(version).encode())
    return ConflictResolution(conflict=_conflict(outcome.conflict), versions=outcome.versions)
