"""Data protection: the audit log cannot be rewritten; encrypted columns survive key rotation."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from sync_server import audit
from sync_server.account_tables import audit_log
from sync_server.app import create_app
from sync_server.crypto import FieldCipher
from sync_server.resources import Resources
from tests.factories import Factory


def test_the_audit_log_refuses_updates(db: Engine) -> None:
    with db.begin() as conn:
        audit.record(conn, audit.LOGIN_FAILED, outcome="failure", ip="203.0.113.9")
    with pytest.raises(DBAPIError), db.begin() as conn:
        conn.execute(update(audit_log).values(outcome="success"))
    with db.connect() as conn:
        assert conn.execute(select(audit_log.c.outcome)).scalar_one() == "failure"


def test_contact_data_written_under_an_old_key_reads_after_rotation(
    resources: Resources, factory: Factory
) -> None:
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    resources.settings = replace(resources.settings, encryption_keys=(old_key,))
    resources.cipher = FieldCipher.from_settings(resources.settings)
    user = factory.user("staff", phone="+44 7700 900123")
    # Rotation: the new key first (it encrypts), the old one still listed (it decrypts).
    resources.settings = replace(resources.settings, encryption_keys=(new_key, old_key))
    resources.cipher = FieldCipher.from_settings(resources.settings)
    with TestClient(create_app(resources=resources)) as client:
        me = client.get("/api/v1/users/me", headers=factory.auth(user))
        assert me.json()["data"]["phone"] == "+44 7700 900123"
        changed = client.patch(
            "/api/v1/users/me", json={"phone": "+44 7700 900456"}, headers=factory.auth(user)
        )
        assert changed.status_code == 200
    # What is written now is readable with the new key alone.
    from sync_server.tables import users

    with resources.engine.connect() as conn:
        stored = conn.execute(select(users.c.phone_enc).where(users.c.id == user.id)).scalar_one()
    assert FieldCipher([new_key.encode()]).decrypt(stored) == "+44 7700 900456"


def test_audit_entries_never_hold_passwords_or_tokens(
    client: Any, factory: Factory, db: Engine
) -> None:
    user = factory.user("staff")
    client.post("/api/v1/auth/login", json={"email": user.email, "password": "wrong password 1"})
    ok = client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
    tokens = ok.json()["data"]
    with db.connect() as conn:
        text = " ".join(str(tuple(row)) for row in conn.execute(select(audit_log)))
    for secret in (
        "wrong password 1",
        user.password,
        tokens["refresh_token"],
        tokens["access_token"],
    ):
        assert secret not in text
