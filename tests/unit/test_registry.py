"""One declaration per synced entity: where it lives, who writes what, who sees what."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import fields as f
from domain.catalog import INVENTORY_ITEMS, MENU_ITEMS, STAFF, default_registry
from domain.ops import Principal
from domain.registry import (
    BRANCH_SCOPE,
    ORG_SCOPE,
    EntitySpec,
    MergePolicy,
    branch_scope,
    filter_fields,
    scope_branch,
    unique_form,
)
from domain.roles import ROLES, Role, parse_role

BRANCH = "aaaaaaaa-0000-4000-8000-000000000001"
OTHER = "bbbbbbbb-0000-4000-8000-000000000002"


def test_the_registry_declares_the_synced_entities_and_the_sold_out_intent() -> None:
    registry = default_registry()
    assert set(registry.entities) == {
        "branches",
        "staff",
        "devices",
        "inventory_items",
        "menu_items",
    }
    assert set(registry.intents) == {"menu.mark_sold_out"}
    assert registry.entity("inventory_items") is INVENTORY_ITEMS
    assert registry.entity("recipes") is None


@pytest.mark.parametrize("entity", ["branches", "staff", "devices"])
def test_server_owned_entities_are_read_only_over_sync(entity: str) -> None:
    spec = default_registry().entities[entity]
    for role in ROLES:
        assert spec.writable_by(role) == frozenset()
    assert spec.creatable_by == frozenset() and spec.deletable_by == frozenset()


def test_every_default_is_a_valid_value_of_its_field() -> None:
    for spec in default_registry().entities.values():
        for name, value in spec.defaults.items():
            assert spec.fields[name].check(name, value) is None, (spec.name, name)


def test_a_role_writes_no_more_than_the_role_above_it() -> None:
    for spec in default_registry().entities.values():
        assert spec.writable_by(Role.STAFF) <= spec.writable_by(Role.MANAGER), spec.name
        assert spec.writable_by(Role.MANAGER) <= spec.writable_by(Role.ADMIN), spec.name


def test_a_creator_may_write_every_required_field_or_it_is_branch_defaulted() -> None:
    # Otherwise nobody allowed to create the entity could ever create a valid row.
    for spec in default_registry().entities.values():
        for role in spec.creatable_by:
            unwritable = spec.required_fields() - spec.writable_by(role)
            assert unwritable <= {spec.scope_field}, (spec.name, role, unwritable)


def test_staff_never_receive_contact_data_of_the_staff_directory() -> None:
    row = {
        "display_name": "Ada",
        "role": "staff",
        "branch_ids": [BRANCH],
        "active": True,
        "email": "ada@example.com",
        "phone": "+44 20 0000 0000",
    }
    assert filter_fields(STAFF, Role.STAFF, row) == {
        "display_name": "Ada",
        "role": "staff",
        "branch_ids": [BRANCH],
        "active": True,
    }
    assert filter_fields(STAFF, Role.MANAGER, row) == row
    assert STAFF.visible_fields(Role.STAFF) == {"display_name", "role", "branch_ids", "active"}


def test_a_key_the_registry_does_not_declare_is_never_sent() -> None:
    row = {"display_name": "Ada", "password_hash": "$argon2id$...", "pay_rate_cents": 1500}
    assert filter_fields(STAFF, Role.ADMIN, row) == {"display_name": "Ada"}


def test_the_required_fields_of_an_item_are_those_without_a_default() -> None:
    assert INVENTORY_ITEMS.required_fields() == {"branch_id", "sku", "name", "category", "unit"}
    assert MENU_ITEMS.required_fields() == {"name", "price_cents"}


def test_the_scope_of_a_row_comes_from_its_branch_or_is_the_organisation() -> None:
    assert INVENTORY_ITEMS.scope_of({"branch_id": BRANCH}) == f"branch:{BRANCH}"
    assert INVENTORY_ITEMS.scope_of({}) is None
    assert INVENTORY_ITEMS.scope_of({"branch_id": 5}) is None
    assert MENU_ITEMS.scope_of({}) == ORG_SCOPE


def test_branch_scope_names_round_trip() -> None:
    assert scope_branch(branch_scope(BRANCH)) == BRANCH
    assert scope_branch(ORG_SCOPE) is None


def test_the_merge_policies_of_the_first_records() -> None:
    # Stock records merge per field; a price is never overwritten silently.
    assert INVENTORY_ITEMS.merge is MergePolicy.FIELD_LWW
    assert MENU_ITEMS.merge is MergePolicy.FLAG


@pytest.mark.parametrize(
    ("a", "b"),
    [("FLOUR-25", "flour-25"), ("FLOUR-25", "FLOUR-25  "), ("Café", "CAFE"), ("Ünit", "unit")],
)
def test_unique_values_compare_as_the_database_does(a: str, b: str) -> None:
    assert unique_form(a) == unique_form(b)


@pytest.mark.parametrize(("a", "b"), [("FLOUR-25", " FLOUR-25"), ("A-1", "A-2"), ("ab", "a b")])
def test_different_unique_values_stay_different(a: str, b: str) -> None:
    assert unique_form(a) != unique_form(b)


@given(st.text(st.characters(max_codepoint=127)) | st.text())
def test_the_unique_form_of_any_text_is_its_accentless_lowercase_without_trailing_spaces(
    value: str,
) -> None:
    # The definition, spelled out slowly: the fast path for ASCII text must agree with it.
    bare = "".join(c for c in unicodedata.normalize("NFD", value) if not unicodedata.combining(c))
    assert unique_form(value) == bare.lower().rstrip(" ")


def test_a_null_never_clashes_in_a_unique_group() -> None:
    assert INVENTORY_ITEMS.unique_key(("sku",), {"sku": None}) is None
    assert INVENTORY_ITEMS.unique_key(("sku",), {"sku": "A-1 "}) == ("a-1",)


def _spec(**overrides: Any) -> EntitySpec:
    values: dict[str, Any] = {
        "name": "things",
        "scope_kind": BRANCH_SCOPE,
        "scope_field": "branch_id",
        "fields": {"branch_id": f.uuid_ref(), "label": f.text(10)},
    }
    values.update(overrides)
    return EntitySpec(**values)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"scope_field": None}, "needs a scope_field"),
        ({"scope_field": "label"}, "must be a uuid field"),
        ({"scope_kind": ORG_SCOPE}, "has no scope_field"),
        ({"scope_kind": "region"}, "scope_kind must be"),
        ({"writable": {Role.STAFF: frozenset({"colour"})}}, "no field named 'colour'"),
        ({"hidden": {Role.STAFF: frozenset({"pay"})}}, "no field named 'pay'"),
        ({"unique": (("code",),)}, "no field named 'code'"),
        ({"defaults": {"label": 5}}, "default of label"),
        ({"defaults": {"label": None}}, "default of label"),
    ],
)
def test_a_contradictory_declaration_is_refused_at_import(
    overrides: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        _spec(**overrides)


def test_a_consistent_declaration_is_accepted() -> None:
    spec = _spec(defaults={"label": "new"}, unique=(("label",),))
    assert spec.required_fields() == {"branch_id"}


def test_a_user_reaches_the_organisation_and_their_own_branches() -> None:
    staff = Principal("u", Role.STAFF, frozenset({BRANCH}), BRANCH)
    assert staff.may_access(ORG_SCOPE)
    assert staff.may_access(branch_scope(BRANCH))
    assert not staff.may_access(branch_scope(OTHER))
    assert not staff.may_access("elsewhere")


def test_an_admin_reaches_every_existing_branch_and_no_other() -> None:
    # The engine fills an admin's branch_ids with every existing branch.
    admin = Principal("u", Role.ADMIN, frozenset({OTHER}), None)
    assert admin.may_access(branch_scope(OTHER))
    assert admin.may_access(ORG_SCOPE)
    assert not admin.may_access(branch_scope(BRANCH))


@pytest.mark.parametrize(
    "scope",
    ["elsewhere", "branch:", "branch:kitchen", f"branch:{OTHER.upper()}", f"branch:{{{OTHER}}}"],
)
def test_not_even_an_admin_reaches_a_malformed_scope(scope: str) -> None:
    # The engine locks, and so creates, the counter of any scope it is allowed to reach.
    assert not Principal("u", Role.ADMIN, frozenset({OTHER}), None).may_access(scope)


def test_the_scope_of_a_row_names_its_branch_in_lower_case() -> None:
    assert INVENTORY_ITEMS.scope_of({"branch_id": BRANCH.upper()}) == f"branch:{BRANCH}"


def test_roles_parse_from_their_names_only() -> None:
    assert parse_role("manager") is Role.MANAGER
    with pytest.raises(ValueError, match="unknown role 'owner'"):
        parse_role("owner")
