"""Planning a change-set: the functional core of push.

``plan_change_set`` takes a device's ops, who is writing and the current state of every row the
ops touch, and decides — without I/O — what to write, what to flag as a conflict and what to
refuse. The sync engine loads the state, calls this, and writes the plan in one transaction.

A change-set is all or nothing: any refused op refuses the whole change-set (its errors say
which op and why). A conflict is not a refusal: the rest of the change-set applies and the
conflicting part is kept, untouched, for a manager to resolve.

Refusals (``OpIssue.code``): ``unknown_entity``, ``unknown_intent``, ``unknown_field``,
``forbidden`` (the role may not create/delete this entity or run this intent),
``field_forbidden`` (the role may not write this field), ``out_of_scope`` (another branch),
``required``, ``wrong_type``, ``too_long``, ``too_short``, ``invalid``, ``invalid_choice``,
``out_of_range``, ``read_only``, ``already_exists`` (ids are never reused, not even a deleted
one's), ``not_found``, ``immutable_field`` (the scope field of an existing row),
``invalid_base_version`` (newer than the row: the device cannot have seen it).

Conflicts (``ConflictDraft.kind``):

- ``concurrent_update``: under ``MergePolicy.FLAG``, a stale edit of a field someone else
  changed since ``base_version``; that field keeps the server's value, the op's other fields apply.
- ``update_deleted``: a patch or an intent naming a deleted row; the row stays deleted.
- ``delete_modified``: under ``FLAG``, a delete of a row modified since ``base_version``; the row
  stays.
- ``unique_violation``: the op would give a row the unique values of another live row in the
  scope. A create is withheld entirely (and the change-set's later ops on that row are folded
  into the conflict instead of failing); a patch is withheld for the unique fields only.
- ``blocked_by_conflict``: an intent naming a row whose create was withheld.

Staleness is judged per field: an edit is stale when someone else wrote the field after the
device's ``base_version`` (its field version is newer) and the values differ. Fields the same
change-set already set are the device's own latest word and never stale; versions are always
those the server had before the change-set, since those are what the device saw. Edits of
fields nobody else touched merge under both policies, so disjoint edits commute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from domain.fields import FieldError, Value
from domain.ops import CreateOp, DeleteOp, IntentOp, Op, PatchOp, Principal, RowState
from domain.registry import EntitySpec, IntentSpec, MergePolicy, Registry, unique_form

Key = tuple[str, str]  # (entity, id)
#: (entity, scope, field names, values) -> id of the live row holding them.
UniqueIndex = Mapping[tuple[str, str, tuple[str, ...], tuple[Any, ...]], str]


@dataclass(frozen=True)
class OpIssue:
    """Why the op at ``op_index`` refuses its change-set."""

    op_index: int
    code: str
    message: str
    field: str | None = None


@dataclass
class RowWrite:
    """The new image of one row (the last one, when several ops of the change-set wrote it)."""

    entity: str
    id: str
    scope: str
    #: None writes a tombstone.
    data: dict[str, Any] | None
    #: The fields whose value changed: their field versions move to the write's version.
    changed: set[str] = field(default_factory=set)
    created: bool = False


@dataclass(frozen=True)
class ConflictDraft:
    """A part of a change-set kept aside for a manager (see the module docstring for kinds)."""

    entity: str
    id: str
    scope: str
    kind: str
    op_index: int
    base_version: int | None
    #: None when the row does not exist on the server (a withheld create).
    server_version: int | None
    proposed: dict[str, Any]
    server_state: dict[str, Any]


@dataclass
class Plan:
    """What a change-set does. With ``errors`` it is rejected: no writes and no conflicts."""

    #: One write per row, so the engine writes (and versions) each row exactly once.
    writes: dict[Key, RowWrite] = field(default_factory=dict)
    conflicts: list[ConflictDraft] = field(default_factory=list)
    errors: list[OpIssue] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return bool(self.errors)

    def scopes(self) -> set[str]:
        """Every scope the plan writes a row or a conflict in."""
        return {w.scope for w in self.writes.values()} | {c.scope for c in self.conflicts}


def _issue(i: int, err: FieldError) -> OpIssue:
    return OpIssue(i, err.code, err.message, err.field)


def _intent_proposal(name: str, args: Mapping[str, Value]) -> dict[str, Any]:
    return {"intent": name, "args": dict(args)}


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
        # Updated as ops are planned, so each op sees the effect of the ones before it.
        self.rows: dict[Key, RowState | None] = dict(rows)
        # Holders per value as the database compares them (see ``unique_form``); a set because
        # a database with a stricter comparison (SQLite) may hold two spellings of one value.
        self.holders: dict[tuple[str, str, tuple[str, ...], tuple[Any, ...]], set[str]] = {}
        for (entity, scope, group, values), owner in unique_index.items():
            folded = tuple(unique_form(v) for v in values)
            self.holders.setdefault((entity, scope, group, folded), set()).add(owner)
        self.plan = Plan()
        # Fields this change-set already set per row (changed or not): the device's own latest
        # word on them, so a later op of the same change-set is never stale against them.
        self.own_fields: dict[Key, set[str]] = {}
        # Creates withheld as unique_violation conflicts: later ops on the row amend the draft.
        self.withheld: dict[Key, ConflictDraft] = {}

    # --- helpers -------------------------------------------------------------------------

    def _refuse(self, i: int, code: str, message: str, name: str | None = None) -> None:
        self.plan.errors.append(OpIssue(i, code, message, name))

    def _entity(self, i: int, name: str) -> EntitySpec | None:
        spec = self.registry.entity(name)
        if spec is None:
            self._refuse(i, "unknown_entity", f"no entity named {name!r}")
        return spec

    def _check_fields(
        self, i: int, spec: EntitySpec, values: Mapping[str, Value], *, intent: bool = False
    ) -> dict[str, Value] | None:
        """``values`` in canonical form, or None after recording why they are refused.

        Every bad field is reported, not just the first, so a device can fix them all at once.
        Intents are server code acting on the role's behalf: they may write any declared field.
        """
        ok = True
        writable = spec.writable_by(self.principal.role)
        clean: dict[str, Value] = {}
        for name, value in values.items():
            fspec = spec.fields.get(name)
            if fspec is None:
                self._refuse(i, "unknown_field", f"{spec.name} has no field {name!r}", name)
                ok = False
            elif not intent and name not in writable:
                message = f"role {self.principal.role} may not write {spec.name}.{name}"
                self._refuse(i, "field_forbidden", message, name)
                ok = False
            elif (err := fspec.check(name, value)) is not None:
                self.plan.errors.append(_issue(i, err))
                ok = False
            else:
                clean[name] = fspec.canonical(value)
        return clean if ok else None

    def _check_scope(self, i: int, scope: str | None) -> bool:
        if scope is None or not self.principal.may_access(scope):
            self._refuse(i, "out_of_scope", "the row is outside the branches of this device's user")
            return False
        return True

    def _check_scope_field(
        self, i: int, spec: EntitySpec, values: Mapping[str, Value], current: Mapping[str, Any]
    ) -> bool:
        # A row never moves between scopes: devices of the old branch would keep a copy
        # forever, and the new branch's devices would miss its history.
        name = spec.scope_field
        if name is not None and name in values and values[name] != current.get(name):
            self._refuse(i, "immutable_field", f"{name} cannot change", name)
            return False
        return True

    def _unique_clash(
        self,
        spec: EntitySpec,
        row_id: str,
        scope: str,
        data: Mapping[str, Any],
        groups: Sequence[tuple[str, ...]],
    ) -> dict[tuple[str, ...], str]:
        """Each of ``groups`` whose values in ``data`` a live row other than ``row_id`` holds,
        with that row's id."""
        clashes: dict[tuple[str, ...], str] = {}
        for group in groups:
            folded = spec.unique_key(group, data)
            if folded is None:
                continue
            for owner in sorted(self.holders.get((spec.name, scope, group, folded), set())):
                holder = self.rows.get((spec.name, owner))
                # A holder deleted earlier in this change-set has released its values.
                if owner != row_id and (holder is None or not holder.deleted):
                    clashes[group] = owner
                    break
        return clashes

    def _claim_unique(
        self,
        spec: EntitySpec,
        row_id: str,
        scope: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
    ) -> None:
        """Move ``row_id``'s unique values from ``old`` to ``new``, so later ops see them."""
        for group in spec.unique:
            if old is not None and (folded := spec.unique_key(group, old)) is not None:
                self.holders.get((spec.name, scope, group, folded), set()).discard(row_id)
            if new is not None and (folded := spec.unique_key(group, new)) is not None:
                self.holders.setdefault((spec.name, scope, group, folded), set()).add(row_id)

    def _withhold_clashes(
        self, i: int, spec: EntitySpec, cur: RowState, base: int | None, changes: dict[str, Value]
    ) -> set[str]:
        """Take out of ``changes`` (to live row ``cur``) the unique groups they would
        duplicate, each kept as a ``unique_violation`` conflict; the rest still applies.
        Returns the names of the fields taken out."""
        touched = [g for g in spec.unique if set(g) & set(changes)]
        data = {**cur.data, **changes}
        withheld: set[str] = set()
        for group, owner in self._unique_clash(spec, cur.id, cur.scope, data, touched).items():
            proposed = {name: changes.pop(name) for name in group if name in changes}
            withheld |= set(proposed)
            server = {"unique": ", ".join(group), "held_by": owner}
            self._conflict(i, cur, "unique_violation", base, proposed, server)
        return withheld

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
            # One write per row: fold this op into the change-set's earlier write of it.
            write.changed |= previous.changed
            write.created = previous.created and data is not None
        self.plan.writes[key] = write
        # ``version`` and ``field_versions`` stay the server's: staleness is always judged
        # against what the server had before this change-set, which is what the device saw.
        self.rows[key] = RowState(  # dataclasses.replace, without its cost on a hot path
            cur.entity, cur.id, cur.scope, cur.version, data is None, data or {}, cur.field_versions
        )

    def _conflict(
        self,
        i: int,
        cur: RowState,
        kind: str,
        base: int | None,
        proposed: dict[str, Any],
        server: dict[str, Any],
    ) -> ConflictDraft:
        draft = ConflictDraft(
            cur.entity, cur.id, cur.scope, kind, i, base, cur.version, proposed, server
        )
        self.plan.conflicts.append(draft)
        return draft

    def _replace_draft(self, old: ConflictDraft, new: ConflictDraft | None) -> None:
        at = next(j for j, c in enumerate(self.plan.conflicts) if c is old)
        if new is None:
            del self.plan.conflicts[at]
        else:
            self.plan.conflicts[at] = new

    # --- ops -----------------------------------------------------------------------------

    def create(self, i: int, op: CreateOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        if self.principal.role not in spec.creatable_by:
            self._refuse(i, "forbidden", f"role {self.principal.role} may not create {spec.name}")
            return
        values = self._check_fields(i, spec, op.fields)
        if values is None:
            return
        values = with_home_branch(spec, values, self.principal)
        # Every declared field is in a row's image, so replicas never guess at absent keys.
        unset = {name: None for name, fspec in spec.fields.items() if fspec.nullable}
        data: dict[str, Any] = {**unset, **spec.defaults, **values}
        missing = sorted(spec.required_fields() - set(data))
        for name in missing:
            self._refuse(i, "required", f"{name} is required", name)
        if missing:
            return
        scope = spec.scope_of(data)
        if not self._check_scope(i, scope):
            return
        assert scope is not None
        key = (spec.name, op.id)
        if self.rows.get(key) is not None or key in self.withheld:
            message = f"{spec.name} {op.id} already exists (ids are never reused)"
            self._refuse(i, "already_exists", message)
            return
        clashes = self._unique_clash(spec, op.id, scope, data, spec.unique)
        if clashes:
            # The row cannot exist as sent; which one the branch keeps is a manager's call.
            group, owner = next(iter(clashes.items()))
            server = {"unique": ", ".join(group), "held_by": owner}
            draft = ConflictDraft(
                spec.name, op.id, scope, "unique_violation", i, None, None, data, server
            )
            self.plan.conflicts.append(draft)
            self.withheld[key] = draft
            return
        row = RowState(spec.name, op.id, scope, 0, False, {}, {})
        self._claim_unique(spec, op.id, scope, None, data)
        self._write(spec, row, data, set(data), created=True)
        self.own_fields[key] = set(data)

    def _amend_withheld(self, i: int, spec: EntitySpec, op: PatchOp | DeleteOp) -> None:
        """A later op on a row whose create was withheld joins the create in its conflict:
        the manager sees the row the device meant, and the change-set is not refused for
        naming a row the device rightly believes it created."""
        key = (spec.name, op.id)
        draft = self.withheld[key]
        if isinstance(op, DeleteOp):
            if self.principal.role not in spec.deletable_by:
                self._refuse(
                    i, "forbidden", f"role {self.principal.role} may not delete {spec.name}"
                )
                return
            # Created then deleted: nothing is left to decide.
            self._replace_draft(draft, None)
            del self.withheld[key]
            return
        values = self._check_fields(i, spec, op.fields)
        if values is None or not self._check_scope_field(i, spec, values, draft.proposed):
            return
        amended = replace(draft, proposed={**draft.proposed, **values})
        self._replace_draft(draft, amended)
        self.withheld[key] = amended

    def patch(self, i: int, op: PatchOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        key = (spec.name, op.id)
        if key in self.withheld:
            self._amend_withheld(i, spec, op)
            return
        cur = self.rows.get(key)
        if cur is None:
            self._refuse(i, "not_found", f"{spec.name} {op.id} does not exist")
            return
        if not self._check_scope(i, cur.scope):
            return
        values = self._check_fields(i, spec, op.fields)
        if values is None:
            return
        # A tombstone has no data to compare the scope field with; it is refused below anyway.
        if not cur.deleted and not self._check_scope_field(i, spec, values, cur.data):
            return
        # Version 0 is a row this change-set creates: the device knows no version of it yet.
        if cur.version and op.base_version > cur.version:
            message = f"base_version {op.base_version} is newer than the row ({cur.version})"
            self._refuse(i, "invalid_base_version", message)
            return
        if cur.deleted:
            # The row is gone: never resurrect it, but keep the edit for a manager to see.
            self._conflict(i, cur, "update_deleted", op.base_version, dict(values), {})
            return
        own = self.own_fields.setdefault(key, set())
        stale = {
            name
            for name, value in values.items()
            if name not in own
            # A field without a recorded version may have changed at any time up to the
            # row's version: assume it did (a needless conflict beats a silent overwrite).
            and cur.field_versions.get(name, cur.version) > op.base_version
            # Two devices making the same change agree: nothing to resolve.
            and cur.data.get(name) != value
        }
        if stale and spec.merge is MergePolicy.FLAG:
            self._conflict(
                i,
                cur,
                "concurrent_update",
                op.base_version,
                {name: values[name] for name in sorted(stale)},
                {name: cur.data.get(name) for name in sorted(stale)},
            )
            values = {k: v for k, v in values.items() if k not in stale}
        # Under FIELD_LWW stale fields stay in ``values``: this write is the later one and wins.
        changes = {k: v for k, v in values.items() if cur.data.get(k) != v}
        withheld = self._withhold_clashes(i, spec, cur, op.base_version, changes)
        own.update(set(values) - withheld)
        if not changes:
            return
        data = {**cur.data, **changes}
        self._claim_unique(spec, op.id, cur.scope, cur.data, data)
        self._write(spec, cur, data, set(changes), created=False)

    def delete(self, i: int, op: DeleteOp) -> None:
        spec = self._entity(i, op.entity)
        if spec is None:
            return
        key = (spec.name, op.id)
        if key in self.withheld:
            self._amend_withheld(i, spec, op)
            return
        cur = self.rows.get(key)
        if cur is None:
            self._refuse(i, "not_found", f"{spec.name} {op.id} does not exist")
            return
        if self.principal.role not in spec.deletable_by:
            self._refuse(i, "forbidden", f"role {self.principal.role} may not delete {spec.name}")
            return
        if not self._check_scope(i, cur.scope):
            return
        if cur.deleted:
            return  # deleting twice is still deleted
        if cur.version and op.base_version > cur.version:
            message = f"base_version {op.base_version} is newer than the row ({cur.version})"
            self._refuse(i, "invalid_base_version", message)
            return
        # ``cur.version`` is the server's version before this change-set (see ``_write``), so
        # the device's own earlier edits in the change-set do not hide someone else's.
        if spec.merge is MergePolicy.FLAG and cur.version > op.base_version:
            modified = {
                name: cur.data.get(name)
                for name, version in sorted(cur.field_versions.items())
                if version > op.base_version
            }
            self._conflict(i, cur, "delete_modified", op.base_version, {"deleted": True}, modified)
            return
        self._claim_unique(spec, op.id, cur.scope, cur.data, None)
        self._write(spec, cur, None, set(), created=False)

    def _check_args(self, i: int, spec: IntentSpec, args: Mapping[str, Value]) -> bool:
        ok = True
        for name, value in args.items():
            fspec = spec.args.get(name)
            err = (
                FieldError(name, "unknown_field", f"{spec.name} has no argument {name!r}")
                if fspec is None
                else fspec.check(name, value)
            )
            if err is not None:
                self.plan.errors.append(_issue(i, err))
                ok = False
        for name, fspec in spec.args.items():
            if name not in args and not fspec.nullable:
                self._refuse(i, "required", f"{name} is required", name)
                ok = False
        return ok

    def _hold_back_intent(
        self, i: int, name: str, args: Mapping[str, Value], targets: Sequence[Key]
    ) -> bool:
        """Keep the intent as a conflict, unapplied, when a row it names is not there for it:
        deleted (a delete wins over an intent too) or withheld with its create. The device
        did nothing wrong, so its change-set is not refused; a manager sees the intent."""
        proposal = _intent_proposal(name, args)
        for key in targets:
            held = self.withheld.get(key)
            if held is not None:
                server = {"blocked_by": held.kind, "op_index": held.op_index}
                self.plan.conflicts.append(
                    replace(
                        held,
                        kind="blocked_by_conflict",
                        op_index=i,
                        proposed=proposal,
                        server_state=server,
                    )
                )
                return True
            row = self.rows.get(key)
            if row is not None and row.deleted:
                self._conflict(i, row, "update_deleted", None, proposal, {})
                return True
        return False

    def intent(self, i: int, op: IntentOp) -> None:
        spec = self.registry.intents.get(op.name)
        if spec is None:
            self._refuse(i, "unknown_intent", f"no intent named {op.name!r}")
            return
        if self.principal.role not in spec.allowed:
            self._refuse(i, "forbidden", f"role {self.principal.role} may not {op.name}")
            return
        if not self._check_args(i, spec, op.args):
            return
        args = spec.canonical_args(op.args)
        try:
            targets = spec.targets(args)
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse(i, "invalid", f"{op.name}: {exc}")
            return
        if self._hold_back_intent(i, op.name, args, targets):
            return
        current: dict[Key, Mapping[str, Any] | None] = {}
        for key in targets:
            row = self.rows.get(key)
            current[key] = None if row is None else row.data
        result = spec.apply(args, current)
        if isinstance(result, FieldError):
            self.plan.errors.append(_issue(i, result))
            return
        for key, changes in result.items():
            row = self.rows.get(key)
            entity = self.registry.entity(key[0])
            if row is None or row.deleted or entity is None:
                self._refuse(i, "not_found", f"{key[0]} {key[1]} does not exist")
                return
            if not self._check_scope(i, row.scope):
                return
            values = self._check_fields(i, entity, changes, intent=True)
            if values is None or not self._check_scope_field(i, entity, values, row.data):
                return
            changed = {k: v for k, v in values.items() if row.data.get(k) != v}
            withheld = self._withhold_clashes(i, entity, row, None, changed)
            self.own_fields.setdefault(key, set()).update(set(values) - withheld)
            if changed:
                data = {**row.data, **changed}
                self._claim_unique(entity, row.id, row.scope, row.data, data)
                self._write(entity, row, data, set(changed), created=False)


def with_home_branch(
    spec: EntitySpec, fields: Mapping[str, Any], principal: Principal
) -> dict[str, Any]:
    """The fields of a create, the row's branch defaulted to the device's: a device works for
    one branch, so a row it creates belongs there unless it says otherwise."""
    values = dict(fields)
    branch = principal.device_branch_id
    if spec.scope_field is not None and spec.scope_field not in values and branch is not None:
        values[spec.scope_field] = branch.lower()
    return values


def plan_change_set(
    ops: Sequence[Op],
    principal: Principal,
    rows: Mapping[Key, RowState | None],
    registry: Registry,
    unique_index: UniqueIndex | None = None,
) -> Plan:
    """Decide what a change-set does, given the current state of the rows it touches.

    ``rows`` must hold every row the ops name (None when it does not exist; ``touched_keys``
    lists them); ``unique_index`` every live holder of a unique value the ops write. Ops apply
    in order, each seeing the effect of the ones before it. A plan with ``errors`` is rejected:
    it carries no writes and no conflicts, and must be stored as rejected.
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
                    # The same canonical args the planner passes, or it would look for rows
                    # under ids the engine never loaded.
                    keys.extend(spec.targets(spec.canonical_args(op.args)))
                except (KeyError, TypeError, ValueError):
                    continue  # bad args: the planner reports them
        else:
            keys.append((op.entity, op.id))
    return list(dict.fromkeys(keys))
