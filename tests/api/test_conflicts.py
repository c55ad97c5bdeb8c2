"""Managers list and resolve the conflicts the sync engine flags, end to end: devices push through
/sync/v1, managers act through /api/v1/conflicts, devices pull the outcome."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from api.v1 import api
from domain.roles import Role
from sync_server import migrate
from sync_server.account_tables import audit_log, permissions, role_permissions
from sync_server.conflicts import Resolver, resolve
from sync_server.db import create_db_engine
from sync_server.directory import utcnow
from sync_server.tables import menu_items
from tests.factories import Factory, User
from tests.syncing import (
    REGISTRY,
    change_set,
    cheap_passwords,
    conflict_rows,
    create,
    delete,
    dish,
    item,
    new_id,
    patch,
    post,
    pull_body,
    push_body,
    server_rows,
    version_of,
)

__all__ = ["cheap_passwords"]


@dataclass
class Device:
    id: str
    user: User
    headers: dict[str, str]
    seq: int = 0

    def push(self, client: Any, *ops: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        status, body = post(
            client, "push", push_body(self.id, change_set(self.seq, *ops)), self.headers
        )
        assert status == 200, body
        (outcome,) = body["outcomes"]
        assert outcome["status"] != "rejected", outcome
        return outcome  # type: ignore[no-any-return]

    def pull(self, client: Any, cursors: dict[str, int]) -> dict[str, Any]:
        status, body = post(client, "pull", pull_body(self.id, cursors), self.headers)
        assert status == 200, body
        return body  # type: ignore[no-any-return]


@dataclass
class Org:
    a: str
    b: str
    till: Device  # manager of branch A, at the till
    office: Device  # the same manager, on the office tablet
    manager_a: User
    manager_b: User
    staff_a: User
    admin: User
    factory: Factory

    def headers(self, user: User) -> dict[str, str]:
        return self.factory.auth(user)


@pytest.fixture
def org(factory: Factory, cheap_passwords: None) -> Org:
    a, b = factory.branch(), factory.branch()
    manager_a = factory.user("manager", [a])
    headers = factory.auth(manager_a)
    return Org(
        a.id,
        b.id,
        Device(factory.device(manager_a), manager_a, headers),
        Device(factory.device(manager_a), manager_a, headers),
        manager_a,
        factory.user("manager", [b]),
        factory.user("staff", [a]),
        factory.user("admin"),
        factory,
    )


def stale_price_edit(client: Any, org: Org) -> tuple[str, str]:
    """Both devices saw the dish at 1200; the till sets 1300, then the office (stale) 1050.
    Returns (dish id, conflict id)."""
    dish_id = new_id()
    org.till.push(client, create("menu_items", dish_id, **dish(price_cents=1200)))
    seen = version_of(client.app.state.resources.engine, "menu_items", dish_id)
    org.till.push(client, patch("menu_items", dish_id, seen, price_cents=1300))
    outcome = org.office.push(client, patch("menu_items", dish_id, seen, price_cents=1050))
    assert outcome["status"] == "applied_with_conflicts"
    (conflict_id,) = outcome["conflicts"]
    return dish_id, conflict_id


def duplicate_sku(client: Any, org: Org) -> str:
    """The office creates a stock item whose SKU the till already used in branch A."""
    org.till.push(client, create("inventory_items", **item("FLOUR-1")))
    outcome = org.office.push(client, create("inventory_items", **item("FLOUR-1")))
    (conflict_id,) = outcome["conflicts"]
    return conflict_id  # type: ignore[no-any-return]


def resolve_as(client: Any, org: Org, user: User, conflict_id: str, resolution: str) -> Any:
    return client.post(
        f"/api/v1/conflicts/{conflict_id}/resolve",
        json={"resolution": resolution, "note": "checked with the chef"},
        headers=org.headers(user),
    )


def price_in_records(db: Engine, dish_id: str) -> tuple[int, int]:
    with db.connect() as conn:
        row = conn.execute(select(menu_items).where(menu_items.c.id == dish_id)).one()
        conn.rollback()
    return int(row.price_cents), int(row.version)


def test_a_stale_price_edit_appears_in_the_managers_list_with_both_prices(
    client: Any, org: Org
) -> None:
    dish_id, conflict_id = stale_price_edit(client, org)
    response = client.get("/api/v1/conflicts", headers=org.headers(org.manager_a))
    assert response.status_code == 200, response.text
    (listed,) = response.json()["data"]
    assert listed["id"] == conflict_id
    assert listed["kind"] == "concurrent_update" and listed["status"] == "open"
    assert (listed["entity"], listed["row_id"], listed["scope"]) == ("menu_items", dish_id, "org")
    assert listed["proposed"] == {"price_cents": 1050}
    assert listed["server_state"] == {"price_cents": 1300}
    assert listed["device_id"] == org.office.id
    one = client.get(f"/api/v1/conflicts/{conflict_id}", headers=org.headers(org.manager_a))
    assert one.status_code == 200 and one.json()["data"] == listed


def test_accepting_writes_the_proposed_price_at_a_new_version_that_devices_pull(
    client: Any, org: Org, db: Engine
) -> None:
    dish_id, conflict_id = stale_price_edit(client, org)
    before = version_of(db, "menu_items", dish_id)
    caught_up = org.till.pull(client, {})
    assert not caught_up["has_more"]

    response = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert response.status_code == 200, response.text
    body = response.json()["data"]
    assert body["conflict"]["status"] == "resolved"
    assert body["conflict"]["resolution"] == "accept"
    assert body["conflict"]["resolved_by"] == org.manager_a.id
    assert body["conflict"]["resolved_at"] is not None
    version = body["versions"]["org"]
    assert version > before

    # The replication log and the menu table agree on the accepted price and its version.
    row = server_rows(db, "org")[("menu_items", dish_id)]
    assert row["version"] == version and row["data"]["price_cents"] == 1050
    assert price_in_records(db, dish_id) == (1050, version)
    # The till, which had pulled everything before, now pulls the accepted price.
    changes = org.till.pull(client, caught_up["cursors"])["changes"]
    assert [(c["id"], c["version"], c["data"]["price_cents"]) for c in changes] == [
        (dish_id, version, 1050)
    ]
    # Resolved conflicts leave the default (open) list, and stay in ?status=resolved.
    listed = client.get("/api/v1/conflicts", headers=org.headers(org.manager_a)).json()
    assert listed["data"] == []
    resolved = client.get(
        "/api/v1/conflicts", params={"status": "resolved"}, headers=org.headers(org.manager_a)
    ).json()["data"]
    assert [c["id"] for c in resolved] == [conflict_id]


def test_accepting_is_audited_with_the_resolver_and_the_note(
    client: Any, org: Org, db: Engine
) -> None:
    _, conflict_id = stale_price_edit(client, org)
    assert resolve_as(client, org, org.manager_a, conflict_id, "accept").status_code == 200
    with db.connect() as conn:
        (entry,) = conn.execute(
            select(audit_log).where(audit_log.c.event == "conflict.resolved")
        ).all()
        conn.rollback()
    assert entry.actor_user_id == org.manager_a.id
    assert entry.subject_user_id == org.manager_a.id  # whose device made the proposal
    assert '"note": "checked with the chef"' in entry.details
    assert '"resolution": "accept"' in entry.details


def test_dismissing_keeps_the_servers_price_and_writes_nothing(
    client: Any, org: Org, db: Engine
) -> None:
    dish_id, conflict_id = stale_price_edit(client, org)
    before = server_rows(db, "org")
    response = resolve_as(client, org, org.manager_a, conflict_id, "dismiss")
    assert response.status_code == 200, response.text
    body = response.json()["data"]
    assert body["versions"] == {}
    assert body["conflict"]["status"] == "resolved"
    assert body["conflict"]["resolution"] == "dismiss"
    assert server_rows(db, "org") == before
    assert price_in_records(db, dish_id)[0] == 1300


def test_resolving_twice_is_a_409_already_resolved_and_changes_nothing(
    client: Any, org: Org, db: Engine
) -> None:
    _, conflict_id = stale_price_edit(client, org)
    assert resolve_as(client, org, org.manager_a, conflict_id, "dismiss").status_code == 200
    before = server_rows(db, "org")
    again = resolve_as(client, org, org.admin, conflict_id, "accept")
    assert again.status_code == 409
    assert again.json()["code"] == "already_resolved"
    assert server_rows(db, "org") == before
    assert conflict_rows(db)[conflict_id].resolution == "dismiss"


def test_two_managers_resolving_at_once_resolve_it_once(client: Any, org: Org, db: Engine) -> None:
    """The conflict row is locked FOR UPDATE: the second resolution waits, then sees it closed."""
    dish_id, conflict_id = stale_price_edit(client, org)
    engine = client.app.state.resources.engine
    results: list[str] = []
    barrier = threading.Barrier(2)

    def attempt(user: User, resolution: str) -> None:
        barrier.wait()
        try:
            resolve(
                engine,
                conflict_id,
                resolution,
                resolver=Resolver(user.id, Role(user.role), frozenset(user.branch_ids)),
                registry=REGISTRY,
                now=utcnow(),
            )
            results.append(resolution)
        except Exception as exc:  # the loser's ApiError
            results.append(getattr(exc, "code", repr(exc)))

    threads = [
        threading.Thread(target=attempt, args=(org.manager_a, "accept")),
        threading.Thread(target=attempt, args=(org.admin, "dismiss")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) in (["accept", "already_resolved"], ["already_resolved", "dismiss"])
    winner = conflict_rows(db)[conflict_id].resolution
    assert winner in results
    expected_price = 1050 if winner == "accept" else 1300
    assert price_in_records(db, dish_id)[0] == expected_price


def test_accepting_a_price_someone_changed_again_since_is_refused_and_leaves_it_open(
    client: Any, org: Org, db: Engine
) -> None:
    dish_id, conflict_id = stale_price_edit(client, org)
    current = version_of(db, "menu_items", dish_id)
    org.till.push(client, patch("menu_items", dish_id, current, price_cents=1400))
    response = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert response.status_code == 409
    assert response.json()["code"] == "row_changed"
    assert "price_cents" in response.json()["details"]
    assert conflict_rows(db)[conflict_id].status == "open"
    assert price_in_records(db, dish_id)[0] == 1400


def test_an_edit_of_a_deleted_dish_cannot_be_accepted_but_can_be_dismissed(
    client: Any, org: Org, db: Engine
) -> None:
    dish_id = new_id()
    org.till.push(client, create("menu_items", dish_id, **dish()))
    seen = version_of(db, "menu_items", dish_id)
    org.till.push(client, delete("menu_items", dish_id, seen))
    outcome = org.office.push(client, patch("menu_items", dish_id, seen, price_cents=999))
    (conflict_id,) = outcome["conflicts"]
    response = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert response.status_code == 409 and response.json()["code"] == "row_deleted"
    assert server_rows(db, "org")[("menu_items", dish_id)]["deleted"]
    assert resolve_as(client, org, org.manager_a, conflict_id, "dismiss").status_code == 200


def test_a_duplicate_sku_is_created_once_the_clash_is_gone(
    client: Any, org: Org, db: Engine
) -> None:
    conflict_id = duplicate_sku(client, org)
    conflict = client.get(
        f"/api/v1/conflicts/{conflict_id}", headers=org.headers(org.manager_a)
    ).json()["data"]
    assert conflict["kind"] == "unique_violation"
    assert conflict["scope"] == f"branch:{org.a}"
    refused = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert refused.status_code == 409 and refused.json()["code"] == "unique_violation"
    # The manager deletes the till's item; now the office's item can exist.
    (holder,) = [
        row_id
        for (entity, row_id), row in server_rows(db, f"branch:{org.a}").items()
        if entity == "inventory_items" and not row["deleted"]
    ]
    org.till.push(
        client, delete("inventory_items", holder, version_of(db, "inventory_items", holder))
    )
    accepted = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert accepted.status_code == 200, accepted.text
    created = server_rows(db, f"branch:{org.a}")[("inventory_items", conflict["row_id"])]
    assert created["data"]["sku"] == "FLOUR-1" and not created["deleted"]


def test_staff_may_neither_list_nor_read_nor_resolve_conflicts(client: Any, org: Org) -> None:
    _, conflict_id = stale_price_edit(client, org)
    headers = org.headers(org.staff_a)
    for response in (
        client.get("/api/v1/conflicts", headers=headers),
        client.get(f"/api/v1/conflicts/{conflict_id}", headers=headers),
        resolve_as(client, org, org.staff_a, conflict_id, "accept"),
    ):
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"


def test_a_manager_of_another_branch_sees_org_conflicts_but_not_branch_a_ones(
    client: Any, org: Org
) -> None:
    _, org_conflict = stale_price_edit(client, org)
    branch_conflict = duplicate_sku(client, org)
    listed = client.get("/api/v1/conflicts", headers=org.headers(org.manager_b)).json()["data"]
    assert [c["id"] for c in listed] == [org_conflict]
    mine = client.get("/api/v1/conflicts", headers=org.headers(org.manager_a)).json()["data"]
    assert {c["id"] for c in mine} == {org_conflict, branch_conflict}
    admins = client.get("/api/v1/conflicts", headers=org.headers(org.admin)).json()["data"]
    assert {c["id"] for c in admins} == {org_conflict, branch_conflict}


# Every operation that takes a conflict id, with a sample request; the test below insists the
# table covers them all, so a new id-taking route cannot skip the cross-branch check.
ID_ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/conflicts/{conflict_id}"): {},
    ("POST", "/conflicts/{conflict_id}/resolve"): {"json": {"resolution": "dismiss"}},
}


def test_the_cross_branch_table_covers_every_conflict_id_route() -> None:
    id_routes = {(op.method, op.path) for op in api.operations if "{conflict_id}" in op.path}
    assert id_routes == set(ID_ROUTES)


@pytest.mark.parametrize("route", sorted(ID_ROUTES))
def test_a_manager_of_branch_b_can_never_read_or_resolve_a_branch_a_conflict(
    route: tuple[str, str], client: Any, org: Org, db: Engine
) -> None:
    method, path = route
    conflict_id = duplicate_sku(client, org)
    url = "/api/v1" + path.replace("{conflict_id}", conflict_id)
    response = client.request(method, url, headers=org.headers(org.manager_b), **ID_ROUTES[route])
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert conflict_rows(db)[conflict_id].status == "open"
    # The same request by branch A's manager works, so the 404 is the branch check.
    own = client.request(method, url, headers=org.headers(org.manager_a), **ID_ROUTES[route])
    assert own.status_code == 200, own.text


def test_an_unknown_conflict_is_a_404(client: Any, org: Org) -> None:
    for response in (
        client.get(f"/api/v1/conflicts/{new_id()}", headers=org.headers(org.admin)),
        resolve_as(client, org, org.admin, new_id(), "accept"),
    ):
        assert response.status_code == 404 and response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"resolution": "merge"}, "resolution"),
        ({}, "resolution"),
        ({"resolution": "accept", "extra": 1}, "extra"),
        ({"resolution": "accept", "note": "x" * 501}, "note"),
    ],
)
def test_a_bad_resolution_body_is_a_422_naming_the_field(
    body: dict[str, Any], field: str, client: Any, org: Org, db: Engine
) -> None:
    _, conflict_id = stale_price_edit(client, org)
    response = client.post(
        f"/api/v1/conflicts/{conflict_id}/resolve", json=body, headers=org.headers(org.admin)
    )
    assert response.status_code == 422
    assert field in response.json()["details"]
    assert conflict_rows(db)[conflict_id].status == "open"


def test_the_list_pages_oldest_first_with_a_cursor(client: Any, org: Org) -> None:
    made = [stale_price_edit(client, org)[1] for _ in range(3)]
    seen: list[str] = []
    cursor: str | None = None
    get: Callable[..., Any] = client.get
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        body = get("/api/v1/conflicts", params=params, headers=org.headers(org.admin)).json()
        seen += [c["id"] for c in body["data"]]
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
    assert seen == made
    bad = get("/api/v1/conflicts", params={"cursor": "bm9wZQ"}, headers=org.headers(org.admin))
    assert bad.status_code == 422 and "cursor" in bad.json()["details"]


def test_accepting_a_stale_delete_deletes_the_dish_for_every_device(
    client: Any, org: Org, db: Engine
) -> None:
    dish_id = new_id()
    org.till.push(client, create("menu_items", dish_id, **dish()))
    seen = version_of(db, "menu_items", dish_id)
    org.till.push(client, patch("menu_items", dish_id, seen, name="Marinara"))
    outcome = org.office.push(client, delete("menu_items", dish_id, seen))
    (conflict_id,) = outcome["conflicts"]
    assert conflict_rows(db)[conflict_id].kind == "delete_modified"
    response = resolve_as(client, org, org.manager_a, conflict_id, "accept")
    assert response.status_code == 200, response.text
    row = server_rows(db, "org")[("menu_items", dish_id)]
    assert row["deleted"] and row["version"] == response.json()["data"]["versions"]["org"]
    with db.connect() as conn:
        assert conn.execute(select(menu_items).where(menu_items.c.id == dish_id)).first() is None
        conn.rollback()


def test_migration_0004_grants_the_conflict_permissions_and_takes_them_back(
    tmp_path: Path,
) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")

    def grants() -> set[tuple[str, str]]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(role_permissions).where(role_permissions.c.permission.like("conflicts.%"))
            ).all()
            slugs = set(
                conn.execute(
                    select(permissions.c.slug).where(permissions.c.slug.like("conflicts.%"))
                ).scalars()
            )
            conn.rollback()
        assert slugs == ({"conflicts.read", "conflicts.resolve"} if rows else set())
        return {(r.role, r.permission) for r in rows}

    try:
        migrate.upgrade(engine)
        granted = {
            (role, slug)
            for role in ("manager", "admin")
            for slug in ("conflicts.read", "conflicts.resolve")
        }
        assert grants() == granted
        migrate.downgrade(engine, "0003")
        assert grants() == set()
        migrate.upgrade(engine)
        assert grants() == granted
    finally:
        engine.dispose()
