"""``/users/me``: the signed-in user's profile and password."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from sync_server import audit
from sync_server.account_tables import refresh_tokens
from sync_server.crypto import FieldCipher
from sync_server.db import run_in_transaction
from sync_server.directory import publish_staff
from sync_server.errors import ApiError
from sync_server.passwords import hash_password, verify_password
from sync_server.ratelimit import too_many
from sync_server.tables import user_branches, users

from . import password_policy, schemas, sessions
from .contract import Context, Reply
from .v1 import api


def load_users(conn: Connection, cipher: FieldCipher, user_ids: list[str]) -> list[schemas.User]:
    """The public representations of ``user_ids`` (in that order; unknown ids are skipped), in
    two queries whatever their number."""
    if not user_ids:
        return []
    rows = {row.id: row for row in conn.execute(select(users).where(users.c.id.in_(user_ids)))}
    memberships: dict[str, list[str]] = {}
    for user_id, branch_id in conn.execute(
        select(user_branches.c.user_id, user_branches.c.branch_id).where(
            user_branches.c.user_id.in_(user_ids)
        )
    ):
        memberships.setdefault(user_id, []).append(branch_id)
    return [
        schemas.User(
            id=row.id,
            email=row.email,
            username=row.username,
            display_name=row.display_name,
            phone=cipher.decrypt(row.phone_enc) if row.phone_enc else None,
            role=row.role,
            branch_ids=sorted(memberships.get(row.id, [])),
            is_active=bool(row.is_active),
            biometric_enabled=bool(row.biometric_enabled),
            last_password_login_at=schemas.utc_or_none(row.last_password_login_at),
            created_at=schemas.utc(row.created_at),
        )
        for row in (rows.get(user_id) for user_id in user_ids)
        if row is not None
    ]


def load_user(conn: Connection, cipher: FieldCipher, user_id: str) -> schemas.User | None:
    """The public representation of a user (contact data decrypted), or None."""
    found = load_users(conn, cipher, [user_id])
    return found[0] if found else None


def session_reply(tokens: sessions.Tokens, user: schemas.User, status: int = 200) -> Reply:
    return Reply(
        schemas.Session(
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            expires_in=tokens.expires_in,
            user=user,
        ),
        status=status,
    )


@api.operation(
    "GET",
    "/users/me",
    access="profile.read",
    summary="The signed-in user's profile",
    tag="users",
    response=schemas.User,
)
def get_me(ctx: Context, _body: None) -> schemas.User:
    with ctx.resources.engine.connect() as conn:
        user = load_user(conn, ctx.resources.cipher, ctx.user.user_id)
        conn.rollback()
    if user is None:  # deleted between authentication and now
        raise ApiError(401, "unauthenticated", "This account no longer exists.")
    return user


@api.operation(
    "PATCH",
    "/users/me",
    access="profile.update",
    summary="Change one's display name or phone (role, branches and email are not changed here)",
    tag="users",
    body=schemas.ProfilePatch,
    response=schemas.User,
    transactional=True,
    forbidden_fields=(
        "role",
        "branch_ids",
        "branches",
        "email",
        "email_verified",
        "is_active",
        "biometric_enabled",
        "username",
        "id",
    ),
)
def patch_me(ctx: Context, body: schemas.ProfilePatch, conn: Connection) -> schemas.User:
    values: dict[str, Any] = {}
    if body.display_name is not UNSET:
        values["display_name"] = body.display_name.strip()
        if not values["display_name"]:
            raise ApiError(422, "validation_error", "Invalid profile.", {"display_name": ["blank"]})
    if body.phone is not UNSET:
        values["phone_enc"] = ctx.resources.cipher.encrypt(body.phone) if body.phone else None
    if values:
        values["updated_at"] = ctx.now
        conn.execute(update(users).where(users.c.id == ctx.user.user_id).values(**values))
        publish_staff(conn, ctx.user.user_id, ctx.resources.cipher, ctx.now)
    user = load_user(conn, ctx.resources.cipher, ctx.user.user_id)
    assert user is not None
    return user


@api.operation(
    "PATCH",
    "/users/me/password",
    access="profile.update",
    summary="Change one's password; signs out the user's other sessions and returns new tokens",
    tag="users",
    body=schemas.PasswordChange,
    response=schemas.Session,
    errors=(429,),
)
def change_password(ctx: Context, body: schemas.PasswordChange) -> Reply:
    engine = ctx.resources.engine
    with engine.connect() as conn:
        row = conn.execute(
            select(users.c.email, users.c.username, users.c.password_hash).where(
                users.c.id == ctx.user.user_id
            )
        ).one()
        conn.rollback()
    lockout = ctx.limiter.policy.lockout
    account_key = row.email.lower()
    locked = ctx.limiter.blocked(lockout, "lockout", account_key)
    if not locked.allowed:
        raise too_many(locked.retry_after, "account_locked", "Too many failed attempts.")
    if not verify_password(row.password_hash, body.current_password):
        ctx.limiter.hit(lockout, "lockout", account_key)
        raise ApiError(
            422,
            "validation_error",
            "The current password is not correct.",
            {"current_password": ["is not correct"]},
        )
    found = password_policy.problems(body.new_password, email=row.email, username=row.username)
    if body.new_password == body.current_password:
        found.append("must differ from the current password")
    if found:
        raise ApiError(
            422, "validation_error", "The new password is not acceptable.", {"new_password": found}
        )
    new_hash = hash_password(body.new_password)

    def work(conn: Connection) -> tuple[sessions.Tokens, schemas.User]:
        user_id = ctx.user.user_id
        current = sessions.session_of(conn, ctx.user.token_id)
        family = current.family_id if current is not None else None
        conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(
                password_hash=new_hash,
                password_changed_at=ctx.now,
                token_epoch=users.c.token_epoch + 1,
                updated_at=ctx.now,
            )
        )
        revoked = sessions.revoke_user_sessions(
            conn,
            user_id,
            "password_changed",
            ctx.now,
            keep_family=family,
            actor=user_id,
            ip=ctx.ip,
        )
        if family is not None:
            # The current session continues with a fresh pair (the old access token carries the
            # previous epoch and stops working).
            conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.family_id == family, refresh_tokens.c.rotated_at.is_(None))
                .values(rotated_at=ctx.now)
            )
        tokens = sessions.issue(
            conn,
            ctx.resources,
            user_id,
            method=current.method if current is not None else sessions.PASSWORD,
            now=ctx.now,
            device_id=ctx.user.device_id,
            family_id=family,
        )
        audit.record(
            conn,
            audit.PASSWORD_CHANGED,
            actor=user_id,
            subject=user_id,
            ip=ctx.ip,
            details={"sessions_revoked": len(revoked)},
            now=ctx.now,
        )
        user = load_user(conn, ctx.resources.cipher, user_id)
        assert user is not None
        return tokens, user

    tokens, user = run_in_transaction(engine, work)
    return session_reply(tokens, user)
