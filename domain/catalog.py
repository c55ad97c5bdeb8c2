"""The entities Galley synchronises, declared in one place.

Server-owned entities (branches, the staff directory, devices) are read-only over sync: they
change through /api/v1 and the CLI. Devices write inventory and menu rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import fields as f
from .fields import FieldError, Value
from .registry import BRANCH_SCOPE, ORG_SCOPE, EntitySpec, IntentSpec, MergePolicy, Registry
from .roles import Role

EVERYONE = frozenset(Role)
MANAGERS = frozenset({Role.MANAGER, Role.ADMIN})

BRANCHES = EntitySpec(
    name="branches",
    scope_kind=ORG_SCOPE,
    fields={"code": f.text(32), "name": f.text(200)},
)

# The staff directory: everyone sees who works where; contact data only managers see.
STAFF = EntitySpec(
    name="staff",
    scope_kind=ORG_SCOPE,
    fields={
        "display_name": f.text(200),
        "role": f.choice("staff", "manager", "admin"),
        "branch_ids": f.text_list(),
        "active": f.boolean(),
        "email": f.text(320),
        "phone": f.text(64, nullable=True),
    },
    hidden={Role.STAFF: frozenset({"email", "phone"})},
)

DEVICES = EntitySpec(
    name="devices",
    scope_kind=BRANCH_SCOPE,
    scope_field="branch_id",
    fields={
        "branch_id": f.uuid_ref(),
        "user_id": f.uuid_ref(),
        "platform": f.text(32),
        "app_version": f.text(32),
    },
)

INVENTORY_UNITS = ("each", "g", "kg", "ml", "l", "case", "pack")

INVENTORY_ITEMS = EntitySpec(
    name="inventory_items",
    scope_kind=BRANCH_SCOPE,
    scope_field="branch_id",
    fields={
        "branch_id": f.uuid_ref(),
        "sku": f.text(64),
        "name": f.text(200),
        "category": f.text(100),
        "unit": f.choice(*INVENTORY_UNITS),
        "cost_cents": f.money(),
        "supplier": f.text(200, nullable=True),
    },
    writable={
        Role.STAFF: frozenset({"branch_id", "sku", "name", "category", "unit"}),
        Role.MANAGER: frozenset(
            {"branch_id", "sku", "name", "category", "unit", "cost_cents", "supplier"}
        ),
        Role.ADMIN: frozenset(
            {"branch_id", "sku", "name", "category", "unit", "cost_cents", "supplier"}
        ),
    },
    creatable_by=EVERYONE,
    deletable_by=MANAGERS,
    merge=MergePolicy.FIELD_LWW,
    defaults={"cost_cents": 0, "supplier": None},
    unique=(("sku",),),
)

MENU_ITEMS = EntitySpec(
    name="menu_items",
    scope_kind=ORG_SCOPE,
    fields={
        "name": f.text(200),
        "price_cents": f.money(),
        "available": f.boolean(),
        "linked_sku": f.text(64, nullable=True),
    },
    writable={
        Role.STAFF: frozenset({"available"}),
        Role.MANAGER: frozenset({"name", "price_cents", "available", "linked_sku"}),
        Role.ADMIN: frozenset({"name", "price_cents", "available", "linked_sku"}),
    },
    creatable_by=MANAGERS,
    deletable_by=MANAGERS,
    # A price is not something to overwrite silently: concurrent edits go to a manager.
    merge=MergePolicy.FLAG,
    defaults={"available": True, "linked_sku": None},
)


def _sold_out_targets(args: Mapping[str, Value]) -> list[tuple[str, str]]:
    return [("menu_items", str(args["menu_item_id"]))]


def _sold_out_apply(
    args: Mapping[str, Value], rows: Mapping[tuple[str, str], Mapping[str, Any] | None]
) -> dict[tuple[str, str], dict[str, Value]] | FieldError:
    key = ("menu_items", str(args["menu_item_id"]))
    if rows.get(key) is None:
        return FieldError("menu_item_id", "not_found", "no such menu item")
    # Whatever happened to the item meanwhile, "we ran out" stays true: no version to compare.
    return {key: {"available": False}}


MARK_SOLD_OUT = IntentSpec(
    name="menu.mark_sold_out",
    args={"menu_item_id": f.uuid_ref()},
    allowed=EVERYONE,
    targets=_sold_out_targets,
    apply=_sold_out_apply,
)


def default_registry() -> Registry:
    """The registry of every synced entity and intent."""
    entities = (BRANCHES, STAFF, DEVICES, INVENTORY_ITEMS, MENU_ITEMS)
    intents = (MARK_SOLD_OUT,)
    return Registry(entities={e.name: e for e in entities}, intents={i.name: i for i in intents})
