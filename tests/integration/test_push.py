"""Push: every change-set applied exactly once, in order, atomically, with an outcome each.

Over HTTP (``/sync/v1/push``) on SQLite and MariaDB. Steps cited are docs/protocol.md § Push.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from domain import fields as f
from domain.ops import Principal
from domain.registry import EntitySpec, IntentSpec, Registry
from domain.roles import Role
from sync_server.push import push as engine_push
from sync_server.tables import inventory_items
from tests.factories import Factory, User
from tests.syncing import (
    MSGPACK,
    REGISTRY,
    change_set,
    change_set_records,
    cheap_passwords,
    conflict_rows,
    create,
    delete,
    dish,
    intent,
    item,
    last_applied_seq,
    new_id,
    patch,
    post,
    principal,
    push_body,
    scope_heads,
    server_rows,
    snapshot,
    to_change_sets,
)


@dataclass
class Device:
    id: str
    user: User
    headers: dict[str, str]
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass
class Kitchen:
    branch: str
    other_branch: str
    manager: Device
    manager2: Device
    staff: Device


__all__ = ["cheap_passwords"]


@pytest.fixture
def kitchen(factory: Factory, cheap_passwords: None) -> Kitchen:
    b, other = factory.branch(), factory.branch()

    def device(role: str) -> Device:
        user = factory.user(role, [b])
        return Device(factory.device(user), user, factory.auth(user))

    return Kitchen(b.id, other.id, device("manager"), device("manager"), device("staff"))


def push(client: Any, dev: Device, *ops: dict[str, Any], seq: int | None = None) -> Any:
    """Push one change-set of ``ops`` at the device's next seq; returns its outcome."""
    status, body = post(
        client, "push", push_body(dev.id, change_set(seq or dev.next_seq(), *ops)), dev.headers
    )
    assert status == 200, body
    assert body["error"] is None, body
    (outcome,) = body["outcomes"]
    return outcome


def row(engine: Engine, entity: str, row_id: str) -> dict[str, Any]:
    return server_rows(engine)[(entity, row_id)]


def test_a_valid_change_set_is_applied_and_its_rows_get_the_scope_version(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv, menu = new_id(), new_id()
    outcome = push(
        client,
        kitchen.manager,
        create("inventory_items", inv, **item(sku="FLOUR-1")),
        create("menu_items", menu, **dish()),
    )
    assert outcome["status"] == "applied"
    assert outcome["replayed"] is False
    assert set(outcome["versions"]) == {"org", f"branch:{kitchen.branch}"}
    stored = row(db, "inventory_items", inv)
    assert stored["version"] == outcome["versions"][f"branch:{kitchen.branch}"]
    assert stored["data"]["branch_id"] == kitchen.branch  # filled in from the device's branch
    assert stored["data"]["cost_cents"] == 0  # registry default
    assert row(db, "menu_items", menu)["data"]["available"] is True
    assert last_applied_seq(db, kitchen.manager.id) == 1


def test_concurrent_price_edits_from_two_managers_become_a_conflict_for_review(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    menu = new_id()
    push(client, kitchen.manager, create("menu_items", menu, **dish(price_cents=1000)))
    base = row(db, "menu_items", menu)["version"]

    first = push(client, kitchen.manager, patch("menu_items", menu, base, price_cents=1100))
    second = push(
        client, kitchen.manager2, patch("menu_items", menu, base, price_cents=1300, name="Pizza")
    )

    assert first["status"] == "applied"
    assert second["status"] == "applied_with_conflicts"
    (conflict_id,) = second["conflicts"]
    conflict = conflict_rows(db)[conflict_id]
    assert (conflict.entity, conflict.row_id, conflict.kind) == (
        "menu_items",
        menu,
        "concurrent_update",
    )
    assert conflict.device_id == kitchen.manager2.id
    assert conflict.status == "open"
    # The first price stands; the non-conflicting field of the second edit merged.
    data = row(db, "menu_items", menu)["data"]
    assert data["price_cents"] == 1100
    assert data["name"] == "Pizza"


def test_inventory_edits_of_different_fields_of_the_same_row_both_apply(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv = new_id()
    push(client, kitchen.manager, create("inventory_items", inv, **item()))
    base = row(db, "inventory_items", inv)["version"]

    a = push(client, kitchen.manager, patch("inventory_items", inv, base, supplier="Acme"))
    b = push(client, kitchen.staff, patch("inventory_items", inv, base, category="baking"))
    c = push(client, kitchen.manager2, patch("inventory_items", inv, base, category="flour"))

    assert [a["status"], b["status"], c["status"]] == ["applied"] * 3
    assert conflict_rows(db) == {}
    data = row(db, "inventory_items", inv)["data"]
    assert data["supplier"] == "Acme"
    assert data["category"] == "flour"  # field last-writer-wins


@pytest.mark.parametrize(
    ("make_op", "code"),
    [
        (lambda k: create("recipes", new_id(), name="x"), "unknown_entity"),
        (lambda k: create("inventory_items", new_id(), **item(colour="red")), "unknown_field"),
        (lambda k: create("inventory_items", new_id(), **item(name=12)), "wrong_type"),
        (lambda k: create("inventory_items", new_id(), **item(cost_cents=5)), "field_forbidden"),
        (
            lambda k: create("inventory_items", new_id(), **item(branch_id=k.other_branch)),
            "out_of_scope",
        ),
        (lambda k: create("menu_items", new_id(), **dish()), "forbidden"),
        (lambda k: create("inventory_items", new_id(), **item(name="x" * 201)), "too_long"),
        (lambda k: create("inventory_items", new_id(), **item(unit="box")), "invalid_choice"),
        (lambda k: patch("inventory_items", new_id(), 1, name="x"), "not_found"),
        (lambda k: intent("menu.launch_rocket"), "unknown_intent"),
    ],
    ids=[
        "unknown_entity",
        "unknown_field",
        "wrong_type",
        "field_forbidden",
        "out_of_scope",
        "create_forbidden",
        "too_long",
        "invalid_choice",
        "not_found",
        "unknown_intent",
    ],
)
def test_an_invalid_op_rejects_its_change_set_with_a_reason_and_consumes_the_seq(
    client: Any, db: Engine, kitchen: Kitchen, make_op: Any, code: str
) -> None:
    staff = kitchen.staff
    good = new_id()
    before = server_rows(db)

    outcome = push(client, staff, create("inventory_items", good, **item()), make_op(kitchen))

    assert outcome["status"] == "rejected"
    assert [(e["op_index"], e["code"]) for e in outcome["errors"]] == [(1, code)]
    assert outcome["versions"] == {}
    # Atomic: the valid first op of the change-set was not applied either.
    assert server_rows(db) == before
    # The seq is consumed and recorded for review; the queue is not blocked.
    assert last_applied_seq(db, staff.id) == 1
    (record,) = change_set_records(db, staff.id)
    assert record.status == "rejected"
    assert push(client, staff, create("inventory_items", good, **item()))["status"] == "applied"
    assert ("inventory_items", good) in server_rows(db)


def test_a_name_longer_than_the_registry_allows_is_rejected_as_too_long(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    outcome = push(client, kitchen.manager, create("menu_items", new_id(), **dish(name="N" * 201)))
    assert outcome["status"] == "rejected"
    (error,) = outcome["errors"]
    assert (error["code"], error["field"]) == ("too_long", "name")
    assert (
        push(client, kitchen.manager, create("menu_items", new_id(), **dish(name="N" * 200)))[
            "status"
        ]
        == "applied"
    )


def test_a_replayed_seq_returns_the_stored_outcome_and_applies_nothing(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    body = push_body(dev.id, change_set(1, create("inventory_items", new_id(), **item())))
    status, first = post(client, "push", body, dev.headers)
    assert status == 200
    state = snapshot(db)

    status, again = post(client, "push", body, dev.headers)

    assert status == 200
    (replay,) = again["outcomes"]
    assert replay["replayed"] is True
    assert {**replay, "replayed": False} == first["outcomes"][0]
    assert again["last_applied_seq"] == 1
    assert snapshot(db) == state


def test_a_replay_answers_from_the_record_even_if_the_resent_ops_differ(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    cs = change_set(1, create("inventory_items", new_id(), **item()))
    post(client, "push", push_body(dev.id, cs), dev.headers)
    state = snapshot(db)
    changed = {**cs, "ops": [create("inventory_items", new_id(), **item())]}

    _, again = post(client, "push", push_body(dev.id, changed), dev.headers)

    assert again["outcomes"][0]["replayed"] is True
    assert again["outcomes"][0]["change_set_id"] == cs["id"]
    assert snapshot(db) == state


def test_a_batch_mixing_replayed_and_new_change_sets_applies_only_the_new_ones(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    one = change_set(1, create("inventory_items", new_id(), **item()))
    post(client, "push", push_body(dev.id, one), dev.headers)
    two = change_set(2, create("inventory_items", new_id(), **item()))

    _, body = post(client, "push", push_body(dev.id, one, two), dev.headers)

    assert [(o["seq"], o["replayed"], o["status"]) for o in body["outcomes"]] == [
        (1, True, "applied"),
        (2, False, "applied"),
    ]
    assert body["last_applied_seq"] == 2
    assert len(change_set_records(db, dev.id)) == 2


def test_a_seq_gap_names_the_expected_seq_and_applies_nothing(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    push(client, dev, create("inventory_items", new_id(), **item()))
    state = snapshot(db)

    status, body = post(
        client,
        "push",
        push_body(dev.id, change_set(3, create("inventory_items", new_id(), **item()))),
        dev.headers,
    )

    assert status == 200
    assert body["outcomes"] == []
    assert body["error"]["code"] == "seq_gap"
    assert body["error"]["details"]["expected_seq"] == ["2"]
    assert body["last_applied_seq"] == 1
    assert snapshot(db) == state


def test_a_gap_inside_a_batch_keeps_the_change_sets_before_it(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    ok, late = new_id(), new_id()
    _, body = post(
        client,
        "push",
        push_body(
            dev.id,
            change_set(1, create("inventory_items", ok, **item())),
            change_set(3, create("inventory_items", late, **item())),
        ),
        dev.headers,
    )
    assert [o["seq"] for o in body["outcomes"]] == [1]
    assert body["error"]["code"] == "seq_gap"
    assert body["last_applied_seq"] == 1
    rows = server_rows(db)
    assert ("inventory_items", ok) in rows
    assert ("inventory_items", late) not in rows


def test_a_patch_of_a_deleted_row_is_a_conflict_and_never_resurrects_it(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv = new_id()
    push(client, kitchen.manager, create("inventory_items", inv, **item()))
    base = row(db, "inventory_items", inv)["version"]
    push(client, kitchen.manager, delete("inventory_items", inv, base))
    tombstone = row(db, "inventory_items", inv)

    outcome = push(client, kitchen.staff, patch("inventory_items", inv, base, name="Rye flour"))

    assert outcome["status"] == "applied_with_conflicts"
    (conflict_id,) = outcome["conflicts"]
    assert conflict_rows(db)[conflict_id].kind == "update_deleted"
    assert row(db, "inventory_items", inv) == tombstone
    assert tombstone["deleted"] is True and tombstone["data"] == {}


def test_deleting_and_patching_in_one_change_set_leaves_a_tombstone(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv = new_id()
    push(client, kitchen.manager, create("inventory_items", inv, **item()))
    base = row(db, "inventory_items", inv)["version"]
    outcome = push(
        client,
        kitchen.manager,
        delete("inventory_items", inv, base),
        patch("inventory_items", inv, base, name="again"),
    )
    assert outcome["status"] == "applied_with_conflicts"
    assert row(db, "inventory_items", inv)["deleted"] is True


def test_a_staff_device_may_not_delete_and_a_rejection_names_the_op(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv = new_id()
    push(client, kitchen.manager, create("inventory_items", inv, **item()))
    base = row(db, "inventory_items", inv)["version"]
    outcome = push(client, kitchen.staff, delete("inventory_items", inv, base))
    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "forbidden"
    assert row(db, "inventory_items", inv)["deleted"] is False


def test_marking_a_dish_sold_out_merges_with_a_concurrent_price_edit(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    menu = new_id()
    push(client, kitchen.manager, create("menu_items", menu, **dish()))
    base = row(db, "menu_items", menu)["version"]
    push(client, kitchen.manager, patch("menu_items", menu, base, price_cents=1500))

    # The staff device never saw the new price: an intent has no base version to go stale.
    outcome = push(client, kitchen.staff, intent("menu.mark_sold_out", menu_item_id=menu))

    assert outcome["status"] == "applied"
    data = row(db, "menu_items", menu)["data"]
    assert (data["available"], data["price_cents"]) == (False, 1500)
    assert conflict_rows(db) == {}


def test_marking_an_unknown_dish_sold_out_is_rejected(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    outcome = push(client, kitchen.staff, intent("menu.mark_sold_out", menu_item_id=new_id()))
    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "not_found"


def test_msgpack_push_is_answered_in_msgpack(client: Any, db: Engine, kitchen: Kitchen) -> None:
    dev = kitchen.manager
    status, body = post(
        client,
        "push",
        push_body(dev.id, change_set(1, create("inventory_items", new_id(), **item()))),
        dev.headers,
        MSGPACK,
    )
    assert status == 200
    assert body["outcomes"][0]["status"] == "applied"


def test_reusing_a_change_set_id_under_a_new_seq_is_rejected_not_a_500(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    dev = kitchen.manager
    cs_id = new_id()
    push_one = push_body(
        dev.id, change_set(1, create("menu_items", new_id(), **dish()), cs_id=cs_id)
    )
    post(client, "push", push_one, dev.headers)
    reused = change_set(2, create("menu_items", new_id(), **dish()), cs_id=cs_id)

    status, body = post(client, "push", push_body(dev.id, reused), dev.headers)

    assert status == 200, body
    (outcome,) = body["outcomes"]
    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "duplicate_change_set_id"
    assert body["last_applied_seq"] == 2
    assert push(client, dev, create("menu_items", new_id(), **dish()), seq=3)["status"] == (
        "applied"
    )


def test_creating_a_row_id_that_exists_is_rejected(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv = new_id()
    push(client, kitchen.manager, create("inventory_items", inv, **item()))
    outcome = push(client, kitchen.manager2, create("inventory_items", inv, **item()))
    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "already_exists"


def test_a_duplicate_sku_in_the_branch_becomes_a_conflict(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    push(client, kitchen.manager, create("inventory_items", new_id(), **item(sku="DUP")))
    dup = new_id()
    outcome = push(client, kitchen.staff, create("inventory_items", dup, **item(sku="DUP")))
    assert outcome["status"] == "applied_with_conflicts"
    assert conflict_rows(db)[outcome["conflicts"][0]].kind == "unique_violation"
    assert ("inventory_items", dup) not in server_rows(db)


def inventory_records(engine: Engine) -> dict[str, Any]:
    """id -> row of the system-of-record table ``inventory_items``."""
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(inventory_items))}


def test_one_change_set_renaming_many_items_rewrites_each_record_and_nothing_else(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    # Rewrites that move no unique value go to the table as one statement (RecordWriter):
    # each row must still get its own values, and the columns nobody changed keep theirs.
    ids = [new_id() for _ in range(3)]
    created = push(
        client,
        kitchen.manager,
        *[
            create("inventory_items", i, **item(sku=f"R-{n}", name=f"Item {n}"))
            for n, i in enumerate(ids)
        ],
    )
    base = created["versions"][f"branch:{kitchen.branch}"]

    renamed = push(
        client,
        kitchen.manager,
        *[patch("inventory_items", i, base, name=f"Renamed {n}") for n, i in enumerate(ids)],
        patch("inventory_items", ids[0], base, supplier="Acme"),
    )

    version = renamed["versions"][f"branch:{kitchen.branch}"]
    records = inventory_records(db)
    log = server_rows(db)
    for n, i in enumerate(ids):
        assert (records[i].name, records[i].sku, records[i].version) == (
            f"Renamed {n}",
            f"R-{n}",
            version,
        )
        assert log[("inventory_items", i)]["data"]["name"] == records[i].name
    assert [records[i].supplier for i in ids] == ["Acme", None, None]


def test_renaming_more_items_than_one_batched_statement_holds_renames_each_once(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    ids = [new_id() for _ in range(37)]  # batched as 32 + 4 + 1
    created = push(
        client,
        kitchen.manager,
        *[create("inventory_items", i, **item(sku=f"B-{n}")) for n, i in enumerate(ids)],
    )
    base = created["versions"][f"branch:{kitchen.branch}"]
    push(
        client,
        kitchen.manager,
        *[patch("inventory_items", i, base, name=f"Batch {n}") for n, i in enumerate(ids)],
    )
    records = inventory_records(db)
    assert [records[i].name for i in ids] == [f"Batch {n}" for n in range(37)]
    assert [records[i].sku for i in ids] == [f"B-{n}" for n in range(37)]


def test_a_sku_freed_and_taken_in_one_change_set_reaches_the_unique_index_in_order(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    # Rewrites that move a unique value keep their place: the rename must reach the table
    # before the create that takes the freed SKU.
    old = new_id()
    created = push(client, kitchen.manager, create("inventory_items", old, **item(sku="OLD-1")))
    base = created["versions"][f"branch:{kitchen.branch}"]
    taker = new_id()

    outcome = push(
        client,
        kitchen.manager,
        patch("inventory_items", old, base, sku="NEW-1", name="Renamed"),
        create("inventory_items", taker, **item(sku="OLD-1")),
    )

    assert outcome["status"] == "applied", outcome
    records = inventory_records(db)
    assert (records[old].sku, records[old].name, records[taker].sku) == (
        "NEW-1",
        "Renamed",
        "OLD-1",
    )


def test_ids_spelt_in_upper_case_name_the_same_rows_and_branches(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    inv, menu = new_id(), new_id()
    outcome = push(
        client,
        kitchen.manager,
        create("inventory_items", inv.upper(), **item(branch_id=kitchen.branch.upper())),
        create("menu_items", menu.upper(), **dish()),
    )
    assert outcome["status"] == "applied", outcome
    assert row(db, "inventory_items", inv)["scope"] == f"branch:{kitchen.branch}"
    assert set(scope_heads(db)) == {
        "org",
        f"branch:{kitchen.branch}",
        f"branch:{kitchen.other_branch}",
    }

    sold_out = push(client, kitchen.staff, intent("menu.mark_sold_out", menu_item_id=menu.upper()))
    assert sold_out["status"] == "applied", sold_out
    assert row(db, "menu_items", menu)["data"]["available"] is False


def test_an_integer_beyond_64_bits_is_rejected_as_out_of_range_not_a_500(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    outcome = push(
        client, kitchen.manager, create("menu_items", new_id(), **dish(price_cents=10**30))
    )
    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "out_of_range"
    (record,) = change_set_records(db, kitchen.manager.id)
    assert record.status == "rejected"


def test_an_applied_push_announces_each_scope_s_new_version(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    heard: list[tuple[str, bytes]] = []
    pubsub = client.app.state.resources.pubsub
    stop = pubsub.subscribe("galley:scope:org", lambda channel, msg: heard.append((channel, msg)))
    try:
        outcome = push(client, kitchen.manager, create("menu_items", new_id(), **dish()))
        push(client, kitchen.staff, create("recipes", new_id()))  # rejected: nothing to announce
    finally:
        stop()
    assert heard == [("galley:scope:org", str(outcome["versions"]["org"]).encode())]


def test_an_admin_writing_to_a_branch_that_does_not_exist_is_rejected_and_the_queue_moves_on(
    client: Any, db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    # An admin reaches every existing branch, and only those: a row in a made-up branch is
    # refused up front instead of locking a new scope and failing on the foreign key.
    admin = factory.user("admin")
    dev = Device(factory.device(admin), admin, factory.auth(admin))
    before = server_rows(db)

    outcome = push(client, dev, create("inventory_items", new_id(), **item(branch_id=new_id())))

    assert outcome["status"] == "rejected"
    assert outcome["errors"][0]["code"] == "out_of_scope"
    assert server_rows(db) == before
    assert last_applied_seq(db, dev.id) == 1
    assert push(client, dev, create("menu_items", new_id(), **dish()))["status"] == "applied"


@pytest.mark.parametrize(
    ("first", "second"), [("i", "\u0131"), ("STRASSE", "STRA\u00dfE"), ("\u00c5", "A")]
)
def test_skus_the_database_may_consider_equal_never_wedge_the_queue(
    client: Any, db: Engine, kitchen: Kitchen, first: str, second: str
) -> None:
    dev = kitchen.manager
    push(client, dev, create("inventory_items", new_id(), **item(sku=first)))
    outcome = push(client, dev, create("inventory_items", new_id(), **item(sku=second)))
    assert outcome["status"] in ("applied", "applied_with_conflicts", "rejected")
    assert push(client, dev, create("inventory_items", new_id(), **item()))["status"] == "applied"


def test_a_change_set_that_crashes_the_planner_is_rejected_and_the_queue_moves_on(
    db: Engine, kitchen: Kitchen
) -> None:
    def explode(args: Any, rows: Any) -> Any:
        raise ZeroDivisionError("a bug in an intent")

    broken = IntentSpec("menu.explode", {}, frozenset(Role), targets=lambda args: [], apply=explode)
    registry = Registry(REGISTRY.entities, {**REGISTRY.intents, broken.name: broken})
    dev = kitchen.staff

    result = engine_push(
        db,
        device_id=dev.id,
        principal=principal(dev.user),
        change_sets=to_change_sets(change_set(1, intent("menu.explode"))),
        registry=registry,
    )

    (outcome,) = result.outcomes
    assert (outcome.status, outcome.errors[0].code) == ("rejected", "server_error")
    assert result.last_applied_seq == 1
    after = engine_push(
        db,
        device_id=dev.id,
        principal=principal(dev.user),
        change_sets=to_change_sets(change_set(2, create("inventory_items", new_id(), **item()))),
        registry=registry,
    )
    assert after.outcomes[0].status == "applied"


def test_a_different_change_set_under_an_applied_seq_gets_the_stored_outcome_naming_the_original(
    client: Any, db: Engine, kitchen: Kitchen
) -> None:
    # A reinstalled app reusing its device id numbers from 1 again: the answer names the
    # change-set the server applied under that seq, so the client can tell and renumber.
    dev = kitchen.manager
    original = change_set(1, create("inventory_items", new_id(), **item()))
    post(client, "push", push_body(dev.id, original), dev.headers)
    state = snapshot(db)
    newcomer = change_set(1, create("inventory_items", new_id(), **item()))

    _, body = post(client, "push", push_body(dev.id, newcomer), dev.headers)

    (outcome,) = body["outcomes"]
    assert outcome["replayed"] is True
    assert outcome["change_set_id"] == original["id"] != newcomer["id"]
    assert snapshot(db) == state


@dataclass(frozen=True)
class _ShiftingScopes(EntitySpec):
    """An entity whose rows seem to move between two branches at every look: the engine locks
    one scope and the planner writes the other, on every attempt (a stand-in for a bug)."""

    branches: tuple[str, str] = ("", "")
    looks: list[None] = field(default_factory=list)

    def scope_of(self, data: Any) -> str | None:
        self.looks.append(None)
        return f"branch:{self.branches[len(self.looks) % 2]}"


def test_a_change_set_writing_outside_its_locked_scopes_is_rejected_not_a_wedge(
    db: Engine, factory: Factory, cheap_passwords: None
) -> None:
    a, b = factory.branch(), factory.branch()
    spec = _ShiftingScopes(
        name="shifting",
        scope_kind="branch",
        scope_field="branch_id",
        fields={"branch_id": f.uuid_ref(), "flip": f.boolean()},
        writable={Role.ADMIN: frozenset({"branch_id", "flip"})},
        creatable_by=frozenset({Role.ADMIN}),
        branches=(a.id, b.id),
    )
    registry = Registry({**REGISTRY.entities, spec.name: spec}, REGISTRY.intents)
    admin = factory.user("admin")
    device = factory.device(admin)

    result = engine_push(
        db,
        device_id=device,
        # The engine gives an admin every existing branch.
        principal=Principal(admin.id, Role.ADMIN, frozenset({a.id, b.id}), None),
        change_sets=to_change_sets(
            change_set(1, create("shifting", new_id(), branch_id=a.id, flip=True))
        ),
        registry=registry,
    )

    (outcome,) = result.outcomes
    assert (outcome.status, outcome.errors[0].code) == ("rejected", "server_error")
    assert result.last_applied_seq == 1
