"""Planning a change-set: the functional core of push.

``plan_change_set`` takes a device's ops, who is writing and the current state of every row the
ops touch, and decides — without I/O — what to write, what to flag as a conflict and what to
refuse. The sync engine loads the state, calls this, and writes the plan in one transaction.

A change-set is all or nothing: any refused op refuses the whole change-set (its errors say
which op and why). A conflict is not a refusal: the rest of the change-set applies and the
conflicting part is kept, untouched, for a manager to resolve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.fields import FieldError, Value
from domain.ops import CreateOp, DeleteOp, IntentOp, Op, PatchOp, Principal, RowState
from domain.registry import EntitySpec, MergePolicy, Registry

Key = tuple[str, str]  # (entity, id)
#: (entity, scope, field names, values) -> id of the live row holding them.
UniqueIndex = Mapping[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str]


@dataclass(frozen=True)
class OpIssue:
    op_index: int
    code: str
    message: str
    field: str | None = None


@dataclass
class RowWrite:
    entity: str
    id: str
    scope: str
    #: None writes a tombstone.
    data: dict[str, Any] | None
    changed: set[str] = field(default_factory=set)
    created: bool = False


@dataclass(frozen=True)
class ConflictDraft:
    entity: str
    id: str
    scope: str
    kind: str
    op_index: int
    base_version: int | None
    server_version: int | None
    proposed: dict[str, Any]
    server_state: dict[str, Any]


@dataclass
class Plan:
    writes: dict[Key, RowWrite] = field(default_factory=dict)
    conflicts: list[ConflictDraft] = field(default_factory=list)
    errors: list[OpIssue] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return bool(self.errors)

    def scopes(self) -> set[str]:
        return {w.scope for w in self.writes.values()} | {c.scope for c in self.conflicts}


def _issue(i: int, err: FieldError) -> OpIssue:
    return OpIssue(i, err.code, err.message, err.field)


class _Planner:
    def __init__(
        self,
        registry: Registry,
        principal: Principal,
        rows: Mapping[Key, RowState | None],
        unique_index: UniqueIndex,
    ) -> None:
        self.registry = registry
        self.principal = principal
        self.rows: dict[Key, RowState | None] = dict(rows)
        self.unique_index = dict(unique_index)
        self.plan = Plan()
        # Fields this change-set already wrote per row: never stale against ourselves.
        self.own_fields: dict[Key, set[str]] = {}

    # --- helpers -------------------------------------------------------------------------

    def _entity(self, i: int, name: str) -> EntitySpec | None:
        spec = self.registry.entity(name)
        if spec is None:
            self.plan.errors.append(OpIssue(i, "unknown_entity", f"no entity named {name!r}"))
        return spec

    def _check_fields(
        self, i: int, spec: EntitySpec, values: Mapping[str, Value], *, intent: bool = False
    ) -> bool:
        ok = True
        writable = spec.writable_by(self.principal.role)
        for name, value in values.items():
            fspec = spec.fields.get(name)
            if fspec is None:
                self.plan.errors.append(
                    OpIssue(i, "unknown_field", f"{spec.name} has no field {name!r}", name)
                )
                ok = False
                continue
            if not intent and name not in writable:
                self.plan.errors.append(
                    OpIssue(
                        i,
                        "field_forbidden",
                        f"role {self.principal.role} may not write {spec.name}.{name}",
                        name,
                    )
                )
                ok = False
                continue
            err = fspec.check(name, value)
            if err is not None:
                self.plan.errors.append(_issue(i, err))
                ok = False
        return ok

    def _check_scope(self, i: int, scope: str | None) -> bool:
        if scope is None or not self.principal.may_access(scope):
            self.plan.errors.append(
                OpIssue(i, "out_of_scope", "the row is outside the branches of this device's user")
            )
            return False
        return True

    def _unique_clash(
        self, spec: EntitySpec, row_id: str, scope: str, data: Mapping[str, Any]
    ) -> str | None:
        for group in spec.unique:
            values = tuple(data.get(name) for name in group)
            owner = self.unique_index.get((spec.name, scope, group, values))
            if owner is not None and owner != row_id:
                current = self.rows.get((spec.name, owner))
                if current is None or not current.deleted:
                    return ", ".join(group)
        return None

    def _claim_unique(
        self,
        spec: EntitySpec,
        row_id: str,
        scope: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
    ) -> None:
        for group in spec.unique:
            if old is not None:
                old_key = (spec.name, scope, group, tuple(old.get(n) for n in group))
                if self.unique_index.get(old_key) == row_id:
                    del self.unique_index[old_key]
            if new is not None:
                self.unique_index[(spec.name, scope, group, tuple(new.get(n) for n in group))] = (
                    row_id
                )

    def _write(
        self,
        spec: EntitySpec,
        cur: RowState,
        data: dict[str, Any] | None,
        changed: set[str],
        created: bool,
    ) -> None:
        key = (spec.name, cur.id)
        previous = self.plan.writes.get(key)
        write = RowWrite(spec.name, cur.id, cur.scope, data, changed, created)
        if previous is not None:
            write.changed |= previous.changed
            write.created = previous.created and data is not None
        self.plan.writes[key] = write
        self.own_fields.setdefault(key, set()).update(changed)
        self.rows[key] = RowState(
            entity=spec.name,
            id=cur.id,
            scope=cur.scope,
            version=cur.version,
            deleted=data is None,
            data=data or {},
            field_versions=cur.field_versions,
        )

    def _conflict(
        self,
        i: int,
        cur: RowState,
        kind: str,
        base: int | None,
        proposed: dict[str, Any],
        server: dict[str, Any],
    ) -> None:
        self.plan.conflicts.append(
            ConflictDraft(
                cur.entity, cur.id, cur.scope, kind, i, base, cur.version, proposed, server
            )
        )

    # --- ops -----------------------------------------------------------------------------

    def create(self, i: int, op: CreateOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        if self.principal.role not in spec.creatable_by:
            self.plan.errors.append(
                OpIssue(i, "forbidden", f"role {self.principal.role} may not create {spec.name}")
            )
            return
        values = dict(op.fields)
        if (
            spec.scope_field is not None
            and spec.scope_field not in values
            and self.principal.device_branch_id is not None
        ):
            values[spec.scope_field] = self.principal.device_branch_id
        if not self._check_fields(i, spec, op.fields):
            return
        data: dict[str, Any] = {**spec.defaults, **values}
        missing = sorted(spec.required_fields() - set(data))
        for name in missing:
            self.plan.errors.append(OpIssue(i, "required", f"{name} is required", name))
        if missing:
            return
        if spec.scope_field is not None and spec.scope_field in values:
            err = spec.fields[spec.scope_field].check(spec.scope_field, values[spec.scope_field])
            if err is not None:
                self.plan.errors.append(_issue(i, err))
                return
        scope = spec.scope_of(data)
        if not self._check_scope(i, scope):
            return
        assert scope is not None
        key = (spec.name, op.id)
        if self.rows.get(key) is not None:
            self.plan.errors.append(
                OpIssue(
                    i,
                    "already_exists",
                    f"{spec.name} {op.id} already exists (ids are never reused)",
                )
            )
            return
        row = RowState(spec.name, op.id, scope, 0, False, {}, {})
        clash = self._unique_clash(spec, op.id, scope, data)
        if clash is not None:
            self._conflict(i, row, "unique_violation", None, data, {"unique": clash})
            return
        self._claim_unique(spec, op.id, scope, None, data)
        self._write(spec, row, data, set(data), created=True)

    def patch(self, i: int, op: PatchOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        cur = self.rows.get((spec.name, op.id))
        if cur is None:
            self.plan.errors.append(OpIssue(i, "not_found", f"{spec.name} {op.id} does not exist"))
            return
        if not self._check_scope(i, cur.scope) or not self._check_fields(i, spec, op.fields):
            return
        if (
            spec.scope_field is not None
            and spec.scope_field in op.fields
            and op.fields[spec.scope_field] != cur.data.get(spec.scope_field)
            and not cur.deleted
        ):
            self.plan.errors.append(
                OpIssue(i, "immutable_field", f"{spec.scope_field} cannot change", spec.scope_field)
            )
            return
        own = self.own_fields.get((spec.name, op.id), set())
        if cur.version and op.base_version > cur.version and not own:
            self.plan.errors.append(
                OpIssue(
                    i,
                    "invalid_base_version",
                    f"base_version {op.base_version} is newer than the row",
                )
            )
            return
        if cur.deleted:
            # The row is gone: never resurrect it, but keep the edit for a manager to see.
            self._conflict(i, cur, "update_deleted", op.base_version, dict(op.fields), {})
            return
        stale = {
            name
            for name, value in op.fields.items()
            if name not in own
            and cur.field_versions.get(name, 0) > op.base_version
            and cur.data.get(name) != value
        }
        applied = dict(op.fields)
        if stale and spec.merge is MergePolicy.FLAG:
            self._conflict(
                i,
                cur,
                "concurrent_update",
                op.base_version,
                {name: op.fields[name] for name in sorted(stale)},
                {name: cur.data.get(name) for name in sorted(stale)},
            )
            applied = {k: v for k, v in applied.items() if k not in stale}
        changed = {k for k, v in applied.items() if cur.data.get(k) != v}
        if not changed:
            return
        data = {**cur.data, **{k: applied[k] for k in changed}}
        clash = self._unique_clash(spec, op.id, cur.scope, data)
        if clash is not None:
            self._conflict(i, cur, "unique_violation", op.base_version, applied, {"unique": clash})
            return
        self._claim_unique(spec, op.id, cur.scope, cur.data, data)
        self._write(spec, cur, data, changed, created=False)

    def delete(self, i: int, op: DeleteOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        cur = self.rows.get((spec.name, op.id))
        if cur is None:
            self.plan.errors.append(OpIssue(i, "not_found", f"{spec.name} {op.id} does not exist"))
            return
        if self.principal.role not in spec.deletable_by:
            self.plan.errors.append(
                OpIssue(i, "forbidden", f"role {self.principal.role} may not delete {spec.name}")
            )
            return
        if not self._check_scope(i, cur.scope):
            return
        if cur.deleted:
            return  # deleting twice is still deleted
        own = self.own_fields.get((spec.name, op.id), set())
        if spec.merge is MergePolicy.FLAG and not own and cur.version > op.base_version:
            modified = {
                name: cur.data.get(name)
                for name, version in cur.field_versions.items()
                if version > op.base_version
            }
            self._conflict(i, cur, "delete_modified", op.base_version, {"deleted": True}, modified)
            return
        self._claim_unique(spec, op.id, cur.scope, cur.data, None)
        self._write(spec, cur, None, set(), created=False)

    def intent(self, i: int, op: IntentOp) -> None:
        spec = self.registry.intents.get(op.name)
        if spec is None:
            self.plan.errors.append(OpIssue(i, "unknown_intent", f"no intent named {op.name!r}"))
            return
        if self.principal.role not in spec.allowed:
            self.plan.errors.append(
                OpIssue(i, "forbidden", f"role {self.principal.role} may not {op.name}")
            )
            return
        ok = True
        for name, value in op.args.items():
            fspec = spec.args.get(name)
            err = (
                FieldError(name, "unknown_field", f"{op.name} has no argument {name!r}")
                if fspec is None
                else fspec.check(name, value)
            )
            if err is not None:
                self.plan.errors.append(_issue(i, err))
                ok = False
        for name, fspec in spec.args.items():
            if name not in op.args and not fspec.nullable:
                self.plan.errors.append(OpIssue(i, "required", f"{name} is required", name))
                ok = False
        if not ok:
            return
        targets = spec.targets(op.args)
        current: dict[Key, Mapping[str, Any] | None] = {}
        for key in targets:
            row = self.rows.get(key)
            current[key] = None if row is None or row.deleted else row.data
        result = spec.apply(op.args, current)
        if isinstance(result, FieldError):
            self.plan.errors.append(_issue(i, result))
            return
        for key, changes in result.items():
            row = self.rows.get(key)
            entity = self.registry.entity(key[0])
            if row is None or row.deleted or entity is None:
                self.plan.errors.append(
                    OpIssue(i, "not_found", f"{key[0]} {key[1]} does not exist")
                )
                return
            if not self._check_scope(i, row.scope) or not self._check_fields(
                i, entity, changes, intent=True
            ):
                return
            changed = {k for k, v in changes.items() if row.data.get(k) != v}
            if changed:
                data = {**row.data, **{k: changes[k] for k in changed}}
                self._write(entity, row, data, changed, created=False)


def plan_change_set(
    ops: Sequence[Op],
    principal: Principal,
    rows: Mapping[Key, RowState | None],
    registry: Registry,
    unique_index: UniqueIndex | None = None,
) -> Plan:
    """Decide what a change-set does, given the current state of the rows it touches.

    ``rows`` must hold every row the ops name (None when it does not exist); ``unique_index``
    every live holder of a unique value the ops write. Ops apply in order, each seeing the
    effect of the ones before it. A plan with ``errors`` must be stored as rejected and its
    writes discarded.
    """
    planner = _Planner(registry, principal, rows, unique_index or {})
    for i, op in enumerate(ops):
        if isinstance(op, CreateOp):
            planner.create(i, op)
        elif isinstance(op, PatchOp):
            planner.patch(i, op)
        elif isinstance(op, DeleteOp):
            planner.delete(i, op)
        else:
            planner.intent(i, op)
    plan = planner.plan
    if plan.errors:
        return Plan(errors=plan.errors)
    return plan


def touched_keys(ops: Sequence[Op], registry: Registry) -> list[Key]:
    """Every row the ops name, in order, for the engine to load before planning."""
    keys: list[Key] = []
    for op in ops:
        if isinstance(op, IntentOp):
            spec = registry.intents.get(op.name)
            if spec is not None:
                try:
                    keys.extend(spec.targets(op.args))
                except (KeyError, TypeError, ValueError):
                    continue  # bad args: the planner reports them
        else:
            keys.append((op.entity, op.id))
    return list(dict.fromkeys(keys))
