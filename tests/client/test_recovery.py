"""The reference client recovers: restarts, expired tokens, resets, seq gaps, 5xx, bad replicas."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sync_protocol.client import ReplicaMismatch, SyncFailed, Unauthorized
from sync_protocol.codec import JSON
from sync_server.compaction import compact_tombstones
from sync_server.resources import Resources
from tests.client.harness import (
    Crash,
    FlakyHttp,
    TokenSource,
    device,
    quick_backoff,
    replica_image,
    server_image,
)
from tests.client.test_sync_client import (
    INVENTORY,
    MENU,
    applied_count,
    flour,
    scopes_of,
    stocked,
)
from tests.factories import Factory


def test_a_client_killed_mid_sync_resumes_from_its_file(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    stocked(str(tmp_path / "m.db"), network(), factory, boss)

    path = str(tmp_path / "a.db")
    http = network()
    a = device(path, http, factory, alice, page_limit=3)
    device_id = a.device_id
    first = a.create(INVENTORY, flour("MINE-1"))
    second = a.create(INVENTORY, flour("MINE-2"))
    # Killed right after the server answered the push (the answer never recorded), then again
    # in the middle of the pages.
    http.crash_after = 1
    with pytest.raises(Crash):
        a.sync()
    a.close()
    assert applied_count(resources.engine, device_id) == 2

    a = device(path, http, factory, alice, page_limit=3)
    assert [p.seq for p in a.replica.pending()] == [1, 2]  # outcome unknown: still pending
    http.crash_after = 3
    with pytest.raises(Crash):
        a.sync()
    a.close()

    a = device(path, http, factory, alice, page_limit=3)
    assert a.replica.staged() is not None
    a.sync()

    assert applied_count(resources.engine, a.device_id) == 2
    assert a.replica.pending() == [] and a.replica.staged() is None
    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")
    assert a.get(INVENTORY, first) is not None and a.get(INVENTORY, second) is not None


def test_an_expired_token_is_refreshed_once_and_the_sync_goes_on(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    tokens = TokenSource(factory, alice, expired_first=True)
    a = device(str(tmp_path / "a.db"), network(), factory, alice, tokens=tokens)
    item = a.create(INVENTORY, flour())

    report = a.sync()

    assert tokens.refreshes == 1 and report.retries == 0
    row = a.get(INVENTORY, item)
    assert row is not None and not row.pending


def test_a_token_that_cannot_be_refreshed_stops_the_sync_with_unauthorized(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    tokens = TokenSource(factory, alice)
    tokens.refuse = True
    a = device(str(tmp_path / "a.db"), network(), factory, alice, tokens=tokens)
    a.create(INVENTORY, flour())

    with pytest.raises(Unauthorized):
        a.sync()
    assert tokens.refreshes == 1 and len(a.replica.pending()) == 1


def test_reset_required_rebuilds_the_replica_and_pushes_the_outbox_first(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    doomed = [m.create(INVENTORY, flour(f"OLD-{i}")) for i in range(3)]
    m.sync()
    a.sync()
    assert all(a.get(INVENTORY, i) for i in doomed)

    for item in doomed:
        m.delete(INVENTORY, item)
    m.create(INVENTORY, flour("KEPT"))
    m.sync()
    assert compact_tombstones(resources.engine, retention_days=0) >= 3
    offline = a.create(INVENTORY, flour("OFFLINE"))

    report = a.sync()

    assert f"branch:{branch.id}" in report.resets and report.applied == 1
    assert all(a.get(INVENTORY, i) is None for i in doomed)
    row = a.get(INVENTORY, offline)
    assert row is not None and not row.pending
    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")
    assert a.replica.reset_scopes() == []


def test_a_seq_gap_makes_the_client_resume_where_the_server_says(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    a.sync()
    # A replica restored from a bad backup: it believes seqs 1-2 were used; the server never
    # saw them, so it answers seq_gap and the client renumbers its unsent work from 1.
    with a.replica.transaction():
        a.replica.conn.execute("UPDATE meta SET value = '3' WHERE key = 'next_seq'")
    item = a.create(INVENTORY, flour())

    report = a.sync()

    assert report.renumbered == 1 and report.applied == 1
    assert applied_count(resources.engine, a.device_id) == 1
    assert a.get(INVENTORY, item) is not None and a.replica.next_seq == 2


def test_a_reinstalled_app_reusing_its_device_id_never_has_new_work_taken_for_a_replay(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    http = network()
    old = device(str(tmp_path / "old.db"), http, factory, alice)
    old.create(INVENTORY, flour("A"))
    old.create(INVENTORY, flour("B"))
    old.sync()

    # Same device id, fresh file, work written before the first sync: it got seq 1, which the
    # server already holds for another change-set.
    new = device(str(tmp_path / "new.db"), http, factory, alice, device_id=old.device_id)
    item = new.create(INVENTORY, flour("C"))
    report = new.sync()

    assert report.renumbered == 1 and report.applied == 1
    assert applied_count(resources.engine, new.device_id) == 3
    row = new.get(INVENTORY, item)
    assert row is not None and not row.pending
    assert len(new.rows(INVENTORY)) == 3


def test_5xx_and_network_errors_are_retried_with_growing_jittered_waits(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    http = network()
    a = device(str(tmp_path / "a.db"), http, factory, alice)
    sleeps: list[float] = []
    a.backoff = quick_backoff(attempts=5, sleeps=sleeps)
    a.backoff.base, a.backoff.cap = 1.0, 100.0
    http.unavailable_next = 3
    a.create(INVENTORY, flour())

    report = a.sync()

    assert report.retries == 3 and report.applied == 1
    assert len(sleeps) == 3 and all(0 <= s <= 2**n for n, s in enumerate(sleeps, start=1))

    http.offline = True
    a.create(INVENTORY, flour("LATER"))
    with pytest.raises(SyncFailed):
        a.sync()
    assert len(a.replica.pending()) == 1


def test_the_json_representation_syncs_the_same(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, boss, media_type=JSON)
    dish = a.create(MENU, {"name": "Soup", "price_cents": 500})
    a.intent("menu.mark_sold_out", {"menu_item_id": dish})
    row = a.get(MENU, dish)
    assert row is not None and row.data["available"] is False  # the intent's local effect

    report = a.sync()

    assert report.applied == 2
    row = a.get(MENU, dish)
    assert row is not None and row.data["available"] is False and not row.pending
    assert replica_image(a) == server_image(resources.engine, scopes_of(boss.branch_ids), "manager")


def test_a_corrupted_replica_is_detected_by_checksum_and_rebuilt(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    a.create(INVENTORY, flour())
    a.sync()
    # A row lost behind the client's back (a bug, a bad migration): the sums disagree.
    scope = f"branch:{branch.id}"
    with a.replica.transaction():
        a.replica.conn.execute(
            "DELETE FROM server_rows WHERE entity = ? AND scope = ?", (INVENTORY, scope)
        )
        a.replica.conn.execute(
            "UPDATE scope_sums SET count = count - 1, checksum = 0 WHERE scope = ?", (scope,)
        )

    report = a.sync()

    assert scope in report.resets
    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")


def test_a_replica_that_stays_wrong_is_reported(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    a.sync()
    # Poison every commit: a trigger adds a phantom row to each staged page.
    a.replica.conn.execute(
        "CREATE TRIGGER phantom AFTER INSERT ON staging WHEN NEW.entity != 'ghost' BEGIN "
        "INSERT INTO staging (entity, id, scope, version, deleted, data) "
        "VALUES ('ghost', lower(hex(randomblob(8))), NEW.scope, 1, 0, '{}'); END"
    )
    a.create(INVENTORY, flour())

    with pytest.raises(ReplicaMismatch):
        a.sync()


def test_a_staff_device_receives_its_branch_only_and_no_contact_data(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp]
) -> None:
    mine, other = factory.branch(), factory.branch()
    alice = factory.user("staff", [mine])
    bob = factory.user("manager", [other])
    b = device(str(tmp_path / "b.db"), network(), factory, bob)
    b.create(INVENTORY, flour())
    b.sync()
    a = device(str(tmp_path / "a.db"), network(), factory, alice)

    a.sync()

    assert {r.scope for r in a.rows()} == {"org", f"branch:{mine.id}"}
    staff = a.rows("staff")
    assert staff and all("email" not in r.data and "phone" not in r.data for r in staff)
    assert a.rows(INVENTORY) == []


def test_an_initial_sync_of_several_pages_finishes_after_a_compaction(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    boss = factory.user("manager", [branch])
    alice = factory.user("staff", [branch])
    m = device(str(tmp_path / "m.db"), network(), factory, boss)
    items = [m.create(INVENTORY, flour(f"SKU-{i}")) for i in range(8)]
    m.sync()
    m.delete(INVENTORY, items[-1])
    m.sync()
    assert compact_tombstones(resources.engine, retention_days=0) == 1

    a = device(str(tmp_path / "a.db"), network(), factory, alice, page_limit=3)
    a.sync()

    assert replica_image(a) == server_image(resources.engine, scopes_of(alice.branch_ids), "staff")


def test_a_device_the_server_forgot_registers_again_and_resumes_its_numbering(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    from sqlalchemy import delete

    from sync_server.tables import devices, sync_change_sets

    branch = factory.branch()
    alice = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    a.create(INVENTORY, flour("A"))
    a.create(INVENTORY, flour("B"))
    a.sync()
    # The server's database is restored from before this device registered.
    with resources.engine.begin() as conn:
        conn.execute(delete(sync_change_sets).where(sync_change_sets.c.device_id == a.device_id))
        conn.execute(delete(devices).where(devices.c.id == a.device_id))
    item = a.create(INVENTORY, flour("C"))

    report = a.sync()

    assert report.applied == 1 and report.renumbered == 1
    assert applied_count(resources.engine, a.device_id) == 1
    row = a.get(INVENTORY, item)
    assert row is not None and not row.pending
