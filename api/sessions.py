"""Sessions: an access token (JWT, ≤ 15 min) plus an opaque refresh token, rotated on every use.

A sign-in starts a *family*. Each refresh marks the presented refresh token rotated and issues the
next one in the same family; presenting a rotated token again means two parties hold it (one of
them stole it), so the whole family is revoked and the event audited: both the thief and the
victim must sign in again. Only SHA-256 digests of refresh tokens are stored. Revoking a family
also kills the access tokens issued with it at once (``authn.load_identity`` checks).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine, Row

from domain.roles import Role
from sync_server import audit
from sync_server.account_tables import refresh_tokens
from sync_server.db import run_in_transaction
from sync_server.errors import ApiError
from sync_server.resources import Resources
from sync_server.tables import branches, user_branches, users

PASSWORD = "password"
BIOMETRIC = "biometric"


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int
    family_id: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _branch_ids(conn: Connection, user_id: str, role: str) -> list[str]:
    if role == Role.ADMIN.value:
        return sorted(conn.execute(select(branches.c.id)).scalars())
    return sorted(
        conn.execute(
            select(user_branches.c.branch_id).where(user_branches.c.user_id == user_id)
        ).scalars()
    )


def issue(
    conn: Connection,
    resources: Resources,
    user_id: str,
    *,
    method: str,
    now: datetime,
    device_id: str | None = None,
    family_id: str | None = None,
) -> Tokens:
    """Mint an access token and the next refresh token of ``family_id`` (a new family if None)."""
    user = conn.execute(
        select(users.c.role, users.c.token_epoch).where(users.c.id == user_id)
    ).one()
    access = resources.tokens.mint(
        user_id=user_id,
        role=user.role,
        branch_ids=_branch_ids(conn, user_id, user.role),
        epoch=int(user.token_epoch),
        device_id=device_id,
    )
    refresh = secrets.token_urlsafe(32)
    family = family_id or str(uuid.uuid4())
    conn.execute(
        insert(refresh_tokens).values(
            id=str(uuid.uuid4()),
            family_id=family,
            user_id=user_id,
            token_hash=digest(refresh),
            access_jti=resources.tokens.verify(access).token_id,
            method=method,
            device_id=device_id,
            issued_at=now,
            expires_at=now + timedelta(seconds=resources.settings.refresh_token_ttl_seconds),
        )
    )
    return Tokens(access, refresh, resources.tokens.ttl, family)


def revoke_family(conn: Connection, family_id: str, reason: str, now: datetime) -> int:
    return int(
        conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason=reason)
        ).rowcount
    )


def revoke_user_sessions(
    conn: Connection,
    user_id: str,
    reason: str,
    now: datetime,
    *,
    keep_family: str | None = None,
    actor: str | None = None,
    ip: str | None = None,
) -> list[str]:
    """Revoke every session of ``user_id`` (but ``keep_family``), audited; the families revoked."""
    query = select(refresh_tokens.c.family_id).where(
        refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None)
    )
    if keep_family is not None:
        query = query.where(refresh_tokens.c.family_id != keep_family)
    families = sorted(set(conn.execute(query).scalars()))
    for family in families:
        revoke_family(conn, family, reason, now)
    if families:
        audit.record(
            conn,
            audit.TOKEN_FAMILY_REVOKED,
            actor=actor,
            subject=user_id,
            ip=ip,
            details={"reason": reason, "family_ids": families},
            now=now,
        )
    return families


def session_of(conn: Connection, access_jti: str) -> Row[Any, Any, Any] | None:
    """(id, family_id, method) of the session that issued the access token ``access_jti``."""
    return conn.execute(
        select(refresh_tokens.c.id, refresh_tokens.c.family_id, refresh_tokens.c.method).where(
            refresh_tokens.c.access_jti == access_jti
        )
    ).first()


def owner_of(engine: Engine, presented: str) -> str | None:
    """The user a refresh token was issued to (for per-account rate limits), if any."""
    with engine.connect() as conn:
        owner = conn.execute(
            select(refresh_tokens.c.user_id).where(refresh_tokens.c.token_hash == digest(presented))
        ).scalar()
        conn.rollback()
    return owner


def invalid_refresh() -> ApiError:
    return ApiError(401, "invalid_refresh_token", "The refresh token is invalid; sign in again.")


def rotate(resources: Resources, presented: str, *, ip: str, now: datetime) -> tuple[str, Tokens]:
    """Exchange a refresh token for a new pair; returns (user id, tokens).

    Reuse of a rotated token revokes the family; that revocation commits although the request
    fails, so it runs as a transaction that returns the decision and raises afterwards.
    """

    def work(conn: Connection) -> tuple[str, Tokens] | str:
        row = conn.execute(
            select(refresh_tokens)
            .where(refresh_tokens.c.token_hash == digest(presented))
            .with_for_update()
        ).first()
        if row is None or row.revoked_at is not None or row.expires_at <= now:
            return "invalid"
        if row.rotated_at is not None:
            revoked = revoke_family(conn, row.family_id, "refresh_reuse", now)
            details = {"family_id": row.family_id, "sessions_revoked": revoked}
            audit.record(
                conn,
                audit.REFRESH_REUSE_DETECTED,
                outcome="refused",
                subject=row.user_id,
                ip=ip,
                details=details,
                now=now,
            )
            audit.record(
                conn,
                audit.TOKEN_FAMILY_REVOKED,
                subject=row.user_id,
                ip=ip,
                details={**details, "reason": "refresh_reuse"},
                now=now,
            )
            return "reused"
        active = conn.execute(select(users.c.is_active).where(users.c.id == row.user_id)).scalar()
        if not active:
            return "invalid"
        conn.execute(
            update(refresh_tokens).where(refresh_tokens.c.id == row.id).values(rotated_at=now)
        )
        tokens = issue(
            conn,
            resources,
            row.user_id,
            method=row.method,
            now=now,
            device_id=row.device_id,
            family_id=row.family_id,
        )
        return row.user_id, tokens

    outcome = run_in_transaction(resources.engine, work)
    if outcome == "reused":
        raise ApiError(
            401,
            "refresh_token_reused",
            "This refresh token was already used; every session it belongs to is signed out.",
        )
    if isinstance(outcome, str):
        raise invalid_refresh()
    return outcome
