"""/users/me: reading and changing one's own profile and password."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from sync_server.account_tables import audit_log
from sync_server.tables import sync_rows, users
from tests.api.conftest import login
from tests.factories import User

NEW_PASSWORD = "plum tart under the grill 42"


def test_me_returns_the_profile_with_contact_data_decrypted(sign_in: Any, staff: User) -> None:
    response = sign_in(staff).get("/api/v1/users/me")
    assert response.status_code == 200
    body = response.json()
    assert body["meta"] is None
    assert body["data"]["phone"] == "+44 20 7946 0999"
    assert body["data"]["biometric_enabled"] is False


def test_contact_data_is_encrypted_at_rest(sign_in: Any, staff: User, db: Engine) -> None:
    sign_in(staff).patch("/api/v1/users/me", json={"phone": "+33 1 23 45 67 89"})
    with db.connect() as conn:
        stored = conn.execute(select(users.c.phone_enc).where(users.c.id == staff.id)).scalar()
    assert stored and "23 45" not in stored


def test_me_without_a_token_is_a_401(client: Any) -> None:
    response = client.get("/api/v1/users/me")
    assert response.status_code == 401
    assert set(response.json()) == {"code", "message", "details"}


def test_patch_me_changes_name_and_phone_and_republishes_the_staff_row(
    sign_in: Any, staff: User, db: Engine
) -> None:
    session = sign_in(staff)
    with db.connect() as conn:
        before = conn.execute(
            select(sync_rows.c.version).where(sync_rows.c.row_id == staff.id)
        ).scalar()
    response = session.patch("/api/v1/users/me", json={"display_name": "Sam", "phone": None})
    assert response.status_code == 200
    assert response.json()["data"]["display_name"] == "Sam"
    assert response.json()["data"]["phone"] is None
    with db.connect() as conn:
        after = conn.execute(
            select(sync_rows.c.version).where(sync_rows.c.row_id == staff.id)
        ).scalar()
    assert after > before


@pytest.mark.parametrize(
    "field, value",
    [("role", "admin"), ("branch_ids", []), ("email", "x@y.test"), ("email_verified", True)],
)
def test_a_staff_member_cannot_change_role_branches_or_email_here(
    field: str, value: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    response = sign_in(staff).patch("/api/v1/users/me", json={field: value})
    assert response.status_code == 422
    assert response.json()["details"] == {field: ["cannot be changed here"]}
    with db.connect() as conn:
        row = conn.execute(select(users.c.role, users.c.email).where(users.c.id == staff.id)).one()
    assert (row.role, row.email) == ("staff", staff.email)


def test_unknown_fields_are_a_422(sign_in: Any, staff: User) -> None:
    response = sign_in(staff).patch("/api/v1/users/me", json={"nickname": "x"})
    assert response.status_code == 422
    assert response.json()["details"] == {"nickname": ["unknown field"]}


def test_invalid_values_are_a_422_naming_the_field(sign_in: Any, staff: User) -> None:
    response = sign_in(staff).patch("/api/v1/users/me", json={"display_name": ""})
    assert response.status_code == 422
    assert list(response.json()["details"]) == ["display_name"]


@pytest.mark.parametrize(
    "new_password, problem",
    [
        ("short", "at least 12"),
        ("password1234", "too common"),
        ("aaaaaaaaaaaaaaaa", "too common"),
        ("iloveyou2024!", "too common"),
        ("qwertyuiop123", "too common"),
    ],
)
def test_the_password_policy_is_enforced(
    new_password: str, problem: str, sign_in: Any, staff: User
) -> None:
    response = sign_in(staff).patch(
        "/api/v1/users/me/password",
        json={"current_password": staff.password, "new_password": new_password},
    )
    assert response.status_code == 422
    assert any(problem in message for message in response.json()["details"]["new_password"])


def test_a_new_password_may_not_contain_the_email(sign_in: Any, staff: User) -> None:
    local = staff.email.split("@")[0]
    response = sign_in(staff).patch(
        "/api/v1/users/me/password",
        json={"current_password": staff.password, "new_password": f"my {local} secret!"},
    )
    assert response.status_code == 422
    assert "must not contain your email address" in response.json()["details"]["new_password"]


def test_the_current_password_must_be_right(sign_in: Any, staff: User) -> None:
    response = sign_in(staff).patch(
        "/api/v1/users/me/password",
        json={"current_password": "wrong wrong wrong", "new_password": NEW_PASSWORD},
    )
    assert response.status_code == 422
    assert "current_password" in response.json()["details"]


def test_changing_the_password_signs_out_other_sessions_and_keeps_this_one(
    client: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    other = sign_in(staff)
    this = sign_in(staff)
    response = this.patch(
        "/api/v1/users/me/password",
        json={"current_password": staff.password, "new_password": NEW_PASSWORD},
    )
    assert response.status_code == 200
    fresh = response.json()["data"]
    # This session continues with the returned pair; the old access token is dead.
    assert this.get("/api/v1/users/me").status_code == 401
    assert (
        client.get(
            "/api/v1/users/me", headers={"Authorization": f"Bearer {fresh['access_token']}"}
        ).status_code
        == 200
    )
    assert (
        client.post(
            "/api/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]}
        ).status_code
        == 200
    )
    # The other session is signed out: access and refresh.
    assert other.get("/api/v1/users/me").status_code == 401
    assert (
        client.post("/api/v1/auth/refresh", json={"refresh_token": other.refresh_token}).status_code
        == 401
    )
    # Only the new password signs in now.
    assert login(client, staff).status_code == 401
    assert login(client, staff, password=NEW_PASSWORD).status_code == 200
    with db.connect() as conn:
        events = list(conn.execute(select(audit_log.c.event)).scalars())
    assert "user.password_changed" in events
    assert "session.family_revoked" in events  # the other session's family
