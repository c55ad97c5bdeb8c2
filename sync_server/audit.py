"""The append-only audit log: who did what to whom, from where, and how it ended.

Entries are written inside the transaction of the change they describe (a role change and its
audit entry commit together or not at all). Events that accompany a refusal (a failed login, a
lockout, a detected refresh-token reuse) are written in a transaction of their own, because the
request itself fails. Nothing here updates or deletes an entry; ``details`` never holds secrets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from .account_tables import audit_log
from .db import run_in_transaction
from .directory import utcnow

# The events recorded; financial events will join them.
LOGIN_SUCCEEDED = "login.succeeded"
LOGIN_FAILED = "login.failed"
ACCOUNT_LOCKED = "login.locked"
TOKEN_FAMILY_REVOKED = "session.family_revoked"
REFRESH_REUSE_DETECTED = "session.refresh_reuse"
LOGOUT = "session.logout"
PASSWORD_CHANGED = "user.password_changed"
BIOMETRIC_ENABLED = "biometric.enabled"
BIOMETRIC_DISABLED = "biometric.disabled"
BIOMETRIC_ENROLLED = "biometric.enrolled"
BIOMETRIC_REVOKED = "biometric.revoked"
ROLE_CHANGED = "user.role_changed"
BRANCHES_CHANGED = "user.branches_changed"
USER_CREATED = "user.created"
USER_DEACTIVATED = "user.deactivated"


@dataclass(frozen=True)
class AuditEntry:
    id: int
    occurred_at: datetime
    event: str
    outcome: str
    actor_user_id: str | None
    subject_user_id: str | None
    ip: str | None
    details: dict[str, Any]


def record(
    conn: Connection,
    event: str,
    *,
    outcome: str = "success",
    actor: str | None = None,
    subject: str | None = None,
    ip: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> None:
    """Append one entry inside the caller's transaction."""
    conn.execute(
        insert(audit_log).values(
            occurred_at=now or utcnow(),
            event=event,
            outcome=outcome,
            actor_user_id=actor,
            subject_user_id=subject,
            ip=(ip or None) and ip[:64],
            details=json.dumps(details or {}, sort_keys=True, default=str),
        )
    )


def record_now(engine: Engine, event: str, **kwargs: Any) -> None:
    """Append one entry in a transaction of its own (for events that accompany a refusal)."""
    run_in_transaction(engine, lambda conn: record(conn, event, **kwargs))


def entries(
    conn: Connection,
    *,
    after_id: int | None = None,
    limit: int = 25,
    event: str | None = None,
    subject: str | None = None,
) -> list[AuditEntry]:
    """Entries newest first, below ``after_id`` (the cursor of the previous page)."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if after_id is not None:
        query = query.where(audit_log.c.id < after_id)
    if event is not None:
        query = query.where(audit_log.c.event == event)
    if subject is not None:
        query = query.where(audit_log.c.subject_user_id == subject)
    return [
        AuditEntry(
            id=int(row.id),
            occurred_at=row.occurred_at,
            event=row.event,
            outcome=row.outcome,
            actor_user_id=row.actor_user_id,
            subject_user_id=row.subject_user_id,
            ip=row.ip,
            details=json.loads(row.details),
        )
        for row in conn.execute(query)
    ]
