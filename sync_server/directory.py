"""Branches, staff and devices: the server-owned records, and their publication to devices.

Each function works inside the caller's transaction (it never commits) and writes the synced
image of what it changed to the replication log, so devices see new staff and branches on their
next pull.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from domain.registry import ORG_SCOPE, branch_scope
from domain.roles import Role, parse_role

from .changelog import ChangeLog
from .crypto import FieldCipher
from .passwords import hash_password
from .tables import branches, devices, user_branches, users


class DeviceRefused(Exception):
    """The device may not sync for this user: ``unregistered`` (no such device) or not its
    own (another user's, or revoked). Raised by push and pull before anything else is read."""

    def __init__(self, unregistered: bool) -> None:
        super().__init__("device not registered" if unregistered else "device forbidden")
        self.unregistered = unregistered


class DirectoryError(ValueError):
    """A request the directory cannot honour (unknown branch, duplicate email, …)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def utcnow() -> datetime:
    """Naive UTC (the database columns hold UTC without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Branch:
    id: str
    code: str
    name: str


def create_branch(conn: Connection, code: str, name: str, *, now: datetime | None = None) -> Branch:
    now = now or utcnow()
    code = code.strip()
    if not code or len(code) > 32:
        raise DirectoryError("invalid", "branch code must be 1-32 characters", "code")
    if conn.execute(select(branches.c.id).where(branches.c.code == code)).first():
        raise DirectoryError("already_exists", f"branch {code} already exists", "code")
    branch = Branch(str(uuid.uuid4()), code, name.strip() or code)
    conn.execute(
        insert(branches).values(
            id=branch.id, code=branch.code, name=branch.name, created_at=now, updated_at=now
        )
    )
    log = ChangeLog(conn, now)
    log.lock_scopes([ORG_SCOPE, branch_scope(branch.id)])
    log.write("branches", branch.id, ORG_SCOPE, {"code": branch.code, "name": branch.name})
    log.finish()
    return branch


def branch_ids_for_codes(conn: Connection, codes: Sequence[str]) -> list[str]:
    ids = []
    for code in codes:
        found = conn.execute(select(branches.c.id).where(branches.c.code == code)).scalar()
        if found is None:
            raise DirectoryError("unknown_branch", f"no branch with code {code!r}", "branch")
        ids.append(found)
    return ids


def staff_image(conn: Connection, user_id: str, cipher: FieldCipher) -> dict[str, Any]:
    """The synced image of a staff member (the registry hides contact data from staff)."""
    row = conn.execute(select(users).where(users.c.id == user_id)).one()
    branch_list = sorted(
        conn.execute(
            select(user_branches.c.branch_id).where(user_branches.c.user_id == user_id)
        ).scalars()
    )
    return {
        "display_name": row.display_name,
        "role": row.role,
        "branch_ids": branch_list,
        "active": bool(row.is_active),
        "email": row.email,
        "phone": cipher.decrypt(row.phone_enc) if row.phone_enc else None,
    }


def publish_staff(conn: Connection, user_id: str, cipher: FieldCipher, now: datetime) -> int:
    log = ChangeLog(conn, now)
    log.load_rows([("staff", user_id)], lock=True)  # rows before counters (see changelog)
    log.lock_scopes([ORG_SCOPE])
    version = log.write("staff", user_id, ORG_SCOPE, staff_image(conn, user_id, cipher))
    log.finish()
    return version


def create_user(
    conn: Connection,
    *,
    email: str,
    password: str,
    role: str,
    branch_codes: Sequence[str],
    display_name: str | None,
    cipher: FieldCipher,
    phone: str | None = None,
    username: str | None = None,
    now: datetime | None = None,
) -> str:
    """Create a user in the given branches and publish them to the staff directory."""
    now = now or utcnow()
    parsed = parse_role(role)
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise DirectoryError("invalid", "email is not valid", "email")
    if conn.execute(select(users.c.id).where(users.c.email == email)).first():
        raise DirectoryError("already_exists", f"a user with email {email} exists", "email")
    if parsed is not Role.ADMIN and not branch_codes:
        raise DirectoryError(
            "required", "staff and managers belong to at least one branch", "branch"
        )
    branch_list = branch_ids_for_codes(conn, branch_codes)
    user_id = str(uuid.uuid4())
    conn.execute(
        insert(users).values(
            id=user_id,
            email=email,
            username=username,
            password_hash=hash_password(password),
            role=parsed.value,
            display_name=(display_name or email.split("@")[0]).strip(),
            phone_enc=cipher.encrypt(phone) if phone else None,
            is_active=True,
            biometric_enabled=False,
            token_epoch=0,
            created_at=now,
            updated_at=now,
        )
    )
    for branch_id in branch_list:
        conn.execute(insert(user_branches).values(user_id=user_id, branch_id=branch_id))
    publish_staff(conn, user_id, cipher, now)
    return user_id


class DeviceOwnedElsewhere(Exception):
    pass


def register_device(
    conn: Connection,
    *,
    device_id: str,
    user_id: str,
    branch_id: str | None,
    platform: str,
    app_version: str,
    now: datetime | None = None,
) -> int:
    """Register (or refresh) a device of ``user_id``; returns its last applied seq.

    A device id belongs to one user for life: a phone handed to someone else re-installs (new
    id), so a replay of another user's change-sets can never happen under the wrong identity.
    """
    now = now or utcnow()
    row = conn.execute(
        select(
            devices.c.user_id,
            devices.c.last_applied_seq,
            devices.c.branch_id,
            devices.c.platform,
            devices.c.app_version,
        )
        .where(devices.c.id == device_id)
        .with_for_update()
    ).first()
    if row is not None and row.user_id != user_id:
        raise DeviceOwnedElsewhere(device_id)
    if row is None:
        conn.execute(
            insert(devices).values(
                id=device_id,
                user_id=user_id,
                branch_id=branch_id,
                platform=platform,
                app_version=app_version,
                last_applied_seq=0,
                registered_at=now,
                last_seen_at=now,
            )
        )
        last = 0
    else:
        conn.execute(
            update(devices)
            .where(devices.c.id == device_id)
            .values(platform=platform, app_version=app_version, last_seen_at=now)
        )
        last = int(row.last_applied_seq)
        branch_id = row.branch_id
        if (row.platform, row.app_version) == (platform, app_version):
            return last
    if branch_id is not None:
        log = ChangeLog(conn, now)
        log.load_rows([("devices", device_id)], lock=True)  # rows before counters
        log.lock_scopes([branch_scope(branch_id)])
        log.write(
            "devices",
            device_id,
            branch_scope(branch_id),
            {
                "branch_id": branch_id,
                "user_id": user_id,
                "platform": platform,
                "app_version": app_version,
            },
        )
        log.finish()
    return last
