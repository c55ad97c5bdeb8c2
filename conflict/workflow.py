"""Resolving a flagged conflict: the pure decision of what a manager's resolution writes.

A conflict (see :mod:`conflict.planner`) is part of a change-set the server kept aside. A
manager closes it with one of two resolutions:

- ``dismiss``: the server's state stands; nothing is written. Always possible.
- ``accept``: the device's proposal is applied now, as a new write at the scope's next version
  (devices pull it like any other change). What that means per kind:

  ``concurrent_update``
      The proposed field values are written over the row's current image.
  ``delete_modified``
      The row is deleted (a tombstone is written).
  ``unique_violation``
      A withheld create creates the row as the device meant it; a withheld patch writes the
      unique fields it held back. Only while the clash is gone: if another live row still holds
      the values, accepting is refused (``unique_violation``).
  ``update_deleted``
      Refused (``row_deleted``): the row was deleted, and the protocol never resurrects a row
      (devices have purged it, its id may not be reused). Dismiss it, and create a new row.
  ``blocked_by_conflict``
      Refused (``not_supported``): it names an intent whose target was never created; resolve
      the blocking conflict, then run the intent again from a device.

Accepting is re-validated, never trusted: the proposal is checked against the registry as it is
now (fields, types, and what the resolver's role may write), and it is refused with
``row_changed`` when someone wrote one of the proposed fields after the conflict was flagged —
the manager decided against a server state that no longer exists, and accepting would silently
overwrite a write nobody reviewed. Dismiss it and edit the row again instead.

Nothing here does I/O: the engine (``sync_server.conflicts``) loads the conflict, the row and
the holders of unique values under the scope's lock, calls :func:`decide`, and writes the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from domain.ops import RowState
from domain.registry import EntitySpec, Registry, unique_form
from domain.roles import Role

ACCEPT = "accept"
DISMISS = "dismiss"
RESOLUTIONS = (ACCEPT, DISMISS)

#: (group of field names, values as the database compares them) -> id of the live row holding
#: them. The engine fills it for the values :func:`unique_candidates` names.
Holders = Mapping[tuple[tuple[str, ...], tuple[Any, ...]], str]


@dataclass(frozen=True)
class ConflictRecord:
    """A stored conflict, as the workflow needs it."""

    id: str
    entity: str
    row_id: str
    scope: str
    kind: str
    base_version: int | None
    #: The row's version when the conflict was flagged (None: the row did not exist).
    server_version: int | None
    proposed: Mapping[str, Any]
    server_state: Mapping[str, Any]


@dataclass(frozen=True)
class ResolutionWrite:
    """One row write: the new image (None writes a tombstone) and the fields it changes."""

    entity: str
    id: str
    scope: str
    data: dict[str, Any] | None
    changed: frozenset[str] = frozenset()
    created: bool = False


@dataclass(frozen=True)
class Refusal:
    """Why a resolution cannot be carried out; ``details`` maps fields to messages."""

    code: str
    message: str
    details: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What resolving does: a refusal, or the write (None: nothing to write) to make."""

    resolution: str
    write: ResolutionWrite | None = None
    refusal: Refusal | None = None


def _refuse(code: str, message: str, details: dict[str, list[str]] | None = None) -> Decision:
    return Decision(ACCEPT, refusal=Refusal(code, message, details or {}))


def _check_values(
    spec: EntitySpec, role: Role, values: Mapping[str, Any]
) -> tuple[dict[str, Any], Refusal | None]:
    """``values`` in canonical form, or why the registry refuses them today."""
    writable = spec.writable_by(role)
    clean: dict[str, Any] = {}
    details: dict[str, list[str]] = {}
    for name, value in values.items():
        fspec = spec.fields.get(name)
        if fspec is None:
            details[name] = [f"{spec.name} has no field {name!r}"]
        elif name not in writable:
            details[name] = [f"role {role.value} may not write {spec.name}.{name}"]
        elif (err := fspec.check(name, value)) is not None:
            details[name] = [err.message]
        else:
            clean[name] = fspec.canonical(value)
    if details:
        forbidden = all("may not write" in m for msgs in details.values() for m in msgs)
        code = "forbidden" if forbidden else "invalid_proposal"
        return clean, Refusal(code, "The proposed values cannot be written.", details)
    return clean, None


def _accepted_image(conflict: ConflictRecord, current: RowState | None) -> dict[str, Any] | None:
    """The row as accepting would leave it (None: accepting deletes it or writes nothing)."""
    if conflict.kind == "unique_violation" and conflict.server_version is None:
        return dict(conflict.proposed)
    if conflict.kind in ("concurrent_update", "unique_violation") and current is not None:
        return {**current.data, **conflict.proposed}
    return None


def unique_candidates(
    conflict: ConflictRecord, current: RowState | None, registry: Registry
) -> list[tuple[tuple[str, ...], tuple[Any, ...]]]:
    """The unique values accepting would give the row: the engine looks up who holds them."""
    spec = registry.entity(conflict.entity)
    image = _accepted_image(conflict, current)
    if spec is None or image is None:
        return []
    wanted: list[tuple[tuple[str, ...], tuple[Any, ...]]] = []
    for group in spec.unique:
        values = tuple(image.get(name) for name in group)
        if all(v is not None for v in values):
            wanted.append((group, values))
    return wanted


def _clashes(
    spec: EntitySpec, row_id: str, data: Mapping[str, Any], holders: Holders
) -> dict[tuple[str, ...], str]:
    """Each unique group of ``data`` that a live row other than ``row_id`` holds -> that row."""
    folded: dict[tuple[tuple[str, ...], tuple[Any, ...]], str] = {
        (group, tuple(unique_form(v) for v in values)): owner
        for (group, values), owner in holders.items()
    }
    found: dict[tuple[str, ...], str] = {}
    for group in spec.unique:
        key = spec.unique_key(group, data)
        if key is None:
            continue
        owner = folded.get((group, key))
        if owner is not None and owner != row_id:
            found[group] = owner
    return found


def _changed_since(conflict: ConflictRecord, current: RowState, names: set[str]) -> list[str]:
    """Proposed fields someone wrote after the conflict was flagged."""
    if conflict.server_version is None:
        return []
    return sorted(
        name
        for name in names
        if current.field_versions.get(name, current.version) > conflict.server_version
    )


def decide(
    conflict: ConflictRecord,
    resolution: str,
    current: RowState | None,
    registry: Registry,
    role: Role,
    holders: Holders | None = None,
) -> Decision:
    """What ``resolution`` of ``conflict`` writes, given the row's ``current`` state (None: it
    never existed), by a resolver of ``role``. ``holders`` are the live holders of the values
    :func:`unique_candidates` names. See the module docstring for the rules."""
    if resolution == DISMISS:
        return Decision(DISMISS)
    if resolution != ACCEPT:
        return Decision(
            resolution,
            refusal=Refusal(
                "invalid_resolution",
                f"resolution must be one of {', '.join(RESOLUTIONS)}",
                {"resolution": ["unknown resolution"]},
            ),
        )
    spec = registry.entity(conflict.entity)
    if spec is None:
        return _refuse("invalid_proposal", f"no entity named {conflict.entity!r} any more")
    if conflict.kind == "update_deleted":
        return _refuse(
            "row_deleted",
            "The row was deleted and a deleted row is never restored; dismiss this conflict "
            "and create a new row if it is still wanted.",
        )
    if conflict.kind == "blocked_by_conflict":
        return _refuse(
            "not_supported",
            "This intent waited on a row that was never created; resolve the blocking "
            "conflict, then run the intent again from a device.",
        )
    if conflict.kind == "delete_modified":
        return _accept_delete(conflict, spec, current, role)
    if conflict.kind == "unique_violation" and conflict.server_version is None:
        return _accept_create(conflict, spec, current, role, holders or {})
    if conflict.kind in ("concurrent_update", "unique_violation"):
        return _accept_patch(conflict, spec, current, role, holders or {})
    return _refuse("not_supported", f"conflicts of kind {conflict.kind!r} cannot be accepted")


def _accept_delete(
    conflict: ConflictRecord, spec: EntitySpec, current: RowState | None, role: Role
) -> Decision:
    if role not in spec.deletable_by:
        return _refuse("forbidden", f"role {role.value} may not delete {spec.name}")
    if current is None or current.deleted:
        return Decision(ACCEPT)  # already gone: the device's wish holds without a write
    changed = _changed_since(conflict, current, set(current.data))
    if changed:
        return _refuse(
            "row_changed",
            "The row changed after the conflict was flagged; review it again.",
            {name: ["changed since the conflict was flagged"] for name in changed},
        )
    return Decision(ACCEPT, ResolutionWrite(spec.name, current.id, current.scope, None))


def _accept_create(
    conflict: ConflictRecord,
    spec: EntitySpec,
    current: RowState | None,
    role: Role,
    holders: Holders,
) -> Decision:
    if role not in spec.creatable_by:
        return _refuse("forbidden", f"role {role.value} may not create {spec.name}")
    if current is not None:
        return _refuse(
            "already_exists", f"{spec.name} {conflict.row_id} exists (ids are never reused)"
        )
    data, refusal = _check_values(spec, role, conflict.proposed)
    if refusal is not None:
        return Decision(ACCEPT, refusal=refusal)
    missing = sorted(spec.required_fields() - set(data))
    if missing:
        details = {name: [f"{name} is required"] for name in missing}
        return _refuse("invalid_proposal", "The proposed row is incomplete.", details)
    if spec.scope_of(data) != conflict.scope:
        return _refuse("invalid_proposal", "The proposed row is not in the conflict's scope.")
    clashes = _clashes(spec, conflict.row_id, data, holders)
    if clashes:
        return _clash_refusal(clashes)
    write = ResolutionWrite(
        spec.name, conflict.row_id, conflict.scope, data, frozenset(data), created=True
    )
    return Decision(ACCEPT, write)


def _accept_patch(
    conflict: ConflictRecord,
    spec: EntitySpec,
    current: RowState | None,
    role: Role,
    holders: Holders,
) -> Decision:
    if current is None or current.deleted:
        return _refuse("row_deleted", f"{spec.name} {conflict.row_id} was deleted meanwhile")
    values, refusal = _check_values(spec, role, conflict.proposed)
    if refusal is not None:
        return Decision(ACCEPT, refusal=refusal)
    scope_field = spec.scope_field
    if (
        scope_field is not None
        and scope_field in values
        and values[scope_field] != current.data.get(scope_field)
    ):
        return _refuse(
            "invalid_proposal", f"{scope_field} cannot change", {scope_field: ["immutable"]}
        )
    changed_since = _changed_since(conflict, current, set(values))
    if changed_since:
        return _refuse(
            "row_changed",
            "The proposed fields changed after the conflict was flagged; dismiss it and edit "
            "the row again.",
            {name: ["changed since the conflict was flagged"] for name in changed_since},
        )
    changes = {k: v for k, v in values.items() if current.data.get(k) != v}
    if not changes:
        return Decision(ACCEPT)  # the row already holds the proposed values
    data = {**current.data, **changes}
    clashes = _clashes(spec, current.id, data, holders)
    touched = {g: o for g, o in clashes.items() if set(g) & set(changes)}
    if touched:
        return _clash_refusal(touched)
    write = ResolutionWrite(spec.name, current.id, current.scope, data, frozenset(changes))
    return Decision(ACCEPT, write)


def _clash_refusal(clashes: Mapping[tuple[str, ...], str]) -> Decision:
    details = {name: [f"held by {owner}"] for group, owner in clashes.items() for name in group}
    return _refuse(
        "unique_violation",
        "Another row still holds the proposed unique values; change or delete it first.",
        details,
    )
