"""The change-set planner decides what a push writes, flags or refuses, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from conflict.planner import ConflictDraft, OpIssue, Plan, plan_change_set, touched_keys
from domain import fields as f
from domain.ops import Op, RowState
from domain.registry import EntitySpec, Registry
from domain.roles import Role
from tests.unit.planning import (
    ADMIN,
    BRANCH_A,
    BRANCH_B,
    MANAGER,
    REGISTRY,
    SCOPE_A,
    SCOPE_B,
    STAFF,
    MemoryServer,
    create,
    delete,
    dish_fields,
    dish_row,
    intent,
    item_fields,
    item_row,
    new_id,
    patch,
    plan,
    principal,
    row,
    rows_of,
    tombstone,
)

SOLD_OUT = "menu.mark_sold_out"


def only_error(result: Plan) -> OpIssue:
    assert result.rejected
    assert result.writes == {} and result.conflicts == []
    (error,) = result.errors
    return error


def only_conflict(result: Plan) -> ConflictDraft:
    assert not result.rejected, result.errors
    (conflict,) = result.conflicts
    return conflict


# --- creates -------------------------------------------------------------------------------


def test_a_create_fills_in_defaults_and_the_devices_branch() -> None:
    item = new_id()
    result = plan([create("inventory_items", item, **item_fields())])

    write = result.writes[("inventory_items", item)]
    assert write.created and write.scope == SCOPE_A
    assert write.data == {
        **item_fields(),
        "branch_id": BRANCH_A,
        "cost_cents": 0,
        "supplier": None,
    }
    # Every field of a new row gets its first version.
    assert write.changed == set(write.data)
    assert result.conflicts == [] and result.errors == []


def test_a_menu_item_is_created_in_the_organisation_scope_with_its_defaults() -> None:
    dish = new_id()
    write = plan([create("menu_items", dish, **dish_fields())]).writes[("menu_items", dish)]
    assert write.scope == "org"
    assert write.data == {**dish_fields(), "available": True, "linked_sku": None}


def test_a_create_may_name_its_branch_explicitly() -> None:
    item = new_id()
    manager = principal(branches=(BRANCH_A, BRANCH_B), device_branch=BRANCH_A)
    result = plan([create("inventory_items", item, branch_id=BRANCH_B, **item_fields())], manager)
    assert result.writes[("inventory_items", item)].scope == SCOPE_B


def test_a_nullable_field_without_a_default_is_stored_as_null() -> None:
    notes = EntitySpec(
        name="notes",
        scope_kind="org",
        fields={"title": f.text(50), "body": f.text(500, nullable=True)},
        writable={Role.MANAGER: frozenset({"title", "body"})},
        creatable_by=frozenset({Role.MANAGER}),
    )
    registry = Registry(entities={"notes": notes}, intents={})
    note = new_id()
    result = plan([create("notes", note, title="Deliveries")], registry=registry)
    assert result.writes[("notes", note)].data == {"title": "Deliveries", "body": None}


@pytest.mark.parametrize("missing", ["sku", "name", "category", "unit"])
def test_a_create_without_a_required_field_is_refused(missing: str) -> None:
    values = item_fields()
    del values[missing]
    error = only_error(plan([create("inventory_items", new_id(), **values)]))
    assert (error.op_index, error.code, error.field) == (0, "required", missing)


def test_a_branch_row_needs_a_branch_when_the_device_has_none() -> None:
    error = only_error(plan([create("inventory_items", new_id(), **item_fields())], ADMIN))
    assert (error.code, error.field) == ("required", "branch_id")


def test_an_unknown_entity_is_refused() -> None:
    error = only_error(plan([create("recipes", new_id(), name="Bread")]))
    assert error.code == "unknown_entity"


def test_an_unknown_field_is_refused() -> None:
    error = only_error(plan([create("inventory_items", new_id(), colour="red", **item_fields())]))
    assert (error.code, error.field) == ("unknown_field", "colour")


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        # A bool is an int in Python; for a price it is a client bug, not one cent.
        ("cost_cents", True, "wrong_type"),
        ("cost_cents", 1.5, "wrong_type"),
        ("cost_cents", "100", "wrong_type"),
        ("cost_cents", -1, "out_of_range"),
        ("cost_cents", 100_000_001, "out_of_range"),
        ("name", 42, "wrong_type"),
        ("name", "x" * 201, "too_long"),
        ("name", "   ", "too_short"),
        ("sku", "S" * 65, "too_long"),
        ("name", None, "required"),
        ("unit", "dozen", "invalid_choice"),
        ("unit", "KG", "invalid_choice"),
        ("branch_id", "not-a-uuid", "invalid"),
        ("branch_id", "{aaaaaaaa-0000-4000-8000-000000000001}", "invalid"),
    ],
)
def test_a_create_with_a_bad_value_is_refused(name: str, value: Any, code: str) -> None:
    values = item_fields(**{name: value})
    error = only_error(plan([create("inventory_items", new_id(), **values)]))
    assert (error.op_index, error.code, error.field) == (0, code, name)


def test_every_bad_field_of_an_op_is_reported_at_once() -> None:
    values = item_fields(name="", unit="dozen", sku=7)
    result = plan([create("inventory_items", new_id(), **values)])
    assert sorted((e.field, e.code) for e in result.errors) == [
        ("name", "too_short"),
        ("sku", "wrong_type"),
        ("unit", "invalid_choice"),
    ]


def test_staff_may_create_an_item_but_not_set_its_cost() -> None:
    assert not plan([create("inventory_items", new_id(), **item_fields())], STAFF).rejected
    values = item_fields(cost_cents=250)
    error = only_error(plan([create("inventory_items", new_id(), **values)], STAFF))
    assert (error.code, error.field) == ("field_forbidden", "cost_cents")


def test_staff_may_not_create_menu_items() -> None:
    error = only_error(plan([create("menu_items", new_id(), **dish_fields())], STAFF))
    assert error.code == "forbidden"


@pytest.mark.parametrize("entity", ["branches", "staff", "devices"])
def test_server_owned_entities_cannot_be_created_over_sync(entity: str) -> None:
    error = only_error(plan([create(entity, new_id(), name="x")], ADMIN))
    assert error.code == "forbidden"


def test_a_create_in_another_branch_is_out_of_scope() -> None:
    values = item_fields(branch_id=BRANCH_B)
    error = only_error(plan([create("inventory_items", new_id(), **values)], MANAGER))
    assert error.code == "out_of_scope"


def test_an_admin_may_create_in_any_branch() -> None:
    item = new_id()
    result = plan([create("inventory_items", item, branch_id=BRANCH_B, **item_fields())], ADMIN)
    assert result.writes[("inventory_items", item)].scope == SCOPE_B


def test_upper_case_uuids_are_stored_lower_case() -> None:
    # iOS spells UUIDs in upper case; a scope spelt differently would be one nobody pulls.
    item = new_id()
    values = item_fields(branch_id=BRANCH_A.upper())
    write = plan([create("inventory_items", item, **values)]).writes[("inventory_items", item)]
    assert write.scope == SCOPE_A
    assert write.data is not None and write.data["branch_id"] == BRANCH_A


def test_the_id_of_an_existing_row_cannot_be_reused() -> None:
    item = new_id()
    rows = rows_of(item_row(item))
    error = only_error(plan([create("inventory_items", item, **item_fields(sku="B"))], rows=rows))
    assert error.code == "already_exists"


def test_the_id_of_a_deleted_row_is_never_reused() -> None:
    item = new_id()
    rows = rows_of(tombstone("inventory_items", item, version=4))
    error = only_error(plan([create("inventory_items", item, **item_fields())], rows=rows))
    assert error.code == "already_exists"


def test_creating_the_same_id_twice_in_one_change_set_is_refused() -> None:
    item = new_id()
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        create("inventory_items", item, **item_fields(sku="OTHER")),
    ]
    error = only_error(plan(ops))
    assert (error.op_index, error.code) == (1, "already_exists")


def test_a_duplicate_sku_in_the_branch_becomes_a_conflict_and_is_not_created() -> None:
    holder, item = new_id(), new_id()
    rows = rows_of(item_row(holder, sku="FLOUR-25"))
    result = plan([create("inventory_items", item, **item_fields(sku="FLOUR-25"))], rows=rows)

    assert result.writes == {}
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.entity, conflict.id, conflict.scope) == (
        "unique_violation",
        "inventory_items",
        item,
        SCOPE_A,
    )
    assert conflict.server_version is None and conflict.base_version is None
    assert conflict.proposed["sku"] == "FLOUR-25"
    assert conflict.server_state == {"unique": "sku", "held_by": holder}


def test_the_same_sku_in_another_branch_is_fine() -> None:
    other_branch_item = row(
        "inventory_items", new_id(), {**item_fields(), "branch_id": BRANCH_B}, version=3
    )
    item = new_id()
    rows = rows_of(other_branch_item)
    result = plan([create("inventory_items", item, **item_fields())], rows=rows)
    assert ("inventory_items", item) in result.writes and result.conflicts == []


@pytest.mark.parametrize("spelling", ["flour-25", "FLOUR-25  ", "FLÓUR-25"])
def test_skus_that_the_database_considers_equal_clash(spelling: str) -> None:
    # MariaDB's collation ignores case, accents and trailing spaces in the unique index.
    rows = rows_of(item_row(new_id(), sku="FLOUR-25"))
    result = plan([create("inventory_items", new_id(), **item_fields(sku=spelling))], rows=rows)
    assert only_conflict(result).kind == "unique_violation"


def test_a_sku_held_by_a_row_deleted_earlier_in_the_change_set_is_free() -> None:
    old, new = new_id(), new_id()
    rows = rows_of(item_row(old, version=2))
    ops: list[Op] = [
        delete("inventory_items", old, 2),
        create("inventory_items", new, **item_fields()),
    ]
    result = plan(ops, rows=rows)
    assert result.conflicts == []
    assert result.writes[("inventory_items", old)].data is None
    assert result.writes[("inventory_items", new)].created


def test_two_creates_with_one_sku_in_a_change_set_keep_the_first() -> None:
    first, second = new_id(), new_id()
    ops: list[Op] = [
        create("inventory_items", first, **item_fields()),
        create("inventory_items", second, **item_fields(name="Flour again")),
    ]
    result = plan(ops)
    assert list(result.writes) == [("inventory_items", first)]
    conflict = only_conflict(result)
    assert (conflict.id, conflict.op_index, conflict.server_state["held_by"]) == (second, 1, first)


def test_a_create_and_a_patch_of_the_same_row_make_one_write() -> None:
    item = new_id()
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        patch("inventory_items", item, 0, name="Rye flour", cost_cents=1999),
    ]
    result = plan(ops)
    (write,) = result.writes.values()
    assert write.created
    assert write.data is not None
    assert (write.data["name"], write.data["cost_cents"]) == ("Rye flour", 1999)


def test_a_create_then_delete_in_one_change_set_leaves_a_tombstone() -> None:
    # The tombstone reserves the id: ids are never reused, even ones no device ever saw.
    item = new_id()
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        delete("inventory_items", item, 0),
    ]
    (write,) = plan(ops).writes.values()
    assert write.data is None and not write.created


def test_later_edits_of_a_withheld_create_join_its_conflict() -> None:
    # The device believes the row exists: its later edits must not refuse the change-set.
    item = new_id()
    rows = rows_of(item_row(new_id()))
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        patch("inventory_items", item, 0, name="Strong flour"),
        patch("inventory_items", item, 0, supplier="Mill & Co"),
    ]
    result = plan(ops, rows=rows)
    assert result.writes == {}
    conflict = only_conflict(result)
    assert conflict.kind == "unique_violation" and conflict.op_index == 0
    assert (conflict.proposed["name"], conflict.proposed["supplier"]) == (
        "Strong flour",
        "Mill & Co",
    )


def test_a_withheld_create_keeps_its_branch() -> None:
    item = new_id()
    rows = rows_of(item_row(new_id()))
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        patch("inventory_items", item, 0, branch_id=BRANCH_B),
    ]
    manager = principal(branches=(BRANCH_A, BRANCH_B))
    error = only_error(plan(ops, manager, rows))
    assert (error.op_index, error.code) == (1, "immutable_field")


def test_deleting_a_withheld_create_leaves_nothing_to_resolve() -> None:
    item = new_id()
    rows = rows_of(item_row(new_id()))
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        delete("inventory_items", item, 0),
    ]
    result = plan(ops, rows=rows)
    assert (result.writes, result.conflicts, result.errors) == ({}, [], [])


def test_staff_may_not_delete_even_their_own_withheld_create() -> None:
    item = new_id()
    rows = rows_of(item_row(new_id()))
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        delete("inventory_items", item, 0),
    ]
    assert only_error(plan(ops, STAFF, rows)).code == "forbidden"


# --- patches -------------------------------------------------------------------------------


def test_a_patch_of_a_row_that_never_existed_is_refused() -> None:
    error = only_error(plan([patch("inventory_items", new_id(), 1, name="x")]))
    assert error.code == "not_found"


def test_a_patch_of_another_branchs_row_is_out_of_scope() -> None:
    item = new_id()
    rows = rows_of(row("inventory_items", item, {**item_fields(), "branch_id": BRANCH_B}))
    error = only_error(plan([patch("inventory_items", item, 1, name="x")], rows=rows))
    assert error.code == "out_of_scope"


def test_a_row_never_moves_to_another_branch() -> None:
    item = new_id()
    rows = rows_of(item_row(item))
    manager = principal(branches=(BRANCH_A, BRANCH_B))
    error = only_error(plan([patch("inventory_items", item, 1, branch_id=BRANCH_B)], manager, rows))
    assert (error.code, error.field) == ("immutable_field", "branch_id")


def test_restating_the_branch_in_another_case_is_not_a_move() -> None:
    item = new_id()
    rows = rows_of(item_row(item))
    result = plan([patch("inventory_items", item, 1, branch_id=BRANCH_A.upper())], rows=rows)
    assert (result.errors, result.writes, result.conflicts) == ([], {}, [])


def test_a_base_version_newer_than_the_row_is_refused() -> None:
    item = new_id()
    rows = rows_of(item_row(item, version=3))
    error = only_error(plan([patch("inventory_items", item, 4, name="x")], rows=rows))
    assert error.code == "invalid_base_version"


def test_a_patch_writes_only_the_fields_that_change() -> None:
    item = new_id()
    rows = rows_of(item_row(item, version=3))
    result = plan([patch("inventory_items", item, 3, name="Rye", unit="kg")], rows=rows)
    write = result.writes[("inventory_items", item)]
    assert write.changed == {"name"} and not write.created
    assert write.data is not None and write.data["name"] == "Rye"


def test_a_stale_patch_of_fields_nobody_changed_applies_cleanly() -> None:
    # Under FLAG (the menu): the price changed at v5, the device saw v2 and edits the name only.
    dish = new_id()
    server = dish_row(dish, version=5)
    server = row(
        "menu_items",
        dish,
        server.data,
        version=5,
        field_versions={"name": 1, "price_cents": 5, "available": 1, "linked_sku": 1},
    )
    result = plan([patch("menu_items", dish, 2, name="Minestrone")], rows=rows_of(server))
    assert result.conflicts == []
    assert result.writes[("menu_items", dish)].changed == {"name"}


def test_under_field_lww_a_stale_edit_of_the_same_field_wins() -> None:
    item = new_id()
    server = row(
        "inventory_items",
        item,
        {**item_row(item).data, "name": "Flour (new)"},
        version=7,
        field_versions={"name": 7},
    )
    result = plan([patch("inventory_items", item, 2, name="Flour (mine)")], rows=rows_of(server))
    assert result.conflicts == []
    data = result.writes[("inventory_items", item)].data
    assert data is not None and data["name"] == "Flour (mine)"


def test_under_flag_a_stale_edit_of_the_same_field_is_a_conflict_and_the_rest_applies() -> None:
    dish = new_id()
    server = row(
        "menu_items",
        dish,
        {**dish_row(dish).data, "price_cents": 700},
        version=6,
        field_versions={"name": 1, "price_cents": 6, "available": 1, "linked_sku": 1},
    )
    result = plan(
        [patch("menu_items", dish, 3, price_cents=800, name="Minestrone")], rows=rows_of(server)
    )
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.op_index, conflict.base_version, conflict.server_version) == (
        "concurrent_update",
        0,
        3,
        6,
    )
    assert conflict.proposed == {"price_cents": 800}
    assert conflict.server_state == {"price_cents": 700}
    write = result.writes[("menu_items", dish)]
    assert write.changed == {"name"}
    assert write.data is not None and write.data["price_cents"] == 700


def test_a_stale_edit_to_the_servers_own_value_is_neither_a_conflict_nor_a_write() -> None:
    dish = new_id()
    server = row(
        "menu_items",
        dish,
        {**dish_row(dish).data, "price_cents": 700},
        version=6,
        field_versions={"price_cents": 6},
    )
    result = plan([patch("menu_items", dish, 3, price_cents=700)], rows=rows_of(server))
    assert (result.writes, result.conflicts, result.errors) == ({}, [], [])


def test_a_field_without_a_recorded_version_counts_as_changed_at_the_rows_version() -> None:
    # Better a needless conflict than a silent overwrite of a price.
    dish = new_id()
    server = row("menu_items", dish, dish_row(dish).data, version=6, field_versions={})
    result = plan([patch("menu_items", dish, 3, price_cents=800)], rows=rows_of(server))
    assert only_conflict(result).kind == "concurrent_update"


def test_a_devices_own_edits_in_one_change_set_are_never_stale_against_each_other() -> None:
    dish = new_id()
    server = dish_row(dish, version=4)
    ops: list[Op] = [
        patch("menu_items", dish, 4, price_cents=700),
        patch("menu_items", dish, 4, price_cents=750),
    ]
    result = plan(ops, rows=rows_of(server))
    assert result.conflicts == []
    data = result.writes[("menu_items", dish)].data
    assert data is not None and data["price_cents"] == 750


def test_agreeing_with_a_concurrent_edit_then_changing_it_is_not_a_conflict() -> None:
    # Someone set 700 at v6; the device (base 3) also set 700, then 750: its own latest word.
    dish = new_id()
    server = row("menu_items", dish, {**dish_row(dish).data, "price_cents": 700}, version=6)
    ops: list[Op] = [
        patch("menu_items", dish, 3, price_cents=700),
        patch("menu_items", dish, 3, price_cents=750),
    ]
    result = plan(ops, rows=rows_of(server))
    assert result.conflicts == []
    data = result.writes[("menu_items", dish)].data
    assert data is not None and data["price_cents"] == 750


def test_a_patch_of_a_deleted_row_is_a_conflict_and_never_resurrects_it() -> None:
    dish = new_id()
    rows = rows_of(tombstone("menu_items", dish, version=9, scope="org"))
    result = plan([patch("menu_items", dish, 3, price_cents=800)], rows=rows)
    assert result.writes == {}
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.proposed, conflict.server_state) == (
        "update_deleted",
        {"price_cents": 800},
        {},
    )


def test_a_patch_after_a_delete_in_the_same_change_set_does_not_resurrect() -> None:
    item = new_id()
    rows = rows_of(item_row(item, version=2))
    ops: list[Op] = [
        delete("inventory_items", item, 2),
        patch("inventory_items", item, 2, name="x"),
    ]
    result = plan(ops, rows=rows)
    assert result.writes[("inventory_items", item)].data is None
    assert only_conflict(result).kind == "update_deleted"


def test_staff_may_mark_a_dish_unavailable_but_not_reprice_it() -> None:
    dish = new_id()
    rows = rows_of(dish_row(dish))
    assert not plan([patch("menu_items", dish, 1, available=False)], STAFF, rows).rejected
    error = only_error(plan([patch("menu_items", dish, 1, price_cents=1)], STAFF, rows))
    assert (error.code, error.field) == ("field_forbidden", "price_cents")


def test_changing_a_sku_to_a_taken_one_withholds_only_the_sku() -> None:
    holder, item = new_id(), new_id()
    rows = rows_of(item_row(holder, sku="SUGAR-1"), item_row(item, sku="FLOUR-25", version=2))
    result = plan([patch("inventory_items", item, 2, sku="sugar-1", name="Rye")], rows=rows)
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.proposed) == ("unique_violation", {"sku": "sugar-1"})
    assert conflict.server_state == {"unique": "sku", "held_by": holder}
    write = result.writes[("inventory_items", item)]
    assert write.changed == {"name"}
    assert write.data is not None and write.data["sku"] == "FLOUR-25"


def test_a_sku_released_earlier_in_the_change_set_may_be_taken() -> None:
    first, second = new_id(), new_id()
    rows = rows_of(item_row(first, sku="A", version=2), item_row(second, sku="B", version=2))
    ops: list[Op] = [
        patch("inventory_items", first, 2, sku="C"),
        patch("inventory_items", second, 2, sku="A"),
    ]
    result = plan(ops, rows=rows)
    assert result.conflicts == []
    assert {k[1]: (w.data or {})["sku"] for k, w in result.writes.items()} == {
        first: "C",
        second: "A",
    }


# --- deletes -------------------------------------------------------------------------------


def test_staff_may_not_delete() -> None:
    item = new_id()
    error = only_error(plan([delete("inventory_items", item, 1)], STAFF, rows_of(item_row(item))))
    assert error.code == "forbidden"


def test_deleting_a_row_that_never_existed_is_refused() -> None:
    assert only_error(plan([delete("inventory_items", new_id(), 1)])).code == "not_found"


def test_deleting_a_deleted_row_is_a_no_op() -> None:
    item = new_id()
    rows = rows_of(tombstone("inventory_items", item, version=5))
    result = plan([delete("inventory_items", item, 2)], rows=rows)
    assert (result.writes, result.conflicts, result.errors) == ({}, [], [])


def test_a_delete_of_an_unchanged_row_writes_a_tombstone() -> None:
    dish = new_id()
    result = plan([delete("menu_items", dish, 4)], rows=rows_of(dish_row(dish, version=4)))
    write = result.writes[("menu_items", dish)]
    assert (write.data, write.scope) == (None, "org")


def test_under_flag_deleting_a_row_modified_since_base_is_a_conflict() -> None:
    dish = new_id()
    server = row(
        "menu_items",
        dish,
        {**dish_row(dish).data, "price_cents": 900},
        version=8,
        field_versions={"name": 1, "price_cents": 8, "available": 1},
    )
    result = plan([delete("menu_items", dish, 3)], rows=rows_of(server))
    assert result.writes == {}
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.proposed, conflict.server_state) == (
        "delete_modified",
        {"deleted": True},
        {"price_cents": 900},
    )


def test_under_flag_the_devices_own_edit_does_not_hide_a_concurrent_one_from_its_delete() -> None:
    dish = new_id()
    server = row(
        "menu_items",
        dish,
        dish_row(dish).data,
        version=8,
        field_versions={"name": 1, "price_cents": 8, "available": 1},
    )
    ops: list[Op] = [patch("menu_items", dish, 3, available=False), delete("menu_items", dish, 3)]
    result = plan(ops, rows=rows_of(server))
    assert only_conflict(result).kind == "delete_modified"


def test_a_delete_from_a_base_newer_than_the_row_is_refused() -> None:
    item = new_id()
    rows = rows_of(item_row(item, version=3))
    assert only_error(plan([delete("inventory_items", item, 4)], rows=rows)).code == (
        "invalid_base_version"
    )


def test_under_field_lww_a_stale_delete_deletes() -> None:
    item = new_id()
    result = plan([delete("inventory_items", item, 1)], rows=rows_of(item_row(item, version=9)))
    assert result.conflicts == []
    assert result.writes[("inventory_items", item)].data is None


def test_deleting_another_branchs_row_is_out_of_scope() -> None:
    item = new_id()
    rows = rows_of(row("inventory_items", item, {**item_fields(), "branch_id": BRANCH_B}))
    assert only_error(plan([delete("inventory_items", item, 1)], rows=rows)).code == "out_of_scope"


# --- intents -------------------------------------------------------------------------------


def test_marking_a_dish_sold_out_ignores_versions() -> None:
    dish = new_id()
    server = dish_row(dish, version=40)
    result = plan([intent(SOLD_OUT, menu_item_id=dish)], STAFF, rows_of(server))
    assert result.conflicts == []
    write = result.writes[("menu_items", dish)]
    assert write.changed == {"available"}
    assert write.data is not None and write.data["available"] is False


def test_marking_a_sold_out_dish_sold_out_writes_nothing() -> None:
    dish = new_id()
    result = plan(
        [intent(SOLD_OUT, menu_item_id=dish)], STAFF, rows_of(dish_row(dish, available=False))
    )
    assert (result.writes, result.conflicts, result.errors) == ({}, [], [])


def test_an_intent_accepts_an_upper_case_id() -> None:
    dish = new_id()
    ops: list[Op] = [intent(SOLD_OUT, menu_item_id=dish.upper())]
    assert touched_keys(ops, REGISTRY) == [("menu_items", dish)]
    assert ("menu_items", dish) in plan(ops, STAFF, rows_of(dish_row(dish))).writes


def test_an_unknown_intent_is_refused() -> None:
    assert only_error(plan([intent("menu.reprice_all", percent=10)])).code == "unknown_intent"


@pytest.mark.parametrize(
    ("args", "code", "field"),
    [
        ({}, "required", "menu_item_id"),
        ({"menu_item_id": None}, "required", "menu_item_id"),
        ({"menu_item_id": 12}, "wrong_type", "menu_item_id"),
        ({"menu_item_id": "soup"}, "invalid", "menu_item_id"),
    ],
)
def test_an_intent_with_bad_arguments_is_refused(
    args: dict[str, Any], code: str, field: str
) -> None:
    error = only_error(plan([intent(SOLD_OUT, **args)], STAFF))
    assert (error.code, error.field) == (code, field)


def test_an_intent_with_an_unknown_argument_is_refused() -> None:
    dish = new_id()
    error = only_error(plan([intent(SOLD_OUT, menu_item_id=dish, until="tomorrow")], STAFF))
    assert (error.code, error.field) == ("unknown_field", "until")


def test_marking_a_missing_dish_sold_out_is_refused() -> None:
    error = only_error(plan([intent(SOLD_OUT, menu_item_id=new_id())], STAFF))
    assert (error.code, error.field) == ("not_found", "menu_item_id")


def test_marking_a_deleted_dish_sold_out_is_kept_as_a_conflict() -> None:
    dish = new_id()
    rows = rows_of(tombstone("menu_items", dish, version=3, scope="org"))
    result = plan([intent(SOLD_OUT, menu_item_id=dish)], STAFF, rows)
    assert result.writes == {}
    conflict = only_conflict(result)
    assert (conflict.kind, conflict.id) == ("update_deleted", dish)
    assert conflict.proposed == {"intent": SOLD_OUT, "args": {"menu_item_id": dish}}


def test_an_intent_on_a_withheld_create_is_blocked_with_it() -> None:
    item_registry = _registry_with_an_inventory_intent()
    holder, item = new_id(), new_id()
    ops: list[Op] = [
        create("inventory_items", item, **item_fields()),
        intent("inventory.rename", item_id=item, name="Rye"),
    ]
    result = plan(ops, rows=rows_of(item_row(holder)), registry=item_registry)
    assert result.writes == {}
    withheld, blocked = result.conflicts
    assert withheld.kind == "unique_violation"
    assert (blocked.kind, blocked.id, blocked.op_index) == ("blocked_by_conflict", item, 1)
    assert blocked.server_state == {"blocked_by": "unique_violation", "op_index": 0}


def _registry_with_an_inventory_intent() -> Registry:
    from domain.catalog import INVENTORY_ITEMS
    from domain.registry import IntentSpec

    def targets(args: Any) -> list[tuple[str, str]]:
        return [("inventory_items", str(args["item_id"]))]

    def apply(args: Any, rows: Any) -> Any:
        return {("inventory_items", str(args["item_id"])): {"name": args["name"]}}

    rename = IntentSpec(
        name="inventory.rename",
        args={"item_id": f.uuid_ref(), "name": f.text(200)},
        allowed=frozenset(Role),
        targets=targets,
        apply=apply,
    )
    return Registry(
        entities={"inventory_items": INVENTORY_ITEMS}, intents={"inventory.rename": rename}
    )


def test_a_forbidden_role_may_not_run_an_intent() -> None:
    from domain.registry import IntentSpec

    managers_only = IntentSpec(
        name="menu.close",
        args={},
        allowed=frozenset({Role.MANAGER}),
        targets=lambda args: [],
        apply=lambda args, rows: {},
    )
    registry = Registry(entities=REGISTRY.entities, intents={"menu.close": managers_only})
    assert only_error(plan([intent("menu.close")], STAFF, registry=registry)).code == "forbidden"
    assert not plan([intent("menu.close")], MANAGER, registry=registry).rejected


# --- atomicity -----------------------------------------------------------------------------


def test_one_refused_op_refuses_the_whole_change_set_and_says_which() -> None:
    dish = new_id()
    server = row(
        "menu_items", dish, dish_row(dish).data, version=6, field_versions={"price_cents": 6}
    )
    ops: list[Op] = [
        create("inventory_items", new_id(), **item_fields()),
        patch("menu_items", dish, 2, price_cents=10),  # a conflict on its own
        create("inventory_items", new_id(), **item_fields(sku="S2", unit="dozen")),
    ]
    result = plan(ops, rows=rows_of(server))
    assert result.rejected
    assert result.writes == {} and result.conflicts == [] and result.scopes() == set()
    assert [(e.op_index, e.code, e.field) for e in result.errors] == [(2, "invalid_choice", "unit")]


def test_a_plan_lists_the_scopes_it_writes() -> None:
    dish = new_id()
    ops: list[Op] = [
        create("inventory_items", new_id(), **item_fields()),
        patch("menu_items", dish, 1, name="Broth"),
    ]
    assert plan(ops, rows=rows_of(dish_row(dish))).scopes() == {SCOPE_A, "org"}


def test_the_planner_does_not_change_the_rows_it_is_given() -> None:
    item = new_id()
    server = item_row(item, version=2)
    rows: dict[tuple[str, str], RowState | None] = {("inventory_items", item): server}
    plan_change_set(
        [patch("inventory_items", item, 2, name="x"), delete("inventory_items", item, 2)],
        MANAGER,
        rows,
        REGISTRY,
    )
    assert rows == {("inventory_items", item): server}


def test_touched_keys_lists_every_named_row_once_in_order() -> None:
    a, b, dish = new_id(), new_id(), new_id()
    ops: list[Op] = [
        create("inventory_items", a, **item_fields()),
        patch("inventory_items", b, 1, name="x"),
        intent(SOLD_OUT, menu_item_id=dish),
        delete("inventory_items", a, 0),
        intent(SOLD_OUT, menu_item_id=12),  # bad arguments: the planner reports them
        intent(SOLD_OUT),
        intent("no.such.intent", x=1),
    ]
    assert touched_keys(ops, REGISTRY) == [
        ("inventory_items", a),
        ("inventory_items", b),
        ("menu_items", dish),
        # Loading a row that cannot exist is harmless; the planner refuses the argument.
        ("menu_items", "12"),
    ]


def test_a_memory_server_round_trip_versions_each_scope_once_per_change_set() -> None:
    server = MemoryServer()
    a, b, dish = new_id(), new_id(), new_id()
    server.push(
        [
            create("inventory_items", a, **item_fields()),
            create("inventory_items", b, **item_fields(sku="B")),
            create("menu_items", dish, **dish_fields()),
        ]
    )
    assert server.heads == {SCOPE_A: 1, "org": 1}
    server.push([patch("inventory_items", a, 1, name="Rye")])
    assert server.rows[("inventory_items", a)].field_versions["name"] == 2
    assert server.rows[("inventory_items", a)].field_versions["sku"] == 1
