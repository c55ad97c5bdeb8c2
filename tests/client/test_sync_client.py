"""The reference client against the real server: local writes, push, pull, outcomes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sync_protocol.client import SyncClient
from sync_server.resources import Resources
from sync_server.tables import sync_change_sets
from tests.client.harness import FlakyHttp, device, replica_image, server_image
from tests.factories import Factory, User

INVENTORY = "inventory_items"
MENU = "menu_items"


def flour(sku: str = "FLOUR-1") -> dict[str, str]:
    return {"sku": sku, "name": "Flour", "category": "dry", "unit": "kg"}


def stocked(path: str, http: FlakyHttp, factory: Factory, manager: User) -> SyncClient:
    """A manager's device at ``path`` that has created a dozen items and synced them."""
    client = device(path, http, factory, manager)
    for i in range(12):
        client.create(INVENTORY, flour(f"SKU-{i}"))
    client.sync()
    return client


def scopes_of(branch_ids: tuple[str, ...]) -> list[str]:
    return ["org", *sorted(f"branch:{b}" for b in branch_ids)]


def applied_count(engine: Engine, device_id: str) -> int:
    with engine.connect() as conn:
        n = conn.execute(
            select(func.count()).where(sync_change_sets.c.device_id == device_id)
        ).scalar_one()
        conn.rollback()
    return int(n)


def test_an_offline_create_shows_at_once_and_reaches_another_device(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    bob = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    b = device(str(tmp_path / "b.db"), network(), factory, bob)

    item = a.create(INVENTORY, flour(), scope=f"branch:{branch.id}")
    shown = a.get(INVENTORY, item)
    assert shown is not None and shown.pending and shown.version == 0
    assert shown.data["sku"] == "FLOUR-1"

    report = a.sync()
    assert (report.applied, report.rejected) == (1, 0)
    b.sync()
    a.sync()  # b's registration published its device row after a's first pull

    mine, theirs = a.get(INVENTORY, item), b.get(INVENTORY, item)
    assert mine is not None and theirs is not None
    assert not mine.pending and mine.version > 0
    assert mine.data == theirs.data and theirs.data["branch_id"] == branch.id
    assert a.replica.pending() == [] and applied_count(resources.engine, a.device_id) == 1
    expected = server_image(resources.engine, scopes_of(alice.branch_ids), "staff")
    assert replica_image(a) == expected == replica_image(b) == replica_image(a, view=True)


def test_a_rejected_change_set_moves_to_the_rejected_list_and_does_not_block_the_queue(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    # Staff may not set costs: the whole change-set is refused, the next one still applies.
    bad = a.create(INVENTORY, {**flour("BAD"), "cost_cents": 120})
    good = a.create(INVENTORY, flour("GOOD"))
    assert a.get(INVENTORY, bad) is not None  # shown optimistically until the server answers

    report = a.sync()

    assert (report.applied, report.rejected) == (1, 1)
    assert a.get(INVENTORY, bad) is None and a.get(INVENTORY, good) is not None
    [rejected] = a.replica.rejected()
    assert rejected.seq == 1 and rejected.errors[0].code == "field_forbidden"
    assert rejected.errors[0].field == "cost_cents"
    assert a.replica.pending() == []
    assert applied_count(resources.engine, a.device_id) == 2  # the rejection consumed seq 1


def test_concurrent_price_edits_are_reported_as_conflicts(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    ann = factory.user("manager", [branch])
    max_ = factory.user("manager", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, ann)
    b = device(str(tmp_path / "b.db"), network(), factory, max_)
    dish = a.create(MENU, {"name": "Soup", "price_cents": 500})
    a.sync()
    b.sync()

    a.patch(MENU, dish, {"price_cents": 550})
    b.patch(MENU, dish, {"price_cents": 600})
    a.sync()
    report = b.sync()

    assert report.conflicts == 1 and len(b.replica.conflicts()) == 1
    a.sync()
    for client in (a, b):
        row = client.get(MENU, dish)
        assert row is not None and row.data["price_cents"] == 550 and not row.pending


def test_own_offline_edits_of_a_new_menu_item_are_not_conflicts_with_itself(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    ann = factory.user("manager", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, ann)
    dish = a.create(MENU, {"name": "Soup", "price_cents": 500}, scope="org")
    a.patch(MENU, dish, {"price_cents": 550})
    a.patch(MENU, dish, {"price_cents": 575, "name": "Leek soup"})
    gone = a.create(MENU, {"name": "Stew", "price_cents": 900}, scope="org")
    a.delete(MENU, gone)

    report = a.sync()

    assert (report.applied, report.conflicts, report.rejected) == (5, 0, 0)
    row = a.get(MENU, dish)
    assert row is not None and row.data["price_cents"] == 575 and row.data["name"] == "Leek soup"
    assert a.get(MENU, gone) is None


def test_an_edit_of_a_row_deleted_meanwhile_does_not_bring_it_back(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    item = m.create(INVENTORY, flour())
    m.sync()
    a.sync()

    m.delete(INVENTORY, item)
    a.patch(INVENTORY, item, {"name": "Bread flour"})
    m.sync()
    report = a.sync()

    assert report.conflicts == 1
    assert a.get(INVENTORY, item) is None and a.replica.pending() == []


def test_a_lost_push_answer_is_replayed_and_applied_once(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    http = network()
    a = device(str(tmp_path / "a.db"), http, factory, alice)
    a.sync()
    item = a.create(INVENTORY, flour())
    http.lose_next, http.lose_paths = 2, ("/push",)

    report = a.sync()

    assert report.retries == 2 and http.sent.count("/sync/v1/push") == 3
    assert applied_count(resources.engine, a.device_id) == 1
    row = a.get(INVENTORY, item)
    assert row is not None and not row.pending and a.replica.pending() == []


def test_a_lost_pull_answer_is_asked_again(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    http = network()
    a = device(str(tmp_path / "a.db"), http, factory, alice, page_limit=2)
    http.lose_next, http.lose_paths = 3, ("/pull",)

    report = a.sync()

    assert report.retries == 3
    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")


def test_an_initial_sync_asks_for_the_largest_pages_and_later_pulls_for_the_usual_ones(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = stocked(str(tmp_path / "m.db"), network(), factory, boss)
    a = device(str(tmp_path / "a.db"), network(), factory, alice, page_limit=2)
    a.initial_page_limit = 100  # as the client's default (MAX_PULL_LIMIT) does, scaled down

    first = a.sync()
    for i in range(6):
        m.create(INVENTORY, flour(f"MORE-{i}"))
    m.sync()
    later = a.sync()

    assert first.pages == 1  # every row at once, where 2-row pages would have taken 7+
    assert later.pages == 3  # 6 new rows, 2 by 2
    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")


def test_interrupted_initial_sync_resumes_without_duplicates_or_holes(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    items = [m.create(INVENTORY, flour(f"SKU-{i}")) for i in range(30)]
    m.sync()

    http = network()
    a = device(str(tmp_path / "a.db"), http, factory, alice, page_limit=4, attempts=2)
    http.fail_after = 4  # register and three pages, then the network goes away
    try:
        a.sync()
        raise AssertionError("sync should have failed")
    except Exception as exc:
        assert type(exc).__name__ == "SyncFailed"
    staged = a.replica.staged()
    assert staged is not None and a.rows() == []  # pages kept, nothing half-applied

    # Meanwhile the rows move on: edits, deletes and new rows on both sides of the cursor.
    for item in items[:5] + items[-5:]:
        m.patch(INVENTORY, item, {"name": "Rye flour"})
    for item in items[10:15]:
        m.delete(INVENTORY, item)
    for i in range(5):
        m.create(INVENTORY, flour(f"NEW-{i}"))
    m.sync()

    http.offline = False
    report = a.sync()

    assert report.pages > 1 and a.replica.staged() is None
    expected = server_image(resources.engine, scopes_of(alice.branch_ids), "staff")
    assert replica_image(a) == expected == replica_image(a, view=True)
    assert len(a.rows(INVENTORY)) == 30
    assert a.replica.verify() == {
        s: (c, k)
        for s, c, k in a.replica.conn.execute("SELECT scope, count, checksum FROM scope_sums")
    }


def test_work_written_while_a_pull_runs_stays_applied_over_the_pulled_state(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    item = m.create(INVENTORY, flour())
    for i in range(6):
        m.create(INVENTORY, flour(f"SKU-{i}"))
    m.sync()
    path = str(tmp_path / "a.db")
    http = network()
    a = device(path, http, factory, alice, page_limit=3)
    a.sync()
    m.patch(INVENTORY, item, {"name": "Spelt flour", "category": "grain"})
    m.sync()

    # The app writes through its own connection to the same file while the sync pulls.
    app = device(path, http, factory, alice)
    pulls = 0

    def app_writes_between_pages(path: str) -> None:
        nonlocal pulls
        if path.endswith("/pull"):
            pulls += 1
            if pulls == 1:
                app.patch(INVENTORY, item, {"name": "Rye flour"})

    http.on_send = app_writes_between_pages
    a.sync()
    http.on_send = None

    row = a.get(INVENTORY, item)
    assert row is not None and row.pending
    assert row.data["name"] == "Rye flour" and row.data["category"] == "grain"
    assert [p.status for p in a.replica.pending()] == ["pending"]
    a.sync()
    row = a.get(INVENTORY, item)
    assert row is not None and not row.pending and row.data["name"] == "Rye flour"
    app.close()


def test_a_change_set_the_server_could_not_decode_is_refused_when_written(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    try:
        a.create(INVENTORY, flour(), id="not-a-uuid")
        raise AssertionError("an invalid id was accepted")
    except ValueError as exc:
        assert "invalid change-set" in str(exc)
    assert a.replica.pending() == [] and a.rows(INVENTORY) == []


def test_an_intent_with_bad_arguments_is_queued_and_rejected_by_the_server(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    a.intent("menu.mark_sold_out", {"dish": "soup"})  # no menu_item_id: no local effect

    report = a.sync()

    assert report.rejected == 1
    [rejected] = a.replica.rejected()
    assert {e.code for e in rejected.errors} >= {"unknown_field"}


def test_a_branch_taken_from_the_user_leaves_the_replica(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    from sqlalchemy import delete

    from sync_server.db import run_in_transaction
    from sync_server.directory import publish_staff, utcnow
    from sync_server.tables import user_branches

    home, away = factory.branch(), factory.branch()
    erin = factory.user("manager", [home, away])
    e = device(str(tmp_path / "e.db"), network(), factory, erin)
    kept = e.create(INVENTORY, {**flour("K"), "branch_id": home.id})
    lost = e.create(INVENTORY, {**flour("L"), "branch_id": away.id})
    e.sync()
    assert e.get(INVENTORY, lost) is not None

    def leave_away(conn: object) -> None:
        conn.execute(  # type: ignore[attr-defined]
            delete(user_branches).where(
                user_branches.c.user_id == erin.id, user_branches.c.branch_id == away.id
            )
        )
        publish_staff(conn, erin.id, resources.cipher, utcnow())  # type: ignore[arg-type]

    run_in_transaction(resources.engine, leave_away)
    e.sync()

    assert e.get(INVENTORY, lost) is None and e.get(INVENTORY, kept) is not None
    assert set(e.replica.cursors()) == {"org", f"branch:{home.id}"}
    assert replica_image(e) == server_image(
        resources.engine, ["org", f"branch:{home.id}"], "manager"
    )


def test_syncs_of_one_replica_from_several_threads_leave_it_consistent(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    import threading

    branch = factory.branch()
    boss = factory.user("manager", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    for i in range(20):
        m.create(INVENTORY, flour(f"SKU-{i}"))
    path = str(tmp_path / "m.db")
    errors: list[BaseException] = []

    def background_sync() -> None:
        try:
            worker = device(path, network(), factory, boss, page_limit=2)
            worker.sync()
            worker.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=background_sync) for _ in range(3)]
    for t in threads:
        t.start()
    m.sync()
    for t in threads:
        t.join()

    assert errors == []
    assert applied_count(resources.engine, m.device_id) == 20
    assert m.replica.pending() == [] and len(m.rows(INVENTORY)) == 20
    assert replica_image(m) == server_image(resources.engine, scopes_of(boss.branch_ids), "manager")
