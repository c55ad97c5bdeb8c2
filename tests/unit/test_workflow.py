"""Resolving a conflict decides, without I/O, what a manager's accept or dismiss writes.

The conflicts here come from the real planner, so each test reads as: a device pushed this,
the server flagged that, a manager resolves it so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from conflict.planner import ConflictDraft
from conflict.workflow import (
    ACCEPT,
    DISMISS,
    ConflictRecord,
    Decision,
    Holders,
    ResolutionWrite,
    decide,
    unique_candidates,
)
from domain.ops import RowState
from domain.roles import Role
from tests.unit.planning import (
    MANAGER,
    REGISTRY,
    SCOPE_A,
    create,
    delete,
    dish_row,
    intent,
    item_fields,
    item_row,
    new_id,
    patch,
    plan,
    rows_of,
    tombstone,
)


def record(draft: ConflictDraft) -> ConflictRecord:
    return ConflictRecord(
        id=new_id(),
        entity=draft.entity,
        row_id=draft.id,
        scope=draft.scope,
        kind=draft.kind,
        base_version=draft.base_version,
        server_version=draft.server_version,
        proposed=draft.proposed,
        server_state=draft.server_state,
    )


def flagged(ops: list[Any], *states: RowState) -> ConflictRecord:
    result = plan(ops, MANAGER, rows_of(*states))
    assert not result.rejected, result.errors
    (draft,) = result.conflicts
    return record(draft)


def written(decision: Decision) -> ResolutionWrite:
    assert decision.refusal is None, decision.refusal
    assert decision.write is not None
    return decision.write


def refused(decision: Decision) -> str:
    assert decision.write is None
    assert decision.refusal is not None
    return decision.refusal.code


# A dish priced 1200 at version 1; someone else changed it to 1300 at version 2.
DISH = new_id()
REPRICED = dish_row(DISH, version=2, price_cents=1300)


def stale_price_edit() -> ConflictRecord:
    return flagged([patch("menu_items", DISH, 1, price_cents=1050)], REPRICED)


def test_accepting_a_stale_price_edit_writes_the_proposed_price_over_the_current_row() -> None:
    conflict = stale_price_edit()
    assert conflict.kind == "concurrent_update"
    write = written(decide(conflict, ACCEPT, REPRICED, REGISTRY, Role.MANAGER))
    assert write.data == {**REPRICED.data, "price_cents": 1050}
    assert write.changed == {"price_cents"} and not write.created
    assert (write.entity, write.id, write.scope) == ("menu_items", DISH, "org")


def test_dismissing_keeps_the_servers_state_and_writes_nothing() -> None:
    decision = decide(stale_price_edit(), DISMISS, REPRICED, REGISTRY, Role.MANAGER)
    assert decision.refusal is None and decision.write is None
    assert decision.resolution == DISMISS


def test_accepting_keeps_edits_of_other_fields_made_since() -> None:
    # The name changed after the conflict was flagged: accepting the price must not undo it.
    renamed = replace(
        REPRICED,
        version=3,
        data={**REPRICED.data, "name": "Marinara"},
        field_versions={**REPRICED.field_versions, "name": 3},
    )
    write = written(decide(stale_price_edit(), ACCEPT, renamed, REGISTRY, Role.MANAGER))
    assert write.data is not None
    assert write.data["name"] == "Marinara" and write.data["price_cents"] == 1050
    assert write.changed == {"price_cents"}


def test_accepting_is_refused_when_the_proposed_field_changed_after_the_conflict() -> None:
    # The manager decided against 1300; someone has since set 1400. Never overwrite it unseen.
    again = replace(
        REPRICED,
        version=3,
        data={**REPRICED.data, "price_cents": 1400},
        field_versions={**REPRICED.field_versions, "price_cents": 3},
    )
    decision = decide(stale_price_edit(), ACCEPT, again, REGISTRY, Role.MANAGER)
    assert refused(decision) == "row_changed"
    assert decision.refusal is not None and "price_cents" in decision.refusal.details


def test_accepting_when_the_row_already_holds_the_proposal_writes_nothing() -> None:
    same = replace(REPRICED, data={**REPRICED.data, "price_cents": 1050})
    decision = decide(stale_price_edit(), ACCEPT, same, REGISTRY, Role.MANAGER)
    assert decision.refusal is None and decision.write is None


def test_accepting_an_edit_of_a_row_deleted_since_is_refused() -> None:
    gone = tombstone("menu_items", DISH, version=3, scope="org")
    assert refused(decide(stale_price_edit(), ACCEPT, gone, REGISTRY, Role.MANAGER)) == (
        "row_deleted"
    )


def test_accepting_is_revalidated_against_the_resolvers_role() -> None:
    # Staff may not write prices: the proposal is the resolver's write, and is checked as such.
    decision = decide(stale_price_edit(), ACCEPT, REPRICED, REGISTRY, Role.STAFF)
    assert refused(decision) == "forbidden"


def test_accepting_a_proposal_the_registry_no_longer_accepts_is_refused() -> None:
    bad = replace(stale_price_edit(), proposed={"price_cents": -5, "colour": "red"})
    decision = decide(bad, ACCEPT, REPRICED, REGISTRY, Role.MANAGER)
    assert refused(decision) == "invalid_proposal"
    assert decision.refusal is not None
    assert set(decision.refusal.details) == {"price_cents", "colour"}


def test_an_edit_of_a_deleted_row_is_never_accepted_since_rows_are_not_resurrected() -> None:
    gone = tombstone("menu_items", DISH, version=2, scope="org")
    conflict = flagged([patch("menu_items", DISH, 1, price_cents=1050)], gone)
    assert conflict.kind == "update_deleted"
    assert refused(decide(conflict, ACCEPT, gone, REGISTRY, Role.MANAGER)) == "row_deleted"
    assert decide(conflict, DISMISS, gone, REGISTRY, Role.MANAGER).refusal is None


def test_accepting_a_stale_delete_deletes_the_row() -> None:
    conflict = flagged([delete("menu_items", DISH, 1)], REPRICED)
    assert conflict.kind == "delete_modified"
    write = written(decide(conflict, ACCEPT, REPRICED, REGISTRY, Role.MANAGER))
    assert write.data is None and (write.entity, write.id) == ("menu_items", DISH)


def test_accepting_a_stale_delete_of_a_row_already_gone_writes_nothing() -> None:
    conflict = flagged([delete("menu_items", DISH, 1)], REPRICED)
    gone = tombstone("menu_items", DISH, version=3, scope="org")
    decision = decide(conflict, ACCEPT, gone, REGISTRY, Role.MANAGER)
    assert decision.refusal is None and decision.write is None


# --- unique values -------------------------------------------------------------------------------

HOLDER = new_id()


def withheld_create() -> tuple[ConflictRecord, str]:
    row_id = new_id()
    existing = item_row(HOLDER, sku="FLOUR-1")
    conflict = flagged([create("inventory_items", row_id, **item_fields(sku="FLOUR-1"))], existing)
    assert conflict.kind == "unique_violation" and conflict.server_version is None
    return conflict, row_id


def test_a_withheld_create_is_not_accepted_while_another_row_holds_its_sku() -> None:
    conflict, _ = withheld_create()
    candidates = unique_candidates(conflict, None, REGISTRY)
    assert candidates == [(("sku",), ("FLOUR-1",))]
    # The holder spells it differently: the database compares without case.
    holders: Holders = {(("sku",), ("flour-1",)): HOLDER}
    decision = decide(conflict, ACCEPT, None, REGISTRY, Role.MANAGER, holders)
    assert refused(decision) == "unique_violation"


def test_a_withheld_create_is_created_as_sent_once_the_clash_is_gone() -> None:
    conflict, row_id = withheld_create()
    write = written(decide(conflict, ACCEPT, None, REGISTRY, Role.MANAGER, {}))
    assert write.created and write.id == row_id and write.scope == SCOPE_A
    assert write.data == dict(conflict.proposed)


def test_a_withheld_patch_of_a_sku_applies_once_the_clash_is_gone() -> None:
    mine, theirs = new_id(), new_id()
    rows = (item_row(mine, sku="A-1"), item_row(theirs, sku="B-1"))
    conflict = flagged([patch("inventory_items", mine, 1, sku="B-1")], *rows)
    assert conflict.kind == "unique_violation" and conflict.server_version == 1
    held: Holders = {(("sku",), ("B-1",)): theirs}
    assert refused(decide(conflict, ACCEPT, rows[0], REGISTRY, Role.MANAGER, held)) == (
        "unique_violation"
    )
    write = written(decide(conflict, ACCEPT, rows[0], REGISTRY, Role.MANAGER, {}))
    assert write.data is not None and write.data["sku"] == "B-1"
    assert write.changed == {"sku"}


def test_an_intent_blocked_by_a_withheld_create_cannot_be_accepted() -> None:
    dish = new_id()
    result = plan(
        [
            create("inventory_items", new_id(), **item_fields(sku="FLOUR-1")),
            intent("menu.mark_sold_out", menu_item_id=dish),
        ],
        MANAGER,
        rows_of(item_row(HOLDER, sku="FLOUR-1"), tombstone("menu_items", dish, version=1)),
    )
    kinds = {c.kind for c in result.conflicts}
    assert "update_deleted" in kinds
    for draft in result.conflicts:
        if draft.kind == "update_deleted":
            # An intent on a deleted row: refused like any edit of a deleted row.
            decision = decide(record(draft), ACCEPT, None, REGISTRY, Role.MANAGER)
            assert refused(decision) == "row_deleted"
    blocked = replace(
        record(result.conflicts[0]),
        kind="blocked_by_conflict",
        proposed={"intent": "menu.mark_sold_out", "args": {"menu_item_id": dish}},
    )
    assert refused(decide(blocked, ACCEPT, None, REGISTRY, Role.MANAGER)) == "not_supported"


def test_an_unknown_resolution_is_refused() -> None:
    decision = decide(stale_price_edit(), "merge", REPRICED, REGISTRY, Role.MANAGER)
    assert refused(decision) == "invalid_resolution"
