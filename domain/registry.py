"""The registry of synced entities: for each, where it lives, what it holds, who may write what.

One declaration per entity drives validation of pushed ops, field filtering of pulls and the
merge policy applied to concurrent edits. The sync engine knows no entity by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .fields import Field, FieldError, Value
from .roles import Role

ORG_SCOPE = "org"


def branch_scope(branch_id: str) -> str:
    return f"branch:{branch_id}"


def scope_branch(scope: str) -> str | None:
    return scope.split(":", 1)[1] if scope.startswith("branch:") else None


class MergePolicy(StrEnum):
    """What happens when a device edits a field someone else changed since the device saw it.

    ``FIELD_LWW``: edits to different fields merge; the later write of the same field wins.
    ``FLAG``: edits to different fields merge; a stale edit of the same field is not applied and
    becomes a conflict for a manager to resolve.
    """

    FIELD_LWW = "field_lww"
    FLAG = "flag"


@dataclass(frozen=True)
class EntitySpec:
    name: str
    #: "org" (organisation-wide) or "branch" (partitioned by ``scope_field``).
    scope_kind: str
    fields: Mapping[str, Field]
    writable: Mapping[Role, frozenset[str]] = field(default_factory=dict)
    creatable_by: frozenset[Role] = frozenset()
    deletable_by: frozenset[Role] = frozenset()
    #: Fields a role never receives (personal data, pay, secrets).
    hidden: Mapping[Role, frozenset[str]] = field(default_factory=dict)
    merge: MergePolicy = MergePolicy.FLAG
    scope_field: str | None = None
    defaults: Mapping[str, Value] = field(default_factory=dict)
    #: Field groups unique within a scope (checked by the engine against the system of record).
    unique: tuple[tuple[str, ...], ...] = ()

    def writable_by(self, role: Role) -> frozenset[str]:
        return self.writable.get(role, frozenset())

    def visible_fields(self, role: Role) -> frozenset[str]:
        return frozenset(self.fields) - self.hidden.get(role, frozenset())

    def required_fields(self) -> frozenset[str]:
        return frozenset(
            name
            for name, spec in self.fields.items()
            if not spec.nullable and name not in self.defaults
        )

    def scope_of(self, data: Mapping[str, Any]) -> str | None:
        """The scope a row with ``data`` belongs to (None: data does not say)."""
        if self.scope_kind == ORG_SCOPE:
            return ORG_SCOPE
        assert self.scope_field is not None
        branch = data.get(self.scope_field)
        return branch_scope(branch) if isinstance(branch, str) else None


@dataclass(frozen=True)
class IntentSpec:
    """A domain operation pushed by devices.

    ``targets(args)`` names the rows the intent reads and may write; ``apply(args, rows)`` is a pure
    function from their current data (None: absent or deleted) to the field changes to write, per
    row, or an error. Intents apply to the current state, so they never conflict.
    """

    name: str
    args: Mapping[str, Field]
    allowed: frozenset[Role]
    targets: Callable[[Mapping[str, Value]], list[tuple[str, str]]]
    apply: Callable[
        [Mapping[str, Value], Mapping[tuple[str, str], Mapping[str, Any] | None]],
        dict[tuple[str, str], dict[str, Value]] | FieldError,
    ]


@dataclass(frozen=True)
class Registry:
    entities: Mapping[str, EntitySpec]
    intents: Mapping[str, IntentSpec]

    def entity(self, name: str) -> EntitySpec | None:
        return self.entities.get(name)


def filter_fields(spec: EntitySpec, role: Role, data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``data`` that ``role`` may receive."""
    hidden = spec.hidden.get(role)
    if not hidden:
        return dict(data)
    return {k: v for k, v in data.items() if k not in hidden}
