"""``/staff``: managers and admins manage the staff of their branches.

Object-level rule, applied by every operation that takes a user id: an admin sees everyone; a
manager sees a user only when they share a branch, and changes only staff members (never another
manager or an admin). Anything outside that answers 404, exactly like an id that does not exist,
so a manager of branch A learns nothing about branch B. Nobody changes their own role, branches
or status here.

Changes that alter what a token says (role, branches, deactivation) bump ``token_epoch``, so the
user's outstanding access tokens stop working at once — on the sync endpoint too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from msgspec import UNSET
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from domain.roles import Role
from sync_server import audit
from sync_server.account_tables import biometric_credentials
from sync_server.authn import Identity
from sync_server.directory import DirectoryError, create_user, publish_staff
from sync_server.errors import ApiError
from sync_server.tables import branches, user_branches, users

from . import password_policy, schemas, sessions
from .contract import Context, Reply, not_found
from .users import load_user, load_users
from .v1 import api

_RANK = {Role.STAFF.value: 0, Role.MANAGER.value: 1, Role.ADMIN.value: 2}


def _target(conn: Connection, actor: Identity, user_id: str, *, lock: bool = False) -> Any:
    """The user row ``actor`` may see, or a 404 (also for an id outside the actor's branches)."""
    query = select(users).where(users.c.id == user_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise not_found("user")
    if actor.role is Role.ADMIN:
        return row
    shared = conn.execute(
        select(user_branches.c.branch_id)
        .where(user_branches.c.user_id == user_id)
        .where(user_branches.c.branch_id.in_(sorted(actor.branch_ids)))
        .limit(1)
    ).first()
    if shared is None or row.role == Role.ADMIN.value:
        raise not_found("user")
    return row


def _check_may_change(actor: Identity, target: Any) -> None:
    if target.id == actor.user_id:
        raise ApiError(403, "forbidden", "You cannot change your own account here.")
    if actor.role is not Role.ADMIN and _RANK[target.role] >= _RANK[actor.role.value]:
        raise ApiError(403, "forbidden", "Only an admin can change a manager or an admin.")


def _check_role(actor: Identity, role: str) -> None:
    if actor.role is not Role.ADMIN and _RANK[role] >= _RANK[actor.role.value]:
        raise ApiError(
            403,
            "forbidden",
            "You can only give roles below your own.",
            {"role": [f"{role} needs an admin"]},
        )


def _check_branches(conn: Connection, actor: Identity, branch_ids: list[str]) -> list[str]:
    wanted = sorted({b.lower() for b in branch_ids})
    outside = [b for b in wanted if b not in actor.branch_ids]
    if outside and actor.role is not Role.ADMIN:
        raise ApiError(
            403,
            "forbidden",
            "You can only assign your own branches.",
            {"branch_ids": ["includes a branch you do not manage"]},
        )
    known = set(conn.execute(select(branches.c.id).where(branches.c.id.in_(wanted))).scalars())
    unknown = [b for b in wanted if b not in known]
    if unknown:
        raise ApiError(
            422, "validation_error", "Unknown branch.", {"branch_ids": ["unknown branch id"]}
        )
    return wanted


def _bump_epoch(conn: Connection, user_id: str, now: Any) -> None:
    conn.execute(
        update(users)
        .where(users.c.id == user_id)
        .values(token_epoch=users.c.token_epoch + 1, updated_at=now)
    )


def _user(ctx: Context, conn: Connection, user_id: str) -> schemas.User:
    user = load_user(conn, ctx.resources.cipher, user_id)
    assert user is not None
    return user


@api.operation(
    "GET",
    "/staff",
    access="staff.read",
    summary="List the staff of the caller's branches (admins: everyone), cursor-paginated",
    tag="staff",
    query=schemas.StaffQuery,
    response=list[schemas.User],
    paginated=True,
)
def list_staff(ctx: Context, _body: None) -> Reply:
    assert ctx.page is not None
    actor = ctx.user
    query = select(users.c.id).order_by(users.c.id).limit(ctx.page.limit + 1)
    if ctx.page.after is not None:
        if not isinstance(ctx.page.after, str):
            raise ApiError(422, "validation_error", "Invalid cursor.", {"cursor": ["invalid"]})
        query = query.where(users.c.id > ctx.page.after)
    branch_filter = ctx.query.branch_id.lower() if ctx.query.branch_id else None
    if actor.role is not Role.ADMIN:
        visible = sorted(actor.branch_ids)
        if branch_filter is not None:
            visible = [branch_filter] if branch_filter in actor.branch_ids else []
        members = select(user_branches.c.user_id).where(user_branches.c.branch_id.in_(visible))
        query = query.where(users.c.id.in_(members))
    elif branch_filter is not None:
        members = select(user_branches.c.user_id).where(user_branches.c.branch_id == branch_filter)
        query = query.where(users.c.id.in_(members))
    with ctx.resources.engine.connect() as conn:
        ids = list(conn.execute(query).scalars())
        ids, meta = ctx.page.meta(ids, key=lambda user_id: user_id)
        data = load_users(conn, ctx.resources.cipher, ids)
        conn.rollback()
    return Reply(data, meta)


@api.operation(
    "POST",
    "/staff",
    access="staff.create",
    summary="Create a staff member in the caller's branches (Idempotency-Key supported)",
    tag="staff",
    body=schemas.StaffCreate,
    response=schemas.User,
    status=201,
    transactional=True,
    idempotent=True,
)
def create_staff(ctx: Context, body: schemas.StaffCreate, conn: Connection) -> schemas.User:
    actor = ctx.user
    _check_role(actor, body.role)
    branch_ids = _check_branches(conn, actor, body.branch_ids)
    problems = password_policy.problems(body.password, email=body.email, username=body.username)
    if problems:
        raise ApiError(422, "validation_error", "Invalid password.", {"password": problems})
    codes = [
        code
        for code in conn.execute(
            select(branches.c.code).where(branches.c.id.in_(branch_ids)).order_by(branches.c.code)
        ).scalars()
    ]
    if (
        body.username is not None
        and conn.execute(select(users.c.id).where(users.c.username == body.username)).first()
    ):
        raise ApiError(409, "already_exists", "Username taken.", {"username": ["already taken"]})
    try:
        user_id = create_user(
            conn,
            email=body.email,
            password=body.password,
            role=body.role,
            branch_codes=codes,
            display_name=body.display_name,
            cipher=ctx.resources.cipher,
            phone=body.phone,
            username=body.username,
            now=ctx.now,
        )
    except DirectoryError as exc:
        status = 409 if exc.code == "already_exists" else 422
        raise ApiError(status, exc.code, str(exc), {exc.field or "_": [str(exc)]}) from None
    audit.record(
        conn,
        audit.USER_CREATED,
        actor=actor.user_id,
        subject=user_id,
        ip=ctx.ip,
        details={"role": body.role, "branch_ids": branch_ids},
        now=ctx.now,
    )
    return _user(ctx, conn, user_id)


@api.operation(
    "GET",
    "/staff/{user_id}",
    access="staff.read",
    summary="One staff member of the caller's branches",
    tag="staff",
    response=schemas.User,
    errors=(404,),
)
def get_staff(ctx: Context, _body: None) -> schemas.User:
    with ctx.resources.engine.connect() as conn:
        target = _target(conn, ctx.user, ctx.path["user_id"])
        user = _user(ctx, conn, target.id)
        conn.rollback()
    return user


@api.operation(
    "PATCH",
    "/staff/{user_id}",
    access="staff.update",
    summary="Set role, branches, display name or biometric permission of a staff member",
    tag="staff",
    body=schemas.StaffPatch,
    response=schemas.User,
    transactional=True,
    errors=(403, 404),
)
def patch_staff(ctx: Context, body: schemas.StaffPatch, conn: Connection) -> schemas.User:
    actor = ctx.user
    target = _target(conn, actor, ctx.path["user_id"], lock=True)
    _check_may_change(actor, target)
    values: dict[str, Any] = {}
    revoke_tokens = False
    if body.role is not UNSET and body.role != target.role:
        _check_role(actor, body.role)
        values["role"] = body.role
        revoke_tokens = True
        audit.record(
            conn,
            audit.ROLE_CHANGED,
            actor=actor.user_id,
            subject=target.id,
            ip=ctx.ip,
            details={"from": target.role, "to": body.role},
            now=ctx.now,
        )
    if body.branch_ids is not UNSET:
        requested = _check_branches(conn, actor, body.branch_ids)
        current = set(
            conn.execute(
                select(user_branches.c.branch_id).where(user_branches.c.user_id == target.id)
            ).scalars()
        )
        # A manager edits only the memberships of their own branches; others stay as they are.
        kept = {b for b in current if b not in actor.branch_ids and actor.role is not Role.ADMIN}
        final = kept | set(requested)
        role = values.get("role", target.role)
        if not final and role != Role.ADMIN.value:
            raise ApiError(
                422,
                "validation_error",
                "Staff and managers belong to at least one branch.",
                {"branch_ids": ["at least one branch is required"]},
            )
        if final != current:
            conn.execute(delete(user_branches).where(user_branches.c.user_id == target.id))
            for branch_id in sorted(final):
                conn.execute(insert(user_branches).values(user_id=target.id, branch_id=branch_id))
            revoke_tokens = True
            audit.record(
                conn,
                audit.BRANCHES_CHANGED,
                actor=actor.user_id,
                subject=target.id,
                ip=ctx.ip,
                details={"from": sorted(current), "to": sorted(final)},
                now=ctx.now,
            )
    if body.display_name is not UNSET:
        values["display_name"] = body.display_name.strip() or target.display_name
    if body.biometric_enabled is not UNSET and body.biometric_enabled != target.biometric_enabled:
        values["biometric_enabled"] = body.biometric_enabled
        if not body.biometric_enabled:
            _revoke_biometric_keys(conn, target.id, ctx.now)
        audit.record(
            conn,
            audit.BIOMETRIC_ENABLED if body.biometric_enabled else audit.BIOMETRIC_DISABLED,
            actor=actor.user_id,
            subject=target.id,
            ip=ctx.ip,
            now=ctx.now,
        )
    if values:
        values["updated_at"] = ctx.now
        conn.execute(update(users).where(users.c.id == target.id).values(**values))
    if revoke_tokens:
        _bump_epoch(conn, target.id, ctx.now)
    if values or revoke_tokens:
        publish_staff(conn, target.id, ctx.resources.cipher, ctx.now)
    return _user(ctx, conn, target.id)


def _revoke_biometric_keys(conn: Connection, user_id: str, now: datetime) -> None:
    """Every enrolled key of the user stops signing in (biometric disabled, or deactivated)."""
    conn.execute(
        update(biometric_credentials)
        .where(
            biometric_credentials.c.user_id == user_id,
            biometric_credentials.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


@api.operation(
    "POST",
    "/staff/{user_id}/deactivate",
    access="staff.deactivate",
    summary="Deactivate a staff member: their tokens stop working at once, sync included",
    tag="staff",
    response=schemas.User,
    transactional=True,
    errors=(403, 404),
)
def deactivate_staff(ctx: Context, _body: None, conn: Connection) -> schemas.User:
    actor = ctx.user
    target = _target(conn, actor, ctx.path["user_id"], lock=True)
    _check_may_change(actor, target)
    if target.is_active:
        conn.execute(
            update(users)
            .where(users.c.id == target.id)
            .values(is_active=False, token_epoch=users.c.token_epoch + 1, updated_at=ctx.now)
        )
        revoked = sessions.revoke_user_sessions(
            conn, target.id, "deactivated", ctx.now, actor=actor.user_id, ip=ctx.ip
        )
        _revoke_biometric_keys(conn, target.id, ctx.now)
        audit.record(
            conn,
            audit.USER_DEACTIVATED,
            actor=actor.user_id,
            subject=target.id,
            ip=ctx.ip,
            details={"sessions_revoked": len(revoked)},
            now=ctx.now,
        )
        publish_staff(conn, target.id, ctx.resources.cipher, ctx.now)
    return _user(ctx, conn, target.id)
