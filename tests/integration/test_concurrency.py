"""Replays and races: whatever the interleaving, a change-set applies exactly once.

Against the engine on real databases (MariaDB row locks, SQLite's single writer), with threads
released together by a barrier so that the requests really overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import Engine

from domain.registry import ORG_SCOPE
from sync_server.changelog import ChangeLog, ScopeNotLocked
from sync_server.db import run_in_transaction
from sync_server.directory import create_branch, utcnow
from sync_server.push import PushResult, push
from tests.factories import Factory, User
from tests.syncing import (
    REGISTRY,
    change_set,
    change_set_records,
    cheap_passwords,
    conflict_rows,
    create,
    dish,
    item,
    last_applied_seq,
    new_id,
    patch,
    post,
    principal,
    push_body,
    scope_heads,
    server_rows,
    to_change_sets,
)

__all__ = ["cheap_passwords"]

T = TypeVar("T")


def together(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(0..n-1)`` on ``n`` threads released at the same instant; re-raise any error."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def engine_push(db: Engine, user: User, device: str, *sets: dict[str, Any]) -> PushResult:
    return push(
        db,
        device_id=device,
        principal=principal(user),
        change_sets=to_change_sets(*sets),
        registry=REGISTRY,
    )


@pytest.fixture
def manager(factory: Factory, cheap_passwords: None) -> tuple[User, str]:
    user = factory.user("manager")
    return user, factory.device(user)


def test_the_same_push_sent_at_once_from_eight_threads_applies_once(
    db: Engine, manager: tuple[User, str]
) -> None:
    user, device = manager
    for seq in range(1, 4):
        cs = change_set(seq, create("inventory_items", **item()), create("menu_items", **dish()))
        results = together(8, lambda _i, cs=cs: engine_push(db, user, device, cs))

        fresh = [r.outcomes[0] for r in results if not r.outcomes[0].replayed]
        replays = [r.outcomes[0] for r in results if r.outcomes[0].replayed]
        assert len(fresh) == 1 and len(replays) == 7
        assert all(o.versions == fresh[0].versions for o in replays)
        assert all(r.last_applied_seq >= seq for r in results)
    # Three change-sets, two rows each, one version per scope per change-set.
    pushed = [k for k in server_rows(db) if k[0] in ("inventory_items", "menu_items")]
    assert len(pushed) == 6
    assert len(change_set_records(db, device)) == 3
    branch_scope = f"branch:{user.branch_ids[0]}"
    heads = scope_heads(db)
    assert heads[branch_scope].version == 1 + 3  # the device registration, then 3 change-sets
    assert last_applied_seq(db, device) == 3


def test_the_same_push_sent_twice_at_once_over_http_applies_once(
    client: Any, db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    user = factory.user("manager")
    device, headers = factory.device(user), factory.auth(user)
    inv = new_id()
    body = push_body(device, change_set(1, create("inventory_items", inv, **item())))

    answers = together(2, lambda _i: post(client, "push", body, headers))

    assert [status for status, _ in answers] == [200, 200]
    outcomes = sorted((b["outcomes"][0] for _, b in answers), key=lambda o: o["replayed"])
    assert [o["replayed"] for o in outcomes] == [False, True]
    assert outcomes[0]["versions"] == outcomes[1]["versions"]
    assert server_rows(db)[("inventory_items", inv)]["version"] == int(
        next(iter(outcomes[0]["versions"].values()))
    )
    assert len(change_set_records(db, device)) == 1


def test_two_devices_racing_with_the_same_change_set_id_apply_it_once(
    db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    branch = factory.branch()
    users = [factory.user("manager", [branch]) for _ in range(2)]
    devices = [factory.device(u) for u in users]
    cs_id = new_id()

    results = together(
        2,
        lambda i: engine_push(
            db, users[i], devices[i], change_set(1, create("menu_items", **dish()), cs_id=cs_id)
        ),
    )

    statuses = sorted(r.outcomes[0].status for r in results)
    assert statuses == ["applied", "rejected"]
    rejected = next(r.outcomes[0] for r in results if r.outcomes[0].status == "rejected")
    assert rejected.errors[0].code == "duplicate_change_set_id"
    assert all(r.last_applied_seq == 1 for r in results)
    assert sum(1 for k in server_rows(db) if k[0] == "menu_items") == 1


def test_concurrent_creates_of_one_sku_keep_it_unique_in_the_branch(
    db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    branch = factory.branch()
    users = [factory.user("staff", [branch]) for _ in range(6)]
    devices = [factory.device(u) for u in users]

    results = together(
        6,
        lambda i: engine_push(
            db, users[i], devices[i], change_set(1, create("inventory_items", **item(sku="EGG")))
        ),
    )

    statuses = sorted(r.outcomes[0].status for r in results)
    assert statuses == ["applied"] + ["applied_with_conflicts"] * 5
    assert {c.kind for c in conflict_rows(db).values()} == {"unique_violation"}
    live = [k for k, r in server_rows(db).items() if k[0] == "inventory_items"]
    assert len(live) == 1


def test_concurrent_price_edits_of_one_dish_leave_one_price_and_conflicts_for_the_rest(
    db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    branch = factory.branch()
    users = [factory.user("manager", [branch]) for _ in range(6)]
    devices = [factory.device(u) for u in users]
    menu = new_id()
    engine_push(db, users[0], devices[0], change_set(1, create("menu_items", menu, **dish())))
    base = server_rows(db)[("menu_items", menu)]["version"]

    results = together(
        6,
        lambda i: engine_push(
            db,
            users[i],
            devices[i],
            change_set(2 if i == 0 else 1, patch("menu_items", menu, base, price_cents=2000 + i)),
        ),
    )

    outcomes = [r.outcomes[0] for r in results]
    winners = [i for i, o in enumerate(outcomes) if o.status == "applied"]
    assert len(winners) == 1
    assert sum(len(o.conflicts) for o in outcomes) == 5
    assert server_rows(db)[("menu_items", menu)]["data"]["price_cents"] == 2000 + winners[0]


def test_pushes_writing_two_scopes_and_new_branches_in_parallel_neither_deadlock_nor_fail(
    db: Engine, factory: Factory, cheap_passwords: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="galley.db")
    branch = factory.branch()
    users = [factory.user("manager", [branch]) for _ in range(6)]
    devices = [factory.device(u) for u in users]

    def work(i: int) -> Any:
        if i >= 6:  # branches are written in the org scope and their own, like menu + stock
            return run_in_transaction(
                db, lambda conn: create_branch(conn, f"PAR{i}{new_id()[:6]}", "Parallel")
            )
        return engine_push(
            db,
            users[i],
            devices[i],
            *[
                change_set(s, create("menu_items", **dish()), create("inventory_items", **item()))
                for s in range(1, 6)
            ],
        )

    results = together(8, work)

    # Scopes are locked in one order (sorted: "branch:…" before "org"), so these transactions
    # queue; none is chosen as a deadlock victim and retried.
    assert [r.message for r in caplog.records if "retrying" in r.message] == []
    for r in results[:6]:
        assert [o.status for o in r.outcomes] == ["applied"] * 5
    heads = scope_heads(db)
    org_rows = [r for r in server_rows(db).values() if r["scope"] == ORG_SCOPE]
    assert heads[ORG_SCOPE].row_count == len(org_rows)
    assert heads[f"branch:{branch.id}"].row_count == 6 + 30  # devices + stock items


def test_writers_naming_their_scopes_in_any_order_lock_them_in_one_order(
    db: Engine,
    factory: Factory,
    cheap_passwords: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="galley.db")
    scope = f"branch:{factory.branch().id}"
    before = scope_heads(db)
    lock_one = ChangeLog._select_for_update

    def slow_lock(self: ChangeLog, name: str) -> Any:
        head = lock_one(self, name)
        time.sleep(0.002)  # hold each lock a while before asking for the next
        return head

    monkeypatch.setattr(ChangeLog, "_select_for_update", slow_lock)

    def work(i: int) -> None:
        order = [ORG_SCOPE, scope] if i % 2 else [scope, ORG_SCOPE]
        for _ in range(8):

            def txn(conn: Any) -> None:
                log = ChangeLog(conn, utcnow())
                log.lock_scopes(order)
                log.write("menu_items", new_id(), ORG_SCOPE, {"n": i})
                log.write("inventory_items", new_id(), scope, {"n": i})
                log.finish()

            run_in_transaction(db, txn)

    together(6, work)

    assert [r.message for r in caplog.records if "retrying" in r.message] == []
    after = scope_heads(db)
    assert after[ORG_SCOPE].version - before[ORG_SCOPE].version == 48
    assert after[scope].version - before[scope].version == 48


def test_locking_a_scope_out_of_order_is_refused(db: Engine, factory: Factory) -> None:
    scope = f"branch:{factory.branch().id}"

    def txn(conn: Any) -> None:
        log = ChangeLog(conn, utcnow())
        log.lock_scopes([ORG_SCOPE])
        log.lock_scopes([scope])  # "branch:…" sorts before "org": could deadlock

    with pytest.raises(ScopeNotLocked):
        run_in_transaction(db, txn)


@pytest.mark.integration
def test_compaction_waits_for_a_push_holding_a_tombstone_instead_of_deadlocking(
    mysql_engine: Engine,
) -> None:
    # Every writer locks rows before the scope counter. A push holding a tombstone (step 4)
    # and then asking for the counter must get it while compaction waits for the row; with
    # compaction taking the counter first, the two would deadlock (1213) and one would fail.
    from sync_server.changelog import publish
    from sync_server.compaction import compact_tombstones
    from sync_server.tables import sync_scopes

    branch = run_in_transaction(mysql_engine, lambda c: create_branch(c, "CMP", "Compacted"))
    scope = f"branch:{branch.id}"
    row = new_id()
    run_in_transaction(
        mysql_engine,
        lambda c: publish(c, utcnow(), "devices", row, scope, {"branch_id": branch.id}),
    )
    run_in_transaction(mysql_engine, lambda c: publish(c, utcnow(), "devices", row, scope, None))

    purged: list[int] = []
    with mysql_engine.connect() as push_like:
        push_like.begin()
        ChangeLog(push_like, utcnow()).load_rows([("devices", row)], lock=True)
        compactor = threading.Thread(
            target=lambda: purged.append(compact_tombstones(mysql_engine, retention_days=0))
        )
        compactor.start()
        time.sleep(0.5)  # compaction is now waiting for the tombstone's lock
        push_like.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 5")
        started = time.monotonic()
        ChangeLog(push_like, utcnow()).lock_scopes([scope])  # must not wait for compaction
        assert time.monotonic() - started < 2
        assert compactor.is_alive()
        push_like.commit()
    compactor.join(timeout=30)
    assert purged == [1]
    assert server_rows(mysql_engine, scope) == {}
    with mysql_engine.connect() as conn:
        horizon = (
            conn.execute(sync_scopes.select().where(sync_scopes.c.scope == scope)).one().horizon
        )
    assert horizon == scope_heads(mysql_engine)[scope].version


@pytest.mark.parametrize(
    "db", [pytest.param("mysql", marks=pytest.mark.integration)], indirect=True
)
def test_a_device_revoked_mid_batch_keeps_what_was_applied_and_is_told_why(
    db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    # The device is revoked while its first change-set commits: that one stays applied and is
    # answered; the second is refused with the device's error, not a 403 for the whole batch.
    from sqlalchemy import event, update

    from sync_server.tables import devices

    user = factory.user("manager", [factory.branch()])
    device = factory.device(user)
    revoker: list[threading.Thread] = []

    def revoke_while_committing(_conn: Any) -> None:
        if revoker:
            return

        def revoke() -> None:
            with db.begin() as other:  # waits for our device lock, then commits
                other.execute(
                    update(devices).where(devices.c.id == device).values(revoked_at=utcnow())
                )

        revoker.append(threading.Thread(target=revoke))
        revoker[0].start()
        time.sleep(0.3)  # queued on the device row before our commit releases it

    with db.connect() as conn:
        event.listen(conn, "commit", revoke_while_committing)
        result = push(
            conn,
            device_id=device,
            principal=principal(user),
            change_sets=to_change_sets(
                change_set(1, create("menu_items", new_id(), **dish())),
                change_set(2, create("menu_items", new_id(), **dish())),
            ),
            registry=REGISTRY,
        )
    revoker[0].join(timeout=30)

    assert [o.status for o in result.outcomes] == ["applied"]
    assert result.last_applied_seq == 1 and result.gap is None
    assert result.refused is not None and not result.refused.unregistered
    assert last_applied_seq(db, device) == 1


@pytest.mark.parametrize(
    "db", [pytest.param("mysql", marks=pytest.mark.integration)], indirect=True
)
def test_a_pull_is_served_while_every_push_thread_waits_on_a_lock(
    db: Engine, resources: Any, factory: Factory, cheap_passwords: None
) -> None:
    # Pushes queued on a contended lock hold their threads; pulls have threads of their own.
    from dataclasses import replace

    from sqlalchemy import select
    from starlette.testclient import TestClient

    from sync_server.app import create_app
    from sync_server.resources import build_resources
    from sync_server.tables import devices
    from tests.syncing import pull_body

    one_writer = build_resources(replace(resources.settings, db_workers=1), engine=db)
    branch = factory.branch()
    user = factory.user("manager", [branch])
    pusher, puller, headers = factory.device(user), factory.device(user), factory.auth(user)
    answers: list[tuple[int, Any]] = []
    with TestClient(create_app(resources=one_writer)) as app_client, db.connect() as locker:
        locker.begin()
        locker.execute(select(devices.c.id).where(devices.c.id == pusher).with_for_update())
        blocked = threading.Thread(
            target=lambda: answers.append(
                post(
                    app_client,
                    "push",
                    push_body(pusher, change_set(1, create("menu_items", new_id(), **dish()))),
                    headers,
                )
            )
        )
        blocked.start()
        time.sleep(0.5)  # the only push thread now waits on the device's row lock

        started = time.monotonic()
        status, page = post(app_client, "pull", pull_body(puller), headers)
        assert status == 200 and page["last_applied_seq"] == 0
        assert time.monotonic() - started < 5
        assert not answers  # the push is still waiting

        locker.rollback()
        blocked.join(timeout=30)
    one_writer.release()
    assert answers and answers[0][0] == 200
    assert answers[0][1]["outcomes"][0]["status"] == "applied"
