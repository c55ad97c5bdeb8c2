"""The registry of synced entities: for each, where it lives, what it holds, who may write what.

One declaration per entity drives validation of pushed ops, field filtering of pulls and the
merge policy applied to concurrent edits. The sync engine knows no entity by name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .fields import Field, FieldError, Value
from .roles import Role

#: The organisation-wide scope (shared data: the menu, the staff directory, branches).
ORG_SCOPE = "org"
#: ``EntitySpec.scope_kind`` of entities partitioned by branch.
BRANCH_SCOPE = "branch"


def branch_scope(branch_id: str) -> str:
    """The scope name of a branch."""
    return f"branch:{branch_id}"


def scope_branch(scope: str) -> str | None:
    """The branch id of a branch scope (None for the organisation scope)."""
    return scope.split(":", 1)[1] if scope.startswith("branch:") else None


def unique_form(value: Any) -> Any:
    """The form in which two values of a unique field are compared.

    The database enforces unique groups with a case- and accent-insensitive collation that
    ignores trailing spaces (MariaDB's ``utf8mb4_general_ci``: "Café-1 " equals "CAFE-1"). The
    planner must see such a clash coming, or the write fails in the database instead of
    becoming a conflict; so text is compared without accents, case or trailing spaces.
    """
    if not isinstance(value, str):
        return value
    if value.isascii():  # most values (SKUs): nothing to decompose; the same result, sooner
        return value.lower().rstrip(" ")
    decomposed = unicodedata.normalize("NFD", value)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.lower().rstrip(" ")


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
    """Everything the sync engine knows about one synced entity.

    A declaration that contradicts itself (a writable field that does not exist, a default of
    the wrong type, a branch entity without its scope field) raises ``ValueError`` at import
    time rather than misbehaving on the first push.
    """

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
    # Computed once: pulls filter every row they send through it.
    _visible: Mapping[Role, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.scope_kind == BRANCH_SCOPE:
            if self.scope_field is None or self.scope_field not in self.fields:
                problems.append("a branch entity needs a scope_field among its fields")
            elif self.fields[self.scope_field].kind != "uuid":
                problems.append(f"scope_field {self.scope_field} must be a uuid field")
        elif self.scope_kind == ORG_SCOPE:
            if self.scope_field is not None:
                problems.append("an organisation entity has no scope_field")
        else:
            problems.append(f"scope_kind must be {ORG_SCOPE!r} or {BRANCH_SCOPE!r}")
        named = [
            *(n for names in self.writable.values() for n in names),
            *(n for names in self.hidden.values() for n in names),
            *self.defaults,
            *(n for group in self.unique for n in group),
        ]
        problems += [f"no field named {n!r}" for n in sorted(set(named) - set(self.fields))]
        for name, value in self.defaults.items():
            spec = self.fields.get(name)
            err = spec.check(name, value) if spec is not None else None
            if err is not None:
                problems.append(f"default of {name}: {err.message}")
        if problems:
            raise ValueError(f"entity {self.name}: " + "; ".join(problems))
        visible = {
            role: frozenset(self.fields) - self.hidden.get(role, frozenset()) for role in Role
        }
        object.__setattr__(self, "_visible", visible)

    def writable_by(self, role: Role) -> frozenset[str]:
        """The fields ``role`` may set in creates and patches."""
        return self.writable.get(role, frozenset())

    def visible_fields(self, role: Role) -> frozenset[str]:
        """The fields ``role`` receives in pulls."""
        return self._visible[role]

    def required_fields(self) -> frozenset[str]:
        """The fields a create must give: neither nullable nor defaulted."""
        return frozenset(
            name
            for name, spec in self.fields.items()
            if not spec.nullable and name not in self.defaults
        )

    def scope_of(self, data: Mapping[str, Any]) -> str | None:
        """The scope a row with ``data`` belongs to (None: data does not say).

        The branch id is lower-cased, as the planner stores it: the engine locks the scopes of
        creates from the raw ops, and must lock the scope the planner then writes to.
        """
        if self.scope_kind == ORG_SCOPE:
            return ORG_SCOPE
        assert self.scope_field is not None
        branch = data.get(self.scope_field)
        return branch_scope(branch.lower()) if isinstance(branch, str) else None

    def unique_key(self, group: tuple[str, ...], data: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The values of a unique ``group`` in ``data``, as compared for uniqueness.

        None when one of them is null: as in SQL, a null never clashes.
        """
        values = tuple(data.get(name) for name in group)
        if any(v is None for v in values):
            return None
        return tuple(unique_form(v) for v in values)


@dataclass(frozen=True)
class IntentSpec:
    """A domain operation pushed by devices.

    ``targets(args)`` names the rows the intent reads and may write; ``apply(args, rows)`` is a pure
    function from their current data (None: absent or deleted) to the field changes to write, per
    row, or an error. Intents apply to the current state, so they never conflict — except with a
    delete: an intent naming a deleted row is kept as an ``update_deleted`` conflict.
    Both functions receive arguments already checked against ``args`` (UUIDs lower-cased).
    """

    name: str
    args: Mapping[str, Field]
    allowed: frozenset[Role]
    targets: Callable[[Mapping[str, Value]], list[tuple[str, str]]]
    apply: Callable[
        [Mapping[str, Value], Mapping[tuple[str, str], Mapping[str, Any] | None]],
        dict[tuple[str, str], dict[str, Value]] | FieldError,
    ]

    def canonical_args(self, args: Mapping[str, Value]) -> dict[str, Value]:
        """``args`` with each declared argument in its canonical form (undeclared ones as sent)."""
        return {
            name: spec.canonical(value) if (spec := self.args.get(name)) is not None else value
            for name, value in args.items()
        }


@dataclass(frozen=True)
class Registry:
    """Every synced entity and every intent, by name."""

    entities: Mapping[str, EntitySpec]
    intents: Mapping[str, IntentSpec]

    def entity(self, name: str) -> EntitySpec | None:
        """The entity named ``name``, or None."""
        return self.entities.get(name)


def filter_fields(spec: EntitySpec, role: Role, data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``data`` that ``role`` may receive: declared fields not hidden from it.

    An allow-list, not a deny-list: a key a row image carries without being declared (a new
    column published before the registry knew it) is not sent, so it can never leak.
    """
    visible = spec.visible_fields(role)
    return {k: v for k, v in data.items() if k in visible}
