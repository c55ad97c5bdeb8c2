"""Sign-in, refresh-token rotation and sign-out over /api/v1/auth."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from sync_server.account_tables import audit_log, refresh_tokens
from tests.api.conftest import login
from tests.factories import Factory, User


def _events(db: Engine) -> list[tuple[str, str]]:
    with db.connect() as conn:
        rows = conn.execute(select(audit_log.c.event, audit_log.c.outcome).order_by(audit_log.c.id))
        return [(r.event, r.outcome) for r in rows]


def test_login_returns_tokens_and_the_user_in_an_envelope(client: Any, staff: User) -> None:
    response = login(client, staff)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"data", "meta"}
    data = body["data"]
    assert data["token_type"] == "Bearer"
    assert 0 < data["expires_in"] <= 900
    assert data["user"]["id"] == staff.id
    assert data["user"]["email"] == staff.email
    assert data["user"]["role"] == "staff"
    assert data["user"]["branch_ids"] == list(staff.branch_ids)
    assert "password_hash" not in data["user"]
    # Timestamps are RFC 3339 in UTC.
    assert data["user"]["created_at"].endswith("Z")
    assert data["user"]["last_password_login_at"].endswith("Z")


def test_login_by_username_works(client: Any, factory: Factory, db: Engine) -> None:
    user = factory.user("staff")
    from sqlalchemy import update

    from sync_server.tables import users

    with db.begin() as conn:
        conn.execute(update(users).where(users.c.id == user.id).values(username="sam.k"))
    response = client.post(
        "/api/v1/auth/login", json={"username": "sam.k", "password": user.password}
    )
    assert response.status_code == 200
    assert response.json()["data"]["user"]["username"] == "sam.k"


def test_a_wrong_password_and_an_unknown_account_get_the_same_401(
    client: Any, staff: User, db: Engine
) -> None:
    wrong = login(client, staff, password="not the password at all")
    unknown = client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.test", "password": "whatever"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["code"] == "invalid_credentials"
    assert set(wrong.json()) == {"code", "message", "details"}
    assert _events(db) == [("login.failed", "failure"), ("login.failed", "failure")]


def test_a_successful_login_is_audited(client: Any, staff: User, db: Engine) -> None:
    login(client, staff)
    assert _events(db) == [("login.succeeded", "success")]


def test_malformed_json_is_a_400(client: Any) -> None:
    response = client.post(
        "/api/v1/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_body"


def test_invalid_fields_are_a_422_with_field_level_details(client: Any) -> None:
    response = client.post("/api/v1/auth/login", json={"email": "not-an-email", "password": "x"})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    assert list(body["details"]) == ["email"]
    assert isinstance(body["details"]["email"], list)

    missing = client.post("/api/v1/auth/login", json={"email": "a@b.test"})
    assert missing.status_code == 422
    assert "password" in str(missing.json()["details"])

    both = client.post(
        "/api/v1/auth/login", json={"email": "a@b.test", "username": "a", "password": "x"}
    )
    assert both.status_code == 422
    assert "email" in both.json()["details"]


def test_a_deactivated_user_cannot_sign_in(client: Any, factory: Factory, db: Engine) -> None:
    from sqlalchemy import update

    from sync_server.tables import users

    user = factory.user("staff")
    with db.begin() as conn:
        conn.execute(update(users).where(users.c.id == user.id).values(is_active=False))
    assert login(client, user).status_code == 401


def test_refresh_rotates_the_refresh_token(client: Any, sign_in: Any, staff: User) -> None:
    session = sign_in(staff)
    first = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    assert first.status_code == 200
    data = first.json()["data"]
    assert data["refresh_token"] != session.refresh_token
    assert data["access_token"] != session.access_token
    assert data["user"]["id"] == staff.id
    # The new pair works; the new refresh token rotates again.
    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {data['access_token']}"})
    assert me.status_code == 200
    second = client.post("/api/v1/auth/refresh", json={"refresh_token": data["refresh_token"]})
    assert second.status_code == 200


def test_refresh_reuse_revokes_the_whole_family_and_is_audited(
    client: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    session = sign_in(staff)
    rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    newest = rotated.json()["data"]
    # The old token is presented again (a thief, or the victim after the thief): reuse.
    reuse = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    assert reuse.status_code == 401
    assert reuse.json()["code"] == "refresh_token_reused"
    # Every token of the family is dead: the newest refresh token and its access token too.
    again = client.post("/api/v1/auth/refresh", json={"refresh_token": newest["refresh_token"]})
    assert again.status_code == 401
    me = client.get(
        "/api/v1/users/me", headers={"Authorization": f"Bearer {newest['access_token']}"}
    )
    assert me.status_code == 401
    events = [event for event, _ in _events(db)]
    assert "session.refresh_reuse" in events
    assert "session.family_revoked" in events


def test_refresh_reuse_leaves_other_sessions_alone(client: Any, sign_in: Any, staff: User) -> None:
    phone = sign_in(staff)
    tablet = sign_in(staff)
    client.post("/api/v1/auth/refresh", json={"refresh_token": phone.refresh_token})
    client.post("/api/v1/auth/refresh", json={"refresh_token": phone.refresh_token})
    assert tablet.get("/api/v1/users/me").status_code == 200
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": tablet.refresh_token})
    assert refreshed.status_code == 200


def test_an_unknown_or_expired_refresh_token_is_refused(
    client: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": "made-up"}).status_code == 401
    session = sign_in(staff)
    from sqlalchemy import update

    from sync_server.directory import utcnow

    with db.begin() as conn:
        conn.execute(update(refresh_tokens).values(expires_at=utcnow()))
    response = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_refresh_token"


def test_refresh_tokens_are_stored_only_as_digests(
    client: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    session = sign_in(staff)
    with db.connect() as conn:
        stored = list(conn.execute(select(refresh_tokens.c.token_hash)).scalars())
    assert session.refresh_token not in stored
    assert len(stored) == 1 and len(stored[0]) == 64


def test_logout_revokes_the_refresh_token_and_the_access_token(
    client: Any, sign_in: Any, staff: User, db: Engine
) -> None:
    session = sign_in(staff)
    response = session.post("/api/v1/auth/logout", json={"refresh_token": session.refresh_token})
    assert response.status_code == 204
    assert session.get("/api/v1/users/me").status_code == 401
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    assert refreshed.status_code == 401
    assert ("session.logout", "success") in _events(db)
    assert ("session.family_revoked", "success") in _events(db)


def test_logout_needs_the_access_token_and_a_refresh_token_of_the_same_user(
    client: Any, sign_in: Any, factory: Factory
) -> None:
    alice = sign_in(factory.user("staff"))
    bob = sign_in(factory.user("staff"))
    unauthenticated = client.post(
        "/api/v1/auth/logout", json={"refresh_token": alice.refresh_token}
    )
    assert unauthenticated.status_code == 401
    # Bob cannot sign Alice out with her stolen refresh token.
    assert (
        bob.post("/api/v1/auth/logout", json={"refresh_token": alice.refresh_token}).status_code
        == 401
    )
    assert alice.get("/api/v1/users/me").status_code == 200


def test_racing_refreshes_of_one_token_never_yield_two_live_sessions(
    client: Any, sign_in: Any, staff: User
) -> None:
    import threading

    session = sign_in(staff)
    results: list[Any] = []

    def refresh() -> None:
        results.append(
            client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
        )

    threads = [threading.Thread(target=refresh) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r.json()["data"] for r in results if r.status_code == 200]
    assert len(winners) <= 1
    assert all(r.status_code in (200, 401) for r in results)
    # The losers presented a rotated token: the family is revoked, the winner's pair included.
    for winner in winners:
        again = client.post("/api/v1/auth/refresh", json={"refresh_token": winner["refresh_token"]})
        assert again.status_code == 401
