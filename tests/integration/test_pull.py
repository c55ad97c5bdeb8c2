"""Pull: the latest state of every changed row after the cursors, a bounded page at a time.

Over HTTP (``/sync/v1/pull``) on SQLite and MariaDB. Steps cited are docs/protocol.md § Pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from domain.registry import branch_scope
from sync_protocol.checksums import row_checksum, sum_checksums
from sync_server.changelog import ChangeLog
from sync_server.compaction import compact_tombstones
from sync_server.db import run_in_transaction
from sync_server.directory import utcnow
from tests.factories import Factory, User
from tests.syncing import (
    MSGPACK,
    change_set,
    cheap_passwords,
    create,
    delete,
    item,
    new_id,
    post,
    pull_body,
    push_body,
    scope_heads,
    server_rows,
    version_of,
)

__all__ = ["cheap_passwords"]


@dataclass
class Device:
    id: str
    user: User
    headers: dict[str, str]


@dataclass
class Org:
    a: str
    b: str
    manager: Device
    staff: Device
    staff_b: Device


@pytest.fixture
def org(factory: Factory, cheap_passwords: None) -> Org:
    a, b = factory.branch(), factory.branch()

    def device(role: str, branch: Any) -> Device:
        user = factory.user(role, [branch])
        return Device(factory.device(user), user, factory.auth(user))

    return Org(a.id, b.id, device("manager", a), device("staff", a), device("staff", b))


def write_versions(db: Engine, scope: str, versions: int, rows_per_version: int) -> list[str]:
    """Commit ``versions`` transactions of ``rows_per_version`` new stock rows each in
    ``scope`` (straight to the log: fast, and exactly the version layout a test needs)."""
    branch = scope.split(":", 1)[1]
    ids: list[str] = []
    for _ in range(versions):
        batch = [new_id() for _ in range(rows_per_version)]

        def work(conn: Any, batch: list[str] = batch) -> None:
            log = ChangeLog(conn, utcnow())
            log.lock_scopes([scope])
            for row_id in batch:
                log.write("inventory_items", row_id, scope, {"branch_id": branch, **item()})
            log.finish()

        run_in_transaction(db, work)
        ids.extend(batch)
    return ids


def pull(client: Any, dev: Device, cursors: dict[str, int] | None = None, **extra: Any) -> Any:
    status, body = post(client, "pull", pull_body(dev.id, cursors, **extra), dev.headers)
    assert status == 200, body
    return body


def pull_all(client: Any, dev: Device, limit: int, cursors: dict[str, int] | None = None) -> Any:
    """Pull until caught up; returns (pages, replica, cursors)."""
    pages, replica = [], {}
    cursors = dict(cursors or {})
    while True:
        page = pull(client, dev, cursors, limit=limit)
        pages.append(page)
        for c in page["changes"]:
            if c["deleted"]:
                replica.pop((c["entity"], c["id"]), None)
            else:
                replica[(c["entity"], c["id"])] = (c["version"], c["data"])
        cursors = page["cursors"]
        if not page["has_more"]:
            return pages, replica, cursors


def test_pages_follow_the_limit_and_never_split_a_version(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    head = scope_heads(db)[scope].version
    cursors = {"org": scope_heads(db)["org"].version, scope: head}
    write_versions(db, scope, versions=5, rows_per_version=3)

    pages, replica, cursors = pull_all(client, org.manager, limit=5, cursors=cursors)

    # Each version has 3 rows: a page of 5 would split the second one, so pages carry 3.
    assert [len(p["changes"]) for p in pages] == [3, 3, 3, 3, 3]
    assert [p["has_more"] for p in pages] == [True] * 4 + [False]
    for page in pages:
        assert len({c["version"] for c in page["changes"]}) == 1
        assert page["cursors"][scope] == page["changes"][-1]["version"]
    assert cursors[scope] == head + 5
    assert len(replica) == 15


def test_a_change_set_larger_than_the_limit_comes_whole_in_one_page(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    cursors = {"org": scope_heads(db)["org"].version, scope: scope_heads(db)[scope].version}
    dev = org.manager
    ops = [create("inventory_items", **item()) for _ in range(12)]
    post(client, "push", push_body(dev.id, change_set(1, *ops)), dev.headers)
    write_versions(db, scope, versions=1, rows_per_version=2)

    first = pull(client, dev, cursors, limit=5)
    second = pull(client, dev, first["cursors"], limit=5)

    assert len(first["changes"]) == 12 and first["has_more"] is True
    assert {c["id"] for c in first["changes"]} == {op["id"] for op in ops}
    assert len(second["changes"]) == 2 and second["has_more"] is False


def test_the_default_page_is_1000_rows_and_the_maximum_is_10000(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    write_versions(db, scope, versions=11, rows_per_version=100)

    page = pull(client, org.manager)
    assert page["has_more"] is True
    assert len(page["changes"]) <= 1000
    assert len(page["changes"]) >= 900  # whole versions of 100 up to the default limit
    assert len(pull(client, org.manager, limit=10_000)["changes"]) > 1100

    for limit in (10_001, 0, -1):
        status, body = post(
            client, "pull", pull_body(org.manager.id, limit=limit), org.manager.headers
        )
        assert status == 422, limit
        assert body["code"] == "validation_error"
        assert "$.limit" in body["details"]


def test_page_and_scope_checksums_match_a_recount_of_the_log(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    ids = write_versions(db, scope, versions=3, rows_per_version=4)
    dev = org.manager
    post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(
                1, delete("inventory_items", ids[0], version_of(db, "inventory_items", ids[0]))
            ),
        ),
        dev.headers,
    )

    pages, replica, cursors = pull_all(client, dev, limit=7)

    assert server_rows(db)[("inventory_items", ids[0])]["deleted"] is True

    for page in pages:
        assert page["page_checksum"] == sum_checksums(
            row_checksum(c["entity"], c["id"], c["version"]) for c in page["changes"]
        )
    states = {s["scope"]: s for p in pages for s in p["scopes"]}
    assert set(states) == {"org", scope}
    for name, state in states.items():
        live = {k: r for k, r in server_rows(db, name).items() if not r["deleted"]}
        assert state["version"] == cursors[name] == scope_heads(db)[name].version
        assert state["count"] == len(live)
        assert state["checksum"] == sum_checksums(
            row_checksum(e, i, r["version"]) for (e, i), r in live.items()
        )
        mine = {k: v for k, (v, _) in replica.items() if live.get(k, {}).get("scope") == name}
        assert mine == {k: r["version"] for k, r in live.items()}


def test_the_write_checkpoint_is_the_last_applied_seq(client: Any, db: Engine, org: Org) -> None:
    dev = org.staff
    assert pull(client, dev)["last_applied_seq"] == 0
    sets = [change_set(s, create("inventory_items", **item())) for s in (1, 2)]
    post(client, "push", push_body(dev.id, *sets), dev.headers)
    assert pull(client, dev)["last_applied_seq"] == 2
    assert pull(client, org.manager)["last_applied_seq"] == 0


def _device_pull_state(db: Engine, device_id: str) -> tuple[dict[str, int] | None, Any]:
    import msgspec
    from sqlalchemy import select

    from sync_server.tables import devices

    with db.connect() as conn:
        row = conn.execute(
            select(devices.c.pull_cursors, devices.c.last_pulled_at).where(
                devices.c.id == device_id
            )
        ).one()
        conn.rollback()
    cursors = msgspec.msgpack.decode(row.pull_cursors) if row.pull_cursors else None
    return cursors, row.last_pulled_at


def test_the_server_remembers_where_each_device_last_pulled_and_idle_pulls_write_nothing(
    client: Any, db: Engine, org: Org
) -> None:
    dev = org.manager
    assert _device_pull_state(db, dev.id) == (None, None)
    write_versions(db, branch_scope(org.a), versions=3, rows_per_version=2)

    first = pull(client, dev, limit=2)
    assert first["has_more"]
    remembered, when = _device_pull_state(db, dev.id)
    assert remembered == first["cursors"] and when is not None

    _, _, caught_up = pull_all(client, dev, limit=1000, cursors=first["cursors"])
    remembered, when = _device_pull_state(db, dev.id)
    assert remembered == caught_up

    # Nothing new: the device row is not written again.
    idle = pull(client, dev, caught_up)
    assert idle["cursors"] == caught_up
    assert _device_pull_state(db, dev.id) == (caught_up, when)


def test_cursors_are_stored_at_the_first_and_last_page_of_a_catch_up_not_at_every_page(
    client: Any, db: Engine, org: Org
) -> None:
    # Each store is a write transaction: an initial sync of many pages would pay one per page.
    dev = org.manager
    write_versions(db, branch_scope(org.a), versions=4, rows_per_version=2)

    first = pull(client, dev, limit=2)
    second = pull(client, dev, first["cursors"], limit=2)
    assert first["has_more"] and second["has_more"]
    assert _device_pull_state(db, dev.id)[0] == first["cursors"]

    _, _, caught_up = pull_all(client, dev, limit=2, cursors=second["cursors"])
    assert _device_pull_state(db, dev.id)[0] == caught_up


def test_a_role_change_rebuilds_the_replica_so_a_demoted_manager_loses_staff_contacts(
    client: Any, db: Engine, org: Org, factory: Factory
) -> None:
    from sqlalchemy import update

    from sync_server.tables import users

    dev = org.manager
    _, replica, cursors = pull_all(client, dev, limit=1000)
    assert any("email" in data for (entity, _), (_, data) in replica.items() if entity == "staff")

    with db.begin() as conn:
        conn.execute(update(users).where(users.c.id == dev.user.id).values(role="staff"))
    dev.headers = factory.auth(dev.user)

    status, body = post(client, "pull", pull_body(dev.id, cursors), dev.headers)
    assert status == 409 and body["code"] == "reset_required"
    assert set(body["details"]["scopes"]) == {s for s, v in cursors.items() if v > 0}
    assert "role changed" in body["message"]

    _, rebuilt, _ = pull_all(client, dev, limit=1000)
    staff_rows = [data for (entity, _), (_, data) in rebuilt.items() if entity == "staff"]
    assert staff_rows and all("email" not in d and "phone" not in d for d in staff_rows)
    # The new role is remembered: the next pull continues normally.
    assert pull(client, dev, pull_all(client, dev, limit=1000)[2])["changes"] == []


@pytest.mark.parametrize("media_type", ["application/json", MSGPACK])
def test_staff_never_receive_contact_data_of_staff_but_managers_do(
    client: Any, db: Engine, org: Org, media_type: str
) -> None:
    def staff_rows(dev: Device) -> dict[str, dict[str, Any]]:
        status, body = post(client, "pull", pull_body(dev.id), dev.headers, media_type)
        assert status == 200
        return {c["id"]: c["data"] for c in body["changes"] if c["entity"] == "staff"}

    as_staff, as_manager = staff_rows(org.staff), staff_rows(org.manager)

    assert (
        set(as_staff)
        == set(as_manager)
        == {org.manager.user.id, org.staff.user.id} | {org.staff_b.user.id}
    )
    for data in as_staff.values():
        assert "email" not in data and "phone" not in data
        assert data["display_name"]
    assert as_manager[org.staff.user.id]["email"] == org.staff.user.email
    assert as_manager[org.staff.user.id]["phone"] == "+44 20 7946 0999"


def test_a_staff_device_receives_its_branch_and_the_organisation_only(
    client: Any, db: Engine, org: Org
) -> None:
    in_a = write_versions(db, branch_scope(org.a), versions=1, rows_per_version=3)
    in_b = write_versions(db, branch_scope(org.b), versions=1, rows_per_version=3)

    _, replica, cursors = pull_all(client, org.staff, limit=2)

    assert set(cursors) == {"org", branch_scope(org.a)}
    ids = {i for _, i in replica}
    assert set(in_a) <= ids
    assert not set(in_b) & ids
    assert org.b in ids  # the branch itself is organisation data
    assert org.staff_b.id not in ids  # its devices are not
    # Asking for the other branch's scope by cursor changes nothing.
    page = pull(client, org.staff, {branch_scope(org.b): 0})
    assert pull(client, org.staff, {branch_scope(org.b): 10**9})["cursors"] == page["cursors"]
    assert branch_scope(org.b) not in page["cursors"]
    assert not set(in_b) & {c["id"] for c in page["changes"]}


def test_a_deletion_reaches_other_devices_as_a_tombstone(client: Any, db: Engine, org: Org) -> None:
    inv = new_id()
    dev = org.manager
    post(
        client,
        "push",
        push_body(dev.id, change_set(1, create("inventory_items", inv, **item()))),
        dev.headers,
    )
    _, replica, cursors = pull_all(client, org.staff, limit=100)
    assert ("inventory_items", inv) in replica

    post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(2, delete("inventory_items", inv, version_of(db, "inventory_items", inv))),
        ),
        dev.headers,
    )
    page = pull(client, org.staff, cursors)

    (change,) = page["changes"]
    assert (change["id"], change["deleted"], change["data"]) == (inv, True, None)


def test_after_compaction_an_older_cursor_must_reset_and_newer_ones_continue(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    dev = org.manager
    inv = new_id()
    post(
        client,
        "push",
        push_body(dev.id, change_set(1, create("inventory_items", inv, **item()))),
        dev.headers,
    )
    _, _, old_cursors = pull_all(client, dev, limit=1000)
    post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(2, delete("inventory_items", inv, version_of(db, "inventory_items", inv))),
        ),
        dev.headers,
    )
    _, _, new_cursors = pull_all(client, dev, limit=1000)

    assert compact_tombstones(db, retention_days=30) == 0
    assert compact_tombstones(db, retention_days=0) == 1

    status, body = post(client, "pull", pull_body(dev.id, old_cursors), dev.headers)
    assert status == 409
    assert body["code"] == "reset_required"
    assert body["details"]["scopes"] == [scope]
    assert "compaction horizon" in body["message"]
    # The device at the horizon or later, and a fresh replica, carry on.
    assert pull(client, dev, new_cursors)["changes"] == []
    _, fresh, _ = pull_all(client, dev, limit=1000)
    assert ("inventory_items", inv) not in fresh
    assert scope_heads(db)[scope].horizon == new_cursors[scope]


def test_an_interrupted_initial_sync_resumes_without_duplicates_or_holes(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    write_versions(db, scope, versions=20, rows_per_version=2)
    dev = org.staff

    seen: list[tuple[str, str]] = []
    cursors: dict[str, int] = {}
    for _ in range(3):  # three pages, then the app is killed: only the cursors survive
        page = pull(client, dev, cursors, limit=6)
        seen.extend((c["entity"], c["id"]) for c in page["changes"])
        cursors = page["cursors"]
    assert page["has_more"] is True
    write_versions(db, scope, versions=2, rows_per_version=2)  # meanwhile, life goes on

    pages, _, _ = pull_all(client, dev, limit=6, cursors=cursors)
    seen.extend((c["entity"], c["id"]) for p in pages for c in p["changes"])

    assert len(seen) == len(set(seen))
    live = {k for k, r in server_rows(db).items() if r["scope"] in ("org", scope)}
    assert set(seen) == live


def test_a_cursor_ahead_of_the_head_must_reset(client: Any, db: Engine, org: Org) -> None:
    head = scope_heads(db)["org"].version
    status, body = post(
        client, "pull", pull_body(org.manager.id, {"org": head + 1}), org.manager.headers
    )
    assert status == 409
    assert body["code"] == "reset_required"
    assert body["details"]["scopes"] == ["org"]
    assert "ahead of this server" in body["message"]


def test_a_large_version_waits_for_its_own_page_rather_than_overfilling_a_shared_one(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    cursors = {"org": scope_heads(db)["org"].version, scope: scope_heads(db)[scope].version}
    dev = org.manager
    post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(1, create("menu_items", name="Soup", price_cents=500)),
            change_set(2, *[create("inventory_items", **item()) for _ in range(10)]),
        ),
        dev.headers,
    )

    first = pull(client, dev, cursors, limit=5)
    second = pull(client, dev, first["cursors"], limit=5)

    assert [c["entity"] for c in first["changes"]] == ["menu_items"]
    assert first["has_more"] is True
    assert first["cursors"][scope] == cursors[scope]
    assert len(second["changes"]) == 10 and second["has_more"] is False


def test_an_initial_sync_of_several_pages_finishes_after_a_compaction(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    ids = write_versions(db, scope, versions=6, rows_per_version=2)
    dev = org.manager
    post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(
                1, delete("inventory_items", ids[0], version_of(db, "inventory_items", ids[0]))
            ),
        ),
        dev.headers,
    )
    assert compact_tombstones(db, retention_days=0) == 1

    # A new device pages from 0: its intermediate cursors are below the horizon, but it pulled
    # after the compaction, so it cannot hold a row whose tombstone went.
    pages, replica, _ = pull_all(client, org.staff, limit=3)

    assert len(pages) > 2
    live = {
        k for k, r in server_rows(db).items() if r["scope"] in ("org", scope) and not r["deleted"]
    }
    assert set(replica) == live


def test_a_device_that_paged_before_a_compaction_must_reset_after_it(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    write_versions(db, scope, versions=6, rows_per_version=2)
    cursors: dict[str, int] = {}
    held: list[str] = []
    while not held:  # page until it holds some stock rows, then go quiet
        page = pull(client, org.staff, cursors, limit=3)
        held += [c["id"] for c in page["changes"] if c["entity"] == "inventory_items"]
        cursors = page["cursors"]
    assert page["has_more"] is True and held
    post(
        client,
        "push",
        push_body(
            org.manager.id,
            change_set(
                1, delete("inventory_items", held[0], version_of(db, "inventory_items", held[0]))
            ),
        ),
        org.manager.headers,
    )
    assert compact_tombstones(db, retention_days=0) == 1

    status, body = post(
        client, "pull", pull_body(org.staff.id, cursors, limit=3), org.staff.headers
    )

    # It holds a row whose tombstone is gone: only a rebuild can drop it.
    assert status == 409 and body["code"] == "reset_required"
    assert body["details"]["scopes"] == [scope]


def test_falling_back_to_an_older_cursor_after_a_compaction_must_reset(
    client: Any, db: Engine, org: Org
) -> None:
    # A client that pulled past a deletion but then lost those pages (say, a crash before it
    # committed them) and resumes from its older committed cursor may still hold the deleted
    # row: the server remembers the lowest cursor pulled from since the horizon last moved.
    scope = branch_scope(org.a)
    (victim,) = write_versions(db, scope, versions=1, rows_per_version=1)
    _, _, committed = pull_all(client, org.staff, limit=1000)
    post(
        client,
        "push",
        push_body(
            org.manager.id,
            change_set(
                1, delete("inventory_items", victim, version_of(db, "inventory_items", victim))
            ),
        ),
        org.manager.headers,
    )
    _, _, staged = pull_all(client, org.staff, limit=1000, cursors=committed)
    assert compact_tombstones(db, retention_days=0) == 1
    assert pull(client, org.staff, staged)["changes"] == []

    status, body = post(client, "pull", pull_body(org.staff.id, committed), org.staff.headers)

    assert status == 409 and body["details"]["scopes"] == [scope]


# The InnoDB access path of the page query: MariaDB only.
@pytest.mark.parametrize(
    "db", [pytest.param("mysql", marks=pytest.mark.integration)], indirect=True
)
def test_on_mariadb_a_page_deep_in_a_scope_reads_only_its_own_stretch_of_the_index(
    client: Any, db: Engine, org: Org
) -> None:
    scope = branch_scope(org.a)
    write_versions(db, scope, versions=36, rows_per_version=25)
    heads = scope_heads(db)
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    event.listen(db, "before_cursor_execute", record)
    try:
        # A page of 100 rows from 800 rows into the scope: those 800 it must not walk through.
        cursors = {"org": heads["org"].version, scope: heads[scope].version - 8}
        body = pull(client, org.manager, cursors, limit=100)
    finally:
        event.remove(db, "before_cursor_execute", record)
    assert len(body["changes"]) == 100 and body["has_more"]

    page_sql, params = next(
        (sql, p) for sql, p in sent if "FROM sync_rows" in sql and "version >" in sql
    )
    with db.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN {page_sql}", params).mappings().one()
        conn.exec_driver_sql("FLUSH STATUS")
        conn.exec_driver_sql(page_sql, params).all()
        attempts = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Handler_icp_attempts'").one()
        conn.rollback()
    # A range scan of (scope, version) from the cursor on, not `ref` on the scope from its
    # first entry with the version bound checked on each entry it passes. On a table this
    # small the optimizer may choose the range by itself; on the benchmark's 100,000 rows it
    # chose `ref` (docs/protocol.md § 13), hence the hint.
    assert "FORCE INDEX (ix_sync_rows_scope_version)" in page_sql
    assert plan["type"] == "range"
    assert int(attempts[1]) <= 101
