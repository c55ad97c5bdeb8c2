"""Purging expired sessions, challenges and idempotency records keeps what is still live."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sync_server.account_tables import biometric_challenges, idempotency_keys, refresh_tokens
from sync_server.directory import utcnow
from sync_server.housekeeping import purge_expired
from tests.factories import Factory, User


def _count(db: Engine, table: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_purge_removes_only_what_has_expired(
    client: Any, sign_in: Any, staff: User, factory: Factory, db: Engine
) -> None:
    session = sign_in(staff)
    client.post(
        "/api/v1/auth/biometric/challenge",
        json={"device_id": "0b7c8f5e-1111-4c3a-9a43-2f1d7c1a0009"},
    )
    manager = factory.user("manager", [factory.branch()])
    client.post(
        "/api/v1/staff",
        json={
            "email": "x@example.test",
            "password": "basil and thyme forever 9",
            "branch_ids": list(manager.branch_ids),
        },
        headers={**factory.auth(manager), "Idempotency-Key": "k1"},
    )
    assert purge_expired(db) == {
        "refresh_tokens": 0,
        "biometric_challenges": 0,
        "idempotency_keys": 0,
    }
    assert session.get("/api/v1/users/me").status_code == 200
    later = utcnow() + timedelta(days=31)
    assert purge_expired(db, later) == {
        "refresh_tokens": 1,
        "biometric_challenges": 1,
        "idempotency_keys": 1,
    }
    for table in (refresh_tokens, biometric_challenges, idempotency_keys):
        assert _count(db, table) == 0


def test_reencrypt_moves_every_encrypted_value_to_the_newest_key(
    resources: Any, factory: Factory, db: Engine
) -> None:
    from cryptography.fernet import Fernet

    from sync_server.crypto import FieldCipher
    from sync_server.housekeeping import reencrypt
    from sync_server.tables import users

    old, new = Fernet.generate_key(), Fernet.generate_key()
    resources.cipher = FieldCipher([old])
    members = [factory.user("staff", phone=f"+44 7700 90000{i}") for i in range(3)]
    factory.user("staff", phone=None)
    rotated = FieldCipher([new, old])
    assert reencrypt(db, rotated, batch=2) == 3
    only_new = FieldCipher([new])
    with db.connect() as conn:
        for i, member in enumerate(members):
            stored = conn.execute(
                select(users.c.phone_enc).where(users.c.id == member.id)
            ).scalar_one()
            assert only_new.decrypt(stored) == f"+44 7700 90000{i}"
