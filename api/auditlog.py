"""``/audit``: reading the append-only audit log (admins)."""

from __future__ import annotations

from sync_server import audit
from sync_server.errors import ApiError

from . import schemas
from .contract import Context, Reply
from .v1 import api


@api.operation(
    "GET",
    "/audit",
    access="audit.read",
    summary="Audit log entries, newest first, cursor-paginated",
    tag="audit",
    query=schemas.AuditQuery,
    response=list[schemas.AuditEntry],
    paginated=True,
)
def list_audit(ctx: Context, _body: None) -> Reply:
    assert ctx.page is not None
    after = ctx.page.after
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise ApiError(422, "validation_error", "Invalid cursor.", {"cursor": ["invalid"]})
    with ctx.resources.engine.connect() as conn:
        rows = audit.entries(
            conn,
            after_id=after,
            limit=ctx.page.limit + 1,
            event=ctx.query.event,
            subject=ctx.query.subject_user_id,
        )
        conn.rollback()
    rows, meta = ctx.page.meta(rows, key=lambda entry: entry.id)
    data = [
        schemas.AuditEntry(
            id=e.id,
            occurred_at=schemas.utc(e.occurred_at),
            event=e.event,
            outcome=e.outcome,
            actor_user_id=e.actor_user_id,
            subject_user_id=e.subject_user_id,
            ip=e.ip,
            details=e.details,
        )
        for e in rows
    ]
    return Reply(data, meta)
