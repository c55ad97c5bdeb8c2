"""``/auth``: password sign-in, refresh-token rotation and sign-out.

Sign-in attempts are rate limited per IP and per account and, after repeated failures, the
account is locked for a while (``sync_server.ratelimit``); every attempt, success or failure, and
every lockout is audited. An unknown account costs the same password-hash time as a known one and
gets the same answer, so the endpoint does not reveal who has an account.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from sync_server import audit
from sync_server.account_tables import refresh_tokens
from sync_server.db import run_in_transaction
from sync_server.errors import ApiError
from sync_server.passwords import DUMMY_HASH, hash_password, needs_rehash, verify_password
from sync_server.ratelimit import too_many
from sync_server.tables import devices, users

from . import schemas, sessions
from .contract import Context, Reply
from .users import load_user, session_reply
from .v1 import api


def _invalid_credentials() -> ApiError:
    return ApiError(401, "invalid_credentials", "The email/username or password is not correct.")


def check_lockout(ctx: Context, account_key: str, subject: str | None) -> None:
    """Refuse (429, audited) while the account is locked after repeated failures."""
    locked = ctx.limiter.blocked(ctx.limiter.policy.lockout, "lockout", account_key)
    if not locked.allowed:
        audit.record_now(
            ctx.resources.engine,
            audit.LOGIN_FAILED,
            outcome="locked",
            subject=subject,
            ip=ctx.ip,
            details={"reason": "account_locked"},
            now=ctx.now,
        )
        raise too_many(
            locked.retry_after,
            "account_locked",
            f"Too many failed attempts; try again in {locked.retry_after} seconds.",
        )


def count_failure(ctx: Context, account_key: str, subject: str | None, method: str) -> None:
    """Record a failed attempt (audited); the attempt that reaches the limit locks the account."""
    policy = ctx.limiter.policy
    ctx.limiter.hit(policy.lockout, "lockout", account_key)
    now_locked = not ctx.limiter.blocked(policy.lockout, "lockout", account_key).allowed

    def work(conn: Connection) -> None:
        audit.record(
            conn,
            audit.LOGIN_FAILED,
            outcome="failure",
            subject=subject,
            ip=ctx.ip,
            details={"method": method, "known_account": subject is not None},
            now=ctx.now,
        )
        if now_locked:
            audit.record(
                conn,
                audit.ACCOUNT_LOCKED,
                outcome="locked",
                subject=subject,
                ip=ctx.ip,
                details={"method": method, "policy": policy.lockout},
                now=ctx.now,
            )

    run_in_transaction(ctx.resources.engine, work)


def _check_device(conn: Connection, device_id: str | None, user_id: str) -> None:
    if device_id is None:
        return
    owner = conn.execute(select(devices.c.user_id).where(devices.c.id == device_id)).scalar()
    if owner is not None and owner != user_id:
        raise ApiError(
            409,
            "device_owned_by_other_user",
            "This device id belongs to another user.",
            {"device_id": ["belongs to another user"]},
        )


def open_session(
    conn: Connection, ctx: Context, user_id: str, *, method: str, device_id: str | None
) -> tuple[sessions.Tokens, schemas.User]:
    """A successful sign-in (password or biometric): a new token family, its audit entry and
    the profile to answer with, in the caller's transaction."""
    tokens = sessions.issue(
        conn, ctx.resources, user_id, method=method, now=ctx.now, device_id=device_id
    )
    audit.record(
        conn,
        audit.LOGIN_SUCCEEDED,
        actor=user_id,
        subject=user_id,
        ip=ctx.ip,
        details={"method": method, "family_id": tokens.family_id},
        now=ctx.now,
    )
    user = load_user(conn, ctx.resources.cipher, user_id)
    assert user is not None
    return tokens, user


@api.operation(
    "POST",
    "/auth/login",
    access="public",
    summary="Sign in with email or username and password",
    tag="auth",
    body=schemas.LoginRequest,
    response=schemas.Session,
    errors=(401, 429),
)
def login(ctx: Context, body: schemas.LoginRequest) -> Reply:
    if (body.email is None) == (body.username is None):
        raise ApiError(
            422,
            "validation_error",
            "Send either email or username.",
            {"email": ["exactly one of email or username is required"]},
        )
    policy = ctx.limiter.policy
    ctx.limiter.enforce(policy.login_per_ip, "login-ip", ctx.ip)
    match = (
        users.c.email == body.email.strip().lower()
        if body.email is not None
        else users.c.username == body.username
    )
    with ctx.resources.engine.connect() as conn:
        row = conn.execute(
            select(users.c.id, users.c.email, users.c.password_hash, users.c.is_active).where(match)
        ).first()
        conn.rollback()
    # One counter per account whichever identifier was used (per identifier for unknown ones).
    account_key = row.email if row is not None else (body.email or body.username or "").lower()
    ctx.limiter.enforce(policy.login_per_account, "login-account", account_key)
    subject = row.id if row is not None else None
    check_lockout(ctx, account_key, subject)
    password_ok = verify_password(row.password_hash if row else DUMMY_HASH, body.password)
    if row is None or not password_ok or not row.is_active:
        count_failure(ctx, account_key, subject, "password")
        raise _invalid_credentials()
    ctx.limiter.clear(policy.lockout, "lockout", account_key)
    user_id: str = row.id
    rehash = hash_password(body.password) if needs_rehash(row.password_hash) else None

    def work(conn: Connection) -> tuple[sessions.Tokens, schemas.User]:
        _check_device(conn, body.device_id, user_id)
        values: dict[str, object] = {"last_password_login_at": ctx.now}
        if rehash is not None:
            values["password_hash"] = rehash
        conn.execute(update(users).where(users.c.id == user_id).values(**values))
        device_id = body.device_id.lower() if body.device_id else None
        return open_session(conn, ctx, user_id, method=sessions.PASSWORD, device_id=device_id)

    tokens, user = run_in_transaction(ctx.resources.engine, work)
    return session_reply(tokens, user)


@api.operation(
    "POST",
    "/auth/refresh",
    access="public",
    summary="Exchange a refresh token for a new pair (the presented one is rotated)",
    tag="auth",
    body=schemas.RefreshRequest,
    response=schemas.Session,
    errors=(401, 429),
)
def refresh(ctx: Context, body: schemas.RefreshRequest) -> Reply:
    policy = ctx.limiter.policy
    ctx.limiter.enforce(policy.refresh_per_ip, "refresh-ip", ctx.ip)
    owner = sessions.owner_of(ctx.resources.engine, body.refresh_token)
    if owner is not None:
        ctx.limiter.enforce(policy.refresh_per_account, "refresh-account", owner)
    user_id, tokens = sessions.rotate(ctx.resources, body.refresh_token, ip=ctx.ip, now=ctx.now)
    with ctx.resources.engine.connect() as conn:
        user = load_user(conn, ctx.resources.cipher, user_id)
        conn.rollback()
    assert user is not None
    return session_reply(tokens, user)


@api.operation(
    "POST",
    "/auth/logout",
    access="authenticated",
    summary="Sign out: revoke the session of the given refresh token (and its access tokens)",
    tag="auth",
    body=schemas.LogoutRequest,
    status=204,
    transactional=True,
    errors=(401,),
)
def logout(ctx: Context, body: schemas.LogoutRequest, conn: Connection) -> Reply:
    row = conn.execute(
        select(refresh_tokens.c.family_id, refresh_tokens.c.user_id).where(
            refresh_tokens.c.token_hash == sessions.digest(body.refresh_token)
        )
    ).first()
    if row is None or row.user_id != ctx.user.user_id:
        raise sessions.invalid_refresh()
    sessions.revoke_family(conn, row.family_id, "logout", ctx.now)
    for event in (audit.LOGOUT, audit.TOKEN_FAMILY_REVOKED):
        audit.record(
            conn,
            event,
            actor=ctx.user.user_id,
            subject=ctx.user.user_id,
            ip=ctx.ip,
            details={"reason": "logout", "family_ids": [row.family_id]},
            now=ctx.now,
        )
    return Reply(status=204)
