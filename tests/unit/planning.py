"""Builders for planner tests, and a pure in-memory server that applies plans as the engine does.

``MemoryServer`` mirrors what ``sync_server.push`` and ``sync_server.changelog`` do with a plan
(one version per scope per change-set; field versions move for changed fields; a tombstone
forgets them), so properties can be stated over sequences of change-sets without a database.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conflict.planner import Plan, plan_change_set, touched_keys
from domain.catalog import default_registry
from domain.ops import CreateOp, DeleteOp, IntentOp, Op, PatchOp, Principal, RowState
from domain.registry import ORG_SCOPE, Registry, branch_scope
from domain.roles import Role

REGISTRY = default_registry()

BRANCH_A = "aaaaaaaa-0000-4000-8000-000000000001"
BRANCH_B = "bbbbbbbb-0000-4000-8000-000000000002"
SCOPE_A = branch_scope(BRANCH_A)
SCOPE_B = branch_scope(BRANCH_B)

Key = tuple[str, str]


def new_id() -> str:
    return str(uuid.uuid4())


def principal(
    role: Role = Role.MANAGER,
    branches: Sequence[str] = (BRANCH_A,),
    device_branch: str | None = BRANCH_A,
) -> Principal:
    return Principal(f"user-{role}", role, frozenset(branches), device_branch)


STAFF = principal(Role.STAFF)
MANAGER = principal(Role.MANAGER)
# An admin's principal lists every existing branch (the engine loads them all).
ADMIN = principal(Role.ADMIN, branches=(BRANCH_A, BRANCH_B), device_branch=None)


def item_fields(**overrides: Any) -> dict[str, Any]:
    """Fields of a valid inventory item as a manager creates it (branch from the device)."""
    values: dict[str, Any] = {
        "sku": "FLOUR-25",
        "name": "Flour 25 kg",
        "category": "dry goods",
        "unit": "kg",
    }
    values.update(overrides)
    return values


def dish_fields(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"name": "Soup of the day", "price_cents": 650}
    values.update(overrides)
    return values


def row(
    entity: str,
    row_id: str,
    data: Mapping[str, Any],
    *,
    version: int = 1,
    scope: str | None = None,
    field_versions: Mapping[str, int] | None = None,
    deleted: bool = False,
) -> RowState:
    """A server row; by default every field was last written at ``version``."""
    if scope is None:
        branch = data.get("branch_id")
        scope = branch_scope(branch) if isinstance(branch, str) else ORG_SCOPE
    versions = {k: version for k in data} if field_versions is None else dict(field_versions)
    return RowState(
        entity, row_id, scope, version, deleted, {} if deleted else dict(data), versions
    )


def item_row(row_id: str, *, version: int = 1, **overrides: Any) -> RowState:
    data = {"branch_id": BRANCH_A, "cost_cents": 0, "supplier": None, **item_fields()}
    data.update(overrides)
    return row("inventory_items", row_id, data, version=version)


def dish_row(row_id: str, *, version: int = 1, **overrides: Any) -> RowState:
    data = {"available": True, "linked_sku": None, **dish_fields()}
    data.update(overrides)
    return row("menu_items", row_id, data, version=version)


def tombstone(entity: str, row_id: str, *, version: int, scope: str = SCOPE_A) -> RowState:
    return RowState(entity, row_id, scope, version, True, {}, {})


def rows_of(*states: RowState) -> dict[Key, RowState | None]:
    return {(s.entity, s.id): s for s in states}


def plan(
    ops: Sequence[Op],
    who: Principal = MANAGER,
    rows: Mapping[Key, RowState | None] | None = None,
    *,
    registry: Registry = REGISTRY,
    unique_index: Mapping[Any, str] | None = None,
) -> Plan:
    """Plan ``ops`` as the engine would, over ``rows`` (a row not given does not exist)."""
    known = dict(rows or {})
    loaded = {key: known.get(key) for key in touched_keys(ops, registry)}
    if unique_index is None:
        unique_index = unique_index_of(known.values(), registry)
    return plan_change_set(ops, who, loaded, registry, unique_index)


def unique_index_of(states: Any, registry: Registry = REGISTRY) -> dict[Any, str]:
    """Every live holder of every unique value, as the engine's ``unique_holders`` reports."""
    index: dict[Any, str] = {}
    for state in states:
        if state is None or state.deleted:
            continue
        spec = registry.entity(state.entity)
        if spec is None:
            continue
        for group in spec.unique:
            values = tuple(state.data.get(name) for name in group)
            index[(state.entity, state.scope, group, values)] = state.id
    return index


@dataclass
class MemoryServer:
    """The server's rows and scope counters, changed only through planned change-sets."""

    registry: Registry = REGISTRY
    rows: dict[Key, RowState] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)

    def seed(self, *states: RowState) -> None:
        for state in states:
            self.rows[(state.entity, state.id)] = state
            self.heads[state.scope] = max(self.heads.get(state.scope, 0), state.version)

    def push(self, ops: Sequence[Op], who: Principal = MANAGER) -> Plan:
        """Plan ``ops`` against the current rows and, unless rejected, apply the plan."""
        result = plan(ops, who, dict(self.rows), registry=self.registry)
        if not result.rejected:
            self.apply(result)
        return result

    def apply(self, result: Plan) -> None:
        """Write a plan as ``ChangeLog.write`` does: one new version per scope written."""
        writing: dict[str, int] = {}
        for write in result.writes.values():
            version = writing.setdefault(write.scope, self.heads.get(write.scope, 0) + 1)
            key = (write.entity, write.id)
            current = self.rows.get(key)
            versions = dict(current.field_versions) if current is not None else {}
            if write.data is None:
                versions = {}
            else:
                versions.update({name: version for name in write.changed})
            self.rows[key] = RowState(
                write.entity,
                write.id,
                write.scope,
                version,
                write.data is None,
                dict(write.data or {}),
                versions,
            )
        self.heads.update(writing)

    def data(self, entity: str, row_id: str) -> dict[str, Any] | None:
        """The live data of a row, None when absent or deleted."""
        state = self.rows.get((entity, row_id))
        return None if state is None or state.deleted else dict(state.data)


def create(entity: str, row_id: str, **fields: Any) -> CreateOp:
    return CreateOp(entity, row_id, fields)


def patch(entity: str, row_id: str, base_version: int, **fields: Any) -> PatchOp:
    return PatchOp(entity, row_id, base_version, fields)


def delete(entity: str, row_id: str, base_version: int) -> DeleteOp:
    return DeleteOp(entity, row_id, base_version)


def intent(name: str, /, **args: Any) -> IntentOp:
    return IntentOp(name, args)
