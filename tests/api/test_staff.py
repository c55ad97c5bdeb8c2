"""/staff: managers manage the staff of their own branches, and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from api.v1 import api
from sync_server.account_tables import audit_log
from sync_server.tables import sync_rows, users
from tests.api.conftest import login
from tests.factories import Factory, User

GOOD_PASSWORD = "basil and thyme forever 9"


def _audit(db: Engine) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(select(audit_log.c.event).order_by(audit_log.c.id)).scalars())


@pytest.fixture
def two_branches(factory: Factory) -> dict[str, Any]:
    a, b = factory.branch(), factory.branch()
    return {
        "a": a,
        "b": b,
        "manager_a": factory.user("manager", [a]),
        "staff_a": factory.user("staff", [a]),
        "staff_b": factory.user("staff", [b]),
    }


def test_a_manager_lists_only_the_staff_of_their_branches(
    client: Any, factory: Factory, two_branches: dict[str, Any]
) -> None:
    response = client.get("/api/v1/staff", headers=factory.auth(two_branches["manager_a"]))
    assert response.status_code == 200
    ids = {user["id"] for user in response.json()["data"]}
    assert ids == {two_branches["manager_a"].id, two_branches["staff_a"].id}
    assert response.json()["meta"] == {"next_cursor": None, "limit": 25}


def test_a_manager_cannot_list_another_branch_by_filtering_on_it(
    client: Any, factory: Factory, two_branches: dict[str, Any]
) -> None:
    response = client.get(
        "/api/v1/staff",
        params={"branch_id": two_branches["b"].id},
        headers=factory.auth(two_branches["manager_a"]),
    )
    assert response.status_code == 200
    assert response.json()["data"] == []


def test_staff_lists_are_cursor_paginated(client: Any, factory: Factory) -> None:
    branch = factory.branch()
    manager = factory.user("manager", [branch])
    for _ in range(4):
        factory.user("staff", [branch])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        body = client.get("/api/v1/staff", params=params, headers=factory.auth(manager)).json()
        assert len(body["data"]) <= 2
        assert body["meta"]["limit"] == 2
        seen += [user["id"] for user in body["data"]]
        pages += 1
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5


@pytest.mark.parametrize(
    "params, field",
    [
        ({"limit": "101"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
        ({"branch_id": "nope"}, "branch_id"),
    ],
)
def test_bad_pagination_or_filters_are_a_422(
    params: dict[str, str], field: str, client: Any, factory: Factory
) -> None:
    manager = factory.user("manager")
    response = client.get("/api/v1/staff", params=params, headers=factory.auth(manager))
    assert response.status_code == 422
    assert field in response.json()["details"]


def test_the_default_page_size_is_25(client: Any, factory: Factory) -> None:
    admin = factory.user("admin")
    branch = factory.branch()
    for _ in range(26):
        factory.user("staff", [branch], phone=None)
    body = client.get("/api/v1/staff", headers=factory.auth(admin)).json()
    assert len(body["data"]) == 25
    assert body["meta"]["next_cursor"] is not None


# Sample requests for every operation that takes an id; the test below insists the table covers
# them all, so a new id-taking route cannot skip the cross-branch check.
ID_ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/staff/{user_id}"): {},
    ("PATCH", "/staff/{user_id}"): {"json": {"display_name": "Renamed"}},
    ("POST", "/staff/{user_id}/deactivate"): {},
}


def test_the_cross_branch_table_covers_every_id_taking_route() -> None:
    id_routes = {(op.method, op.path) for op in api.operations if "{user_id}" in op.path}
    assert id_routes == set(ID_ROUTES)


@pytest.mark.parametrize("route", sorted(ID_ROUTES))
def test_a_manager_of_branch_a_can_never_read_or_change_branch_b_staff(
    route: tuple[str, str], client: Any, factory: Factory, two_branches: dict[str, Any], db: Engine
) -> None:
    method, path = route
    target: User = two_branches["staff_b"]
    url = "/api/v1" + path.replace("{user_id}", target.id)
    headers = factory.auth(two_branches["manager_a"])
    response = client.request(method, url, headers=headers, **ID_ROUTES[route])
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    # The same request on branch A's staff works, so the 404 is the branch check.
    own = "/api/v1" + path.replace("{user_id}", two_branches["staff_a"].id)
    assert client.request(method, own, headers=headers, **ID_ROUTES[route]).status_code == 200
    with db.connect() as conn:
        row = conn.execute(select(users).where(users.c.id == target.id)).one()
    assert row.is_active and row.display_name != "Renamed"


def test_an_unknown_id_is_the_same_404(client: Any, factory: Factory) -> None:
    manager = factory.user("manager")
    response = client.get(
        "/api/v1/staff/00000000-0000-4000-8000-000000000000", headers=factory.auth(manager)
    )
    assert response.status_code == 404


def test_a_manager_creates_staff_in_their_branch(
    client: Any, factory: Factory, two_branches: dict[str, Any], db: Engine
) -> None:
    response = client.post(
        "/api/v1/staff",
        json={
            "email": "New.Cook@Example.test",
            "password": GOOD_PASSWORD,
            "branch_ids": [two_branches["a"].id],
            "display_name": "New Cook",
            "phone": "+44 1234 567890",
        },
        headers=factory.auth(two_branches["manager_a"]),
    )
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["email"] == "new.cook@example.test"
    assert data["role"] == "staff"
    assert data["branch_ids"] == [two_branches["a"].id]
    assert data["phone"] == "+44 1234 567890"
    with db.connect() as conn:
        assert conn.execute(select(sync_rows).where(sync_rows.c.row_id == data["id"])).first()
    assert "user.created" in _audit(db)
    signed_in = client.post(
        "/api/v1/auth/login", json={"email": "new.cook@example.test", "password": GOOD_PASSWORD}
    )
    assert signed_in.status_code == 200


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"branch_ids": "b"}, 403, "branch_ids"),
        ({"role": "manager"}, 403, "role"),
        ({"role": "admin"}, 403, "role"),
        ({"password": "short"}, 422, "password"),
        ({"email": "not an email"}, 422, "email"),
        ({"branch_ids": []}, 422, "branch"),
    ],
)
def test_a_manager_cannot_create_outside_their_powers(
    change: dict[str, Any],
    status: int,
    field: str,
    client: Any,
    factory: Factory,
    two_branches: dict[str, Any],
    db: Engine,
) -> None:
    body: dict[str, Any] = {
        "email": "someone@example.test",
        "password": GOOD_PASSWORD,
        "branch_ids": [two_branches["a"].id],
    }
    body.update(change)
    if body["branch_ids"] == "b":
        body["branch_ids"] = [two_branches["b"].id]
    response = client.post(
        "/api/v1/staff", json=body, headers=factory.auth(two_branches["manager_a"])
    )
    assert response.status_code == status
    assert field in response.json()["details"]
    with db.connect() as conn:
        assert (
            conn.execute(select(users.c.id).where(users.c.email == "someone@example.test")).first()
            is None
        )


def test_a_duplicate_email_is_a_409(client: Any, factory: Factory) -> None:
    admin = factory.user("admin")
    existing = factory.user("staff")
    response = client.post(
        "/api/v1/staff",
        json={
            "email": existing.email,
            "password": GOOD_PASSWORD,
            "branch_ids": list(existing.branch_ids),
        },
        headers=factory.auth(admin),
    )
    assert response.status_code == 409
    assert "email" in response.json()["details"]


def test_a_staff_member_cannot_raise_their_own_role(
    client: Any, factory: Factory, sign_in: Any, two_branches: dict[str, Any], db: Engine
) -> None:
    me: User = two_branches["staff_a"]
    session = sign_in(me)
    via_staff = session.patch(f"/api/v1/staff/{me.id}", json={"role": "admin"})
    assert via_staff.status_code == 403
    via_profile = session.patch("/api/v1/users/me", json={"role": "admin"})
    assert via_profile.status_code == 422
    with db.connect() as conn:
        assert conn.execute(select(users.c.role).where(users.c.id == me.id)).scalar() == "staff"


def test_a_manager_cannot_change_their_own_role_or_a_peer(
    client: Any, factory: Factory, two_branches: dict[str, Any]
) -> None:
    manager: User = two_branches["manager_a"]
    peer = factory.user("manager", [two_branches["a"]])
    headers = factory.auth(manager)
    assert (
        client.patch(
            f"/api/v1/staff/{manager.id}", json={"role": "admin"}, headers=headers
        ).status_code
        == 403
    )
    assert (
        client.patch(
            f"/api/v1/staff/{peer.id}", json={"role": "staff"}, headers=headers
        ).status_code
        == 403
    )
    assert client.post(f"/api/v1/staff/{peer.id}/deactivate", headers=headers).status_code == 403


def test_an_admin_changes_a_role_the_old_tokens_stop_and_it_is_audited(
    client: Any, factory: Factory, sign_in: Any, two_branches: dict[str, Any], db: Engine
) -> None:
    admin = factory.user("admin")
    target: User = two_branches["staff_a"]
    session = sign_in(target)
    response = client.patch(
        f"/api/v1/staff/{target.id}", json={"role": "manager"}, headers=factory.auth(admin)
    )
    assert response.status_code == 200
    assert response.json()["data"]["role"] == "manager"
    assert session.get("/api/v1/users/me").status_code == 401
    # The session survives: a refresh mints a token carrying the new role.
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": session.refresh_token})
    assert refreshed.status_code == 200
    assert refreshed.json()["data"]["user"]["role"] == "manager"
    assert "user.role_changed" in _audit(db)


def test_a_manager_moves_staff_between_their_own_branches_only(
    client: Any, factory: Factory, db: Engine
) -> None:
    a, b, c = factory.branch(), factory.branch(), factory.branch()
    manager = factory.user("manager", [a, b])
    member = factory.user("staff", [a, c])
    headers = factory.auth(manager)
    moved = client.patch(f"/api/v1/staff/{member.id}", json={"branch_ids": [b.id]}, headers=headers)
    assert moved.status_code == 200
    # Branch C, which the manager does not manage, is kept as it was.
    assert set(moved.json()["data"]["branch_ids"]) == {b.id, c.id}
    assert "user.branches_changed" in _audit(db)
    outside = client.patch(
        f"/api/v1/staff/{member.id}", json={"branch_ids": [c.id]}, headers=headers
    )
    assert outside.status_code == 403


def test_deactivation_stops_the_users_tokens_at_once_on_the_api_and_sync(
    client: Any, factory: Factory, sign_in: Any, two_branches: dict[str, Any], db: Engine
) -> None:
    target: User = two_branches["staff_a"]
    session = sign_in(target)
    device = {
        "protocol": "1.0",
        "device_id": "0b7c8f5e-1111-4c3a-9a43-2f1d7c1a0002",
        "platform": "ios",
        "app_version": "1.0",
    }
    # The sync endpoint accepts the access token of an /api/v1 sign-in ...
    assert session.post("/sync/v1/devices", json=device).status_code == 200
    response = client.post(
        f"/api/v1/staff/{target.id}/deactivate", headers=factory.auth(two_branches["manager_a"])
    )
    assert response.status_code == 200
    assert response.json()["data"]["is_active"] is False
    # ... and refuses it as soon as the user is deactivated.
    assert session.post("/sync/v1/devices", json=device).status_code == 401
    assert session.get("/api/v1/users/me").status_code == 401
    assert (
        client.post(
            "/api/v1/auth/refresh", json={"refresh_token": session.refresh_token}
        ).status_code
        == 401
    )
    assert login(client, target).status_code == 401
    assert "user.deactivated" in _audit(db)
    assert "session.family_revoked" in _audit(db)


def test_the_sync_endpoint_refuses_a_signed_out_session(
    client: Any, sign_in: Any, staff: User
) -> None:
    session = sign_in(staff)
    device = {
        "protocol": "1.0",
        "device_id": "0b7c8f5e-1111-4c3a-9a43-2f1d7c1a0003",
        "platform": "ios",
        "app_version": "1.0",
    }
    assert session.post("/sync/v1/devices", json=device).status_code == 200
    session.post("/api/v1/auth/logout", json={"refresh_token": session.refresh_token})
    assert session.post("/sync/v1/devices", json=device).status_code == 401
