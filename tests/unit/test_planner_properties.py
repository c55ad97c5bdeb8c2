"""Properties of the planner for any sequence of ops, checked with hypothesis.

Change-sets are planned and applied by ``MemoryServer``, which writes plans as the engine does,
so the properties hold for what a database would contain, not just for single plans.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from conflict.planner import Plan
from domain.catalog import INVENTORY_UNITS
from domain.ops import DeleteOp, IntentOp, Op, Principal
from domain.registry import unique_form
from domain.roles import Role
from tests.unit.planning import (
    ADMIN,
    BRANCH_A,
    BRANCH_B,
    MANAGER,
    MemoryServer,
    create,
    delete,
    dish_row,
    intent,
    item_row,
    patch,
    principal,
    row,
)

ITEM_IDS = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 4)]
DISH_IDS = [f"00000000-0000-4000-9000-00000000000{n}" for n in range(1, 3)]
# A manager of both branches, whose device is in branch A.
TWO_BRANCH_MANAGER = principal(Role.MANAGER, branches=(BRANCH_A, BRANCH_B))

REFUSALS = {
    "unknown_entity",
    "unknown_intent",
    "unknown_field",
    "forbidden",
    "field_forbidden",
    "out_of_scope",
    "required",
    "wrong_type",
    "too_long",
    "too_short",
    "invalid",
    "invalid_choice",
    "out_of_range",
    "read_only",
    "already_exists",
    "not_found",
    "immutable_field",
    "invalid_base_version",
}
CONFLICTS = {
    "concurrent_update",
    "update_deleted",
    "delete_modified",
    "unique_violation",
    "blocked_by_conflict",
}

# Values chosen to collide: SKUs that the database considers equal, a handful of names.
skus = st.sampled_from(["A-1", "a-1", "A-1 ", "B-2", "Café", "CAFE"])
names = st.sampled_from(["Flour", "Sugar", "Salt", "Oil"])
item_values: dict[str, st.SearchStrategy[Any]] = {
    "sku": skus,
    "name": names,
    "category": st.sampled_from(["dry", "wet"]),
    "unit": st.sampled_from(INVENTORY_UNITS),
    "cost_cents": st.integers(0, 10_000),
    "supplier": st.none() | names,
}
dish_values: dict[str, st.SearchStrategy[Any]] = {
    "name": names,
    "price_cents": st.integers(0, 2_000),
    "available": st.booleans(),
    "linked_sku": st.none() | skus,
}
VALUES = {"inventory_items": item_values, "menu_items": dish_values}
IDS = {"inventory_items": ITEM_IDS, "menu_items": DISH_IDS}
REQUIRED = {"inventory_items": ["sku", "name", "category", "unit"], "menu_items": ["name"]}


def draw_fields(data: st.DataObject, entity: str, *, required: list[str]) -> dict[str, Any]:
    strategies = VALUES[entity]
    chosen = data.draw(st.sets(st.sampled_from(sorted(strategies))))
    return {name: data.draw(strategies[name]) for name in sorted(chosen | set(required))}


def draw_op(data: st.DataObject, server: MemoryServer) -> Op:
    """A well-formed op a manager's device could send, given what the server holds."""
    entity = data.draw(st.sampled_from(sorted(IDS)))
    row_id = data.draw(st.sampled_from(IDS[entity]))
    current = server.rows.get((entity, row_id))
    # A device's base is a version it saw: the current one or an older one.
    base = data.draw(st.integers(0, current.version if current is not None else 0))
    kind = data.draw(st.sampled_from(["create", "patch", "delete", "intent"]))
    if kind == "create":
        required = [*REQUIRED[entity], *(["price_cents"] if entity == "menu_items" else [])]
        return create(entity, row_id, **draw_fields(data, entity, required=required))
    if kind == "patch":
        return patch(entity, row_id, base, **draw_fields(data, entity, required=[]))
    if kind == "delete":
        return delete(entity, row_id, base)
    return intent("menu.mark_sold_out", menu_item_id=data.draw(st.sampled_from(DISH_IDS)))


def assert_plan_is_well_formed(result: Plan) -> None:
    if result.rejected:
        assert result.writes == {} and result.conflicts == []
        assert {e.code for e in result.errors} <= REFUSALS
    for key, write in result.writes.items():
        # One write per row: a plan cannot version (or count) a row twice.
        assert key == (write.entity, write.id)
        assert write.changed <= set(write.data or {}) or write.data is None
    assert {c.kind for c in result.conflicts} <= CONFLICTS


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_sequence_of_manager_ops_plans_without_raising_and_keeps_invariants(
    data: st.DataObject,
) -> None:
    server = MemoryServer()
    deleted: set[tuple[str, str]] = set()
    for _ in range(data.draw(st.integers(1, 6))):
        ops = [draw_op(data, server) for _ in range(data.draw(st.integers(1, 5)))]
        heads_before = dict(server.heads)
        result = server.push(ops, MANAGER)
        assert_plan_is_well_formed(result)
        # Each scope the change-set wrote moved by exactly one version.
        for scope in {w.scope for w in result.writes.values()}:
            assert server.heads[scope] == heads_before.get(scope, 0) + 1
        # A deleted row is never resurrected, by any op.
        for key in deleted:
            assert server.rows[key].deleted
        deleted |= {k for k, r in server.rows.items() if r.deleted}
        # No two live items of a branch hold SKUs the database would consider equal.
        live_skus = [
            (r.scope, unique_form(r.data["sku"]))
            for r in server.rows.values()
            if r.entity == "inventory_items" and not r.deleted
        ]
        assert len(live_skus) == len(set(live_skus))


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70)
field_names = st.sampled_from(
    ["sku", "name", "unit", "cost_cents", "branch_id", "available", "price_cents", "colour"]
)
any_fields = st.dictionaries(field_names, scalars, max_size=4)
any_entity = st.sampled_from(["inventory_items", "menu_items", "staff", "recipes"])
any_id = st.sampled_from([*ITEM_IDS, *DISH_IDS])
any_op = st.one_of(
    st.tuples(any_entity, any_id, any_fields).map(lambda t: create(t[0], t[1], **t[2])),
    st.tuples(any_entity, any_id, st.integers(0, 5), any_fields).map(
        lambda t: patch(t[0], t[1], t[2], **t[3])
    ),
    st.tuples(any_entity, any_id, st.integers(0, 5)).map(lambda t: delete(*t)),
    st.dictionaries(st.sampled_from(["menu_item_id", "qty"]), scalars | any_id, max_size=2).map(
        lambda args: intent("menu.mark_sold_out", **args)
    ),
)
roles = st.sampled_from(
    [
        principal(Role.STAFF),
        MANAGER,
        TWO_BRANCH_MANAGER,
        ADMIN,
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(any_op, min_size=1, max_size=4), max_size=4), roles)
def test_any_input_from_any_role_is_planned_or_refused_never_raises(
    change_sets: list[list[Op]], who: Principal
) -> None:
    server = MemoryServer()
    server.seed(item_row(ITEM_IDS[0], version=2), dish_row(DISH_IDS[0], version=3))
    for ops in change_sets:
        assert_plan_is_well_formed(server.push(ops, who))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_concurrent_patches_of_disjoint_fields_commute(data: st.DataObject) -> None:
    """Two devices edit different fields of a row from the same base: the order in which
    their change-sets arrive does not change the result, under either merge policy."""
    entity = data.draw(st.sampled_from(sorted(VALUES)))
    row_id = IDS[entity][0]
    version = data.draw(st.integers(1, 5))
    start = item_row(row_id, version=version) if entity == "inventory_items" else None
    if start is None:
        start = dish_row(row_id, version=version)
    # Fields last changed at assorted versions up to the row's.
    start = row(
        entity,
        row_id,
        start.data,
        version=version,
        field_versions={k: data.draw(st.integers(1, version)) for k in start.data},
    )
    base = data.draw(st.integers(0, version))
    strategies = VALUES[entity]
    first_fields = data.draw(st.sets(st.sampled_from(sorted(strategies)), min_size=1))
    rest = sorted(set(strategies) - first_fields)
    second_fields = data.draw(st.sets(st.sampled_from(rest), min_size=1)) if rest else set()
    first = patch(entity, row_id, base, **{n: data.draw(strategies[n]) for n in first_fields})
    second = patch(entity, row_id, base, **{n: data.draw(strategies[n]) for n in second_fields})

    finals = []
    for order in ([first, second], [second, first]):
        server = MemoryServer()
        server.seed(start)
        conflicts = []
        for op in order:
            conflicts += server.push([op]).conflicts
        finals.append(
            (server.data(entity, row_id), sorted((c.kind, c.op_index) for c in conflicts))
        )
    assert finals[0][0] == finals[1][0]
    # The conflicts (edits of fields changed before the devices' base) do not depend on order.
    assert finals[0][1] == finals[1][1]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_under_flag_a_stale_edit_of_a_field_never_silently_overwrites(
    data: st.DataObject,
) -> None:
    """Whatever happened to a menu item since the device saw it, a device's edit of a field
    someone else changed meanwhile is either a conflict or agrees with the server."""
    dish = DISH_IDS[0]
    server = MemoryServer()
    server.seed(dish_row(dish, version=1))
    seen = 1
    seen_data = server.data("menu_items", dish)
    # Other devices edit the item a few times (always from the latest version).
    for _ in range(data.draw(st.integers(1, 4))):
        current = server.rows[("menu_items", dish)].version
        edit = draw_fields(data, "menu_items", required=[])
        server.push([patch("menu_items", dish, current, **edit)], TWO_BRANCH_MANAGER)
    before = server.data("menu_items", dish)
    assert before is not None and seen_data is not None
    versions = dict(server.rows[("menu_items", dish)].field_versions)
    # Our device, still at version ``seen``, edits some fields.
    mine = draw_fields(data, "menu_items", required=[])
    result = server.push([patch("menu_items", dish, seen, **mine)], MANAGER)
    after = server.data("menu_items", dish)
    assert after is not None
    flagged = {n for c in result.conflicts for n in c.proposed}
    for name, value in mine.items():
        changed_by_others = versions[name] > seen
        if changed_by_others and value != before[name]:
            # Stale and different: kept aside, the server's value stands.
            assert name in flagged and after[name] == before[name]
        else:
            assert name not in flagged and after[name] == value


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_under_field_lww_the_last_arriving_edit_of_a_field_wins(data: st.DataObject) -> None:
    item = ITEM_IDS[0]
    server = MemoryServer()
    server.seed(item_row(item, version=1))
    edits = [
        draw_fields(data, "inventory_items", required=[])
        for _ in range(data.draw(st.integers(1, 4)))
    ]
    expected = dict(server.data("inventory_items", item) or {})
    for edit in edits:
        # Every device edits from version 1: all but the first are stale.
        result = server.push([patch("inventory_items", item, 1, **edit)], MANAGER)
        assert (result.errors, result.conflicts) == ([], [])
        expected.update(edit)
    assert server.data("inventory_items", item) == expected


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_an_accepted_op_is_applied_or_kept_as_a_conflict_never_silently_dropped(
    data: st.DataObject,
) -> None:
    """The promise behind "no acknowledged change is ever lost": once a change-set is
    accepted, each of its edits is on the server or waits in a conflict for a manager."""
    server = MemoryServer()
    for _ in range(data.draw(st.integers(1, 8))):
        op = draw_op(data, server)
        result = server.push([op], MANAGER)
        if result.rejected:
            continue
        kept = {name for c in result.conflicts for name in c.proposed}
        kinds = {c.kind for c in result.conflicts}
        if isinstance(op, IntentOp):
            dish = server.data("menu_items", str(op.args["menu_item_id"]))
            assert (dish is not None and dish["available"] is False) or "update_deleted" in kinds
            continue
        after = server.data(op.entity, op.id)
        if isinstance(op, DeleteOp):
            assert after is None or kinds == {"delete_modified"}
            continue
        for name, value in op.fields.items():
            assert (after is not None and after[name] == value) or name in kept, (name, kinds)
