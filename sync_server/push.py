"""Push: applying a device's change-sets exactly once, in order.

The numbered steps are those of ``docs/protocol.md`` § Push. Here each change-set runs in its own
transaction, so a batch is a sequence of independent commits: a failure part-way leaves the
earlier change-sets applied and acknowledged, and the device resends only the rest. Concurrent
small pushes are applied together instead (``sync_server.push_group``, group commit); this is
the path for a backlog, and the one a group falls back to when the database refuses it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any

import msgspec
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from conflict.planner import (
    ConflictDraft,
    OpIssue,
    Plan,
    UniqueIndex,
    plan_change_set,
    touched_keys,
    with_home_branch,
)
from domain.fields import Field
from domain.ops import CreateOp, DeleteOp, IntentOp, Op, PatchOp, Principal, RowState
from domain.registry import Registry
from sync_protocol import messages as m

from . import bulk
from .changelog import ChangeLog, ScopeNotLocked
from .db import transact
from .directory import DeviceRefused, utcnow
from .records import RecordWriter, unique_holders_by_scope
from .tables import conflicts, devices, sync_change_sets

log = logging.getLogger("galley.push")

_encode = msgspec.msgpack.Encoder().encode
#: Namespace of the record ids given to change-sets whose own id was already taken.
_DERIVED_IDS = uuid.UUID("6b1f3c2e-9a4d-4f57-8e0b-2d7c5a9e1f30")


@dataclass(frozen=True)
class SeqGap:
    """The change-set is not the next one expected: nothing was applied."""

    expected: int


def _canonical(fields: Mapping[str, Field], values: dict[str, Any]) -> dict[str, Any]:
    # Ids are stored lower-case: an upper-case branch id must lock and write the same scope
    # (step 4), and an upper-case reference must find the same row. Undeclared or invalid
    # values are left for the planner to refuse.
    return {
        name: spec.canonical(value) if (spec := fields.get(name)) is not None else value
        for name, value in values.items()
    }


def to_domain_op(op: m.Op, registry: Registry) -> Op:
    """The wire op as a domain op, with every id in its canonical (lower-case) spelling."""
    if isinstance(op, m.Intent):
        intent = registry.intents.get(op.name)
        return IntentOp(op.name, intent.canonical_args(op.args) if intent else op.args)
    spec = registry.entity(op.entity)
    if isinstance(op, m.Create):
        return CreateOp(
            op.entity, op.id.lower(), _canonical(spec.fields, op.fields) if spec else op.fields
        )
    if isinstance(op, m.Patch):
        fields = _canonical(spec.fields, op.fields) if spec else op.fields
        return PatchOp(op.entity, op.id.lower(), op.base_version, fields)
    return DeleteOp(op.entity, op.id.lower(), op.base_version)


def scopes_to_lock(
    ops: Sequence[Op], principal: Principal, registry: Registry, known: dict[tuple[str, str], str]
) -> set[str]:
    """Every scope the ops may write: of the rows they name, and of the rows they create."""
    scopes = set(known.values())
    for op in ops:
        if isinstance(op, CreateOp):
            spec = registry.entity(op.entity)
            if spec is None:
                continue
            scope = spec.scope_of(with_home_branch(spec, op.fields, principal))
            if scope is not None and principal.may_access(scope):
                scopes.add(scope)
    return scopes


def unique_candidates(
    ops: Sequence[Op],
    principal: Principal,
    rows: Mapping[tuple[str, str], RowState | None],
    registry: Registry,
) -> list[tuple[str, str, tuple[str, ...], tuple[Any, ...]]]:
    """(entity, scope, unique group, values) of every unique value the ops want to write."""
    found: list[tuple[str, str, tuple[str, ...], tuple[Any, ...]]] = []
    for op in ops:
        if not isinstance(op, CreateOp | PatchOp):
            continue
        spec = registry.entity(op.entity)
        if spec is None or not spec.unique:
            continue
        current = rows.get((op.entity, op.id))
        if current is not None:
            scope: str | None = current.scope
        else:
            scope = spec.scope_of(with_home_branch(spec, op.fields, principal))
        if scope is None:
            continue
        found.extend(
            (spec.name, scope, group, tuple(op.fields[n] for n in group))
            for group in spec.unique
            if all(n in op.fields for n in group)
        )
    return found


def unique_index(
    conn: Connection,
    change_sets: Sequence[tuple[Sequence[Op], Principal]],
    rows: Mapping[tuple[str, str], RowState | None],
    registry: Registry,
) -> dict[Any, str]:
    """Who holds, in the system of record, each unique value the ops of ``change_sets`` (each
    with the principal writing it) want to write: one query per entity and unique group."""
    by_entity: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for ops, principal in change_sets:
        for entity, scope, _, values in unique_candidates(ops, principal, rows, registry):
            by_entity.setdefault(entity, {}).setdefault(scope, []).append(values)
    index: dict[Any, str] = {}
    for entity, by_scope in by_entity.items():
        spec = registry.entity(entity)
        assert spec is not None
        index.update(unique_holders_by_scope(conn, spec, by_scope))
    return index


def stored_outcome(conn: Connection, device_id: str, seq: int) -> m.Outcome:
    blob = conn.execute(
        select(sync_change_sets.c.outcome).where(
            sync_change_sets.c.device_id == device_id, sync_change_sets.c.seq == seq
        )
    ).scalar_one()
    outcome = msgspec.msgpack.decode(blob, type=m.Outcome)
    outcome.replayed = True
    return outcome


def _id_taken(conn: Connection, change_set_id: str) -> bool:
    return (
        conn.execute(
            select(sync_change_sets.c.seq).where(sync_change_sets.c.change_set_id == change_set_id)
        ).first()
        is not None
    )


def _duplicate_id_plan(change_set: m.ChangeSet) -> Plan:
    return Plan(
        errors=[
            OpIssue(
                -1,
                "duplicate_change_set_id",
                f"change-set id {change_set.id} was already used by an earlier change-set; "
                "every change-set needs a new id",
            )
        ]
    )


def outcome_for(
    change_set: m.ChangeSet, plan: Plan, versions: dict[str, int], conflict_ids: list[str]
) -> m.Outcome:
    if plan.rejected:
        return m.Outcome(
            change_set_id=change_set.id,
            seq=change_set.seq,
            status="rejected",
            errors=[m.OpError(e.op_index, e.code, e.message, e.field) for e in plan.errors],
        )
    return m.Outcome(
        change_set_id=change_set.id,
        seq=change_set.seq,
        status="applied_with_conflicts" if conflict_ids else "applied",
        versions=versions,
        conflicts=conflict_ids,
    )


#: The device as step 1 needs it: its last applied seq, owner, home branch and revocation.
_DEVICE = select(
    devices.c.last_applied_seq, devices.c.user_id, devices.c.branch_id, devices.c.revoked_at
).where(devices.c.id == bindparam("device_id"))
_LOCK_DEVICE = _DEVICE.with_for_update()


def device_principal(user: Principal, device: Any) -> Principal:
    """``user`` writing through ``device`` (its row in ``devices``, None when there is no such
    device): refused unless the device is the user's and not revoked; the device's branch is
    where its creates go by default (see ``conflict.planner.with_home_branch``)."""
    if device.user_id != user.user_id or device.revoked_at is not None:
        raise DeviceRefused(unregistered=False)
    branch = device.branch_id if device.branch_id in user.branch_ids else None
    if branch is None and len(user.branch_ids) == 1:
        (branch,) = user.branch_ids
    return replace(user, device_branch_id=branch)


def apply_change_set(
    conn: Connection,
    *,
    device_id: str,
    principal: Principal,
    change_set: m.ChangeSet,
    registry: Registry,
    now: datetime,
    recheck: bool = False,
    refusal: OpIssue | None = None,
    observed: list[int] | None = None,
) -> m.Outcome | SeqGap:
    """Apply one change-set inside the caller's transaction (the caller commits).

    ``recheck`` (after a failed attempt) first looks for an earlier change-set with the same
    id. With ``refusal`` the change-set is not planned again but recorded as rejected for that
    reason (it consumes its seq: step 7), after the database refused to apply it.
    ``observed`` receives the device's last applied seq as step 1 read it.
    """
    # Step 1: lock the device row. Every push of this device queues here, so two racing copies
    # of the same change-set cannot both see it as new. The same read says whether the device
    # is still this user's (a revocation or a transfer takes effect between two change-sets).
    device = conn.execute(_LOCK_DEVICE, {"device_id": device_id}).first()
    if device is None:
        raise DeviceRefused(unregistered=True)
    principal = device_principal(principal, device)
    last = device.last_applied_seq
    if observed is not None:
        observed.append(int(last))

    # Step 2: a seq at or below the last applied one is a replay: answer what we answered.
    if change_set.seq <= last:
        return stored_outcome(conn, device_id, change_set.seq)
    # Step 3: a gap means the device lost track; it must resume at last + 1.
    if change_set.seq != last + 1:
        return SeqGap(expected=last + 1)

    # Step 7, first half: advance the device now, while only its own row is locked (the row
    # stays locked to the end anyway, and the transaction commits or rolls back as a whole):
    # one statement fewer held under the scope counters below.
    conn.execute(
        ADVANCE_DEVICE,
        {"k_device_id": device_id, "last_applied_seq": change_set.seq, "last_seen_at": now},
    )

    change_set_id = change_set.id.lower()
    record = partial(
        _record, conn, device_id=device_id, principal=principal, change_set=change_set, now=now
    )
    if recheck and _id_taken(conn, change_set_id):
        # The id was already used (a client bug, or two devices sharing a generator): the
        # record insert of step 7 failed on it. It cannot be recorded under its own id, so it
        # is rejected under an id derived from the seq, consuming the seq so the queue moves on.
        return record(
            record_id=str(uuid.uuid5(_DERIVED_IDS, f"{device_id}:{change_set.seq}")),
            outcome=outcome_for(change_set, _duplicate_id_plan(change_set), {}, []),
        )
    if refusal is not None:
        return record(
            record_id=change_set_id,
            outcome=outcome_for(change_set, Plan(errors=[refusal]), {}, []),
        )

    # Step 4: read and lock the rows the ops name, then lock the counters of the scopes they
    # write, in sorted order. A row never changes scope, so once it is locked its scope is
    # known for good; a row that does not exist yet and is created meanwhile by another
    # device makes our insert fail on its key, and the change-set is planned again.
    ops = [to_domain_op(op, registry) for op in change_set.ops]
    changelog = ChangeLog(conn, now)
    rows = changelog.load_rows(touched_keys(ops, registry), lock=True)
    known = {k: r.scope for k, r in rows.items() if r is not None}
    changelog.lock_scopes(scopes_to_lock(ops, principal, registry, known))

    # Step 5: the functional core decides.
    holders = unique_index(conn, [(ops, principal)], rows, registry)
    plan = plan_safely(ops, principal, rows, registry, holders, change_set, device_id)

    # Step 6: write the plan: rows and their records at the scope's next version, conflicts.
    conflict_ids: list[str] = []
    versions: dict[str, int] = {}
    if not plan.rejected:
        records = RecordWriter(conn, registry, now)
        conflict_ids, conflicts_found = write_plan(
            plan, changelog, records, device_id, principal, change_set, now
        )
    # The writes left, in one round trip (nothing below reads).
    with bulk.held(conn):
        if not plan.rejected:
            records.flush()
            bulk.write(conn, INSERT_CONFLICT, conflicts_found)
            versions = changelog.finish()

        # Step 7: record the outcome, in the same transaction as the writes (the device's seq
        # was advanced after step 3).
        outcome = record(
            record_id=change_set_id, outcome=outcome_for(change_set, plan, versions, conflict_ids)
        )
    return outcome


def _beyond_msgpack(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, dict):
        return {k: _beyond_msgpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_beyond_msgpack(v) for v in value]
    return value


def _storable_ops(ops: Sequence[m.Op]) -> bytes:
    """The ops as sent, for review. JSON decodes integers of any size, MessagePack stores at
    most 64 bits: such a value (only ever in a rejected change-set, since no field accepts it)
    is kept as its decimal string rather than failing the whole push with a 500."""
    try:
        return _encode(ops)
    except OverflowError:
        return _encode(_beyond_msgpack(msgspec.to_builtins(ops)))


def plan_safely(
    ops: Sequence[Op],
    principal: Principal,
    rows: Mapping[tuple[str, str], RowState | None],
    registry: Registry,
    holders: UniqueIndex,
    change_set: m.ChangeSet,
    device_id: str,
) -> Plan:
    """Step 5: the functional core's plan, or a rejection when the core itself fails."""
    try:
        return plan_change_set(ops, principal, rows, registry, holders)
    except Exception:
        # A bug in the pure core fails the same way on every retry: answering 500 would block
        # the device's queue for good. Reject and keep the change-set for review instead.
        log.exception("planning change-set %s of device %s failed", change_set.id, device_id)
        return Plan(
            errors=[OpIssue(-1, "server_error", "the server could not process this change-set")]
        )


def write_plan(
    plan: Plan,
    changelog: ChangeLog,
    records: RecordWriter,
    device_id: str,
    principal: Principal,
    change_set: m.ChangeSet,
    now: datetime,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Step 6 for an accepted plan: every row image into the log (at its scope's version) and
    the records; returns the conflicts' new ids and rows, for the caller to store."""
    for write in plan.writes.values():
        version = changelog.write(write.entity, write.id, write.scope, write.data, write.changed)
        records.save(
            write.entity,
            write.id,
            write.data,
            version=version,
            created=write.created,
            changed=write.changed,
        )
    ids: list[str] = []
    found: list[dict[str, Any]] = []
    for draft in plan.conflicts:
        ids.append(str(uuid.uuid4()))
        found.append(
            conflict_row(
                draft,
                conflict_id=ids[-1],
                device_id=device_id,
                principal=principal,
                change_set=change_set,
                now=now,
            )
        )
    return ids, found


def conflict_row(
    draft: ConflictDraft,
    *,
    conflict_id: str,
    device_id: str,
    principal: Principal,
    change_set: m.ChangeSet,
    now: datetime,
) -> dict[str, Any]:
    """The ``conflicts`` row of a conflict the plan flagged (step 6)."""
    return {
        "id": conflict_id,
        "scope": draft.scope,
        "entity": draft.entity,
        "row_id": draft.id,
        "kind": draft.kind,
        "device_id": device_id,
        "user_id": principal.user_id,
        "change_set_id": change_set.id,
        "op_index": draft.op_index,
        "base_version": draft.base_version,
        "server_version": draft.server_version,
        "proposed": json.dumps(draft.proposed, sort_keys=True),
        "server_state": json.dumps(draft.server_state, sort_keys=True, default=str),
        "status": "open",
        "created_at": now,
    }


def record_row(
    *,
    device_id: str,
    principal: Principal,
    change_set: m.ChangeSet,
    record_id: str,
    outcome: m.Outcome,
    now: datetime,
) -> dict[str, Any]:
    """The ``sync_change_sets`` row storing a change-set's outcome (step 7)."""
    return {
        "device_id": device_id,
        "seq": change_set.seq,
        "change_set_id": record_id,
        "user_id": principal.user_id,
        "status": outcome.status,
        "outcome": _encode(outcome),
        "ops": _storable_ops(change_set.ops),
        "client_created_at": change_set.created_at,
        "received_at": now,
    }


def _record(
    conn: Connection,
    *,
    device_id: str,
    principal: Principal,
    change_set: m.ChangeSet,
    record_id: str,
    outcome: m.Outcome,
    now: datetime,
) -> m.Outcome:
    """Step 7: store the outcome (the device's last applied seq was advanced before step 4)."""
    bulk.write(
        conn,
        INSERT_RECORD,
        record_row(
            device_id=device_id,
            principal=principal,
            change_set=change_set,
            record_id=record_id,
            outcome=outcome,
            now=now,
        ),
    )
    return outcome


# Built once: building (and cache-keying) a statement with its values inlined, per call, cost
# more CPU than sending it.
INSERT_RECORD = insert(sync_change_sets)
ADVANCE_DEVICE = update(devices).where(devices.c.id == bindparam("k_device_id"))
INSERT_CONFLICT = insert(conflicts)


def _apply_now(conn: Connection, **kwargs: Any) -> m.Outcome | SeqGap:
    # utcnow() inside the attempt: a retried transaction records its own time.
    return apply_change_set(conn, now=utcnow(), **kwargs)


@dataclass
class PushResult:
    outcomes: list[m.Outcome]
    last_applied_seq: int
    gap: SeqGap | None
    #: scope -> newest version committed by this push (for change notifications).
    versions: dict[str, int]
    #: Set when the device was refused (revoked, transferred, deleted) after earlier
    #: change-sets of the batch were applied: processing stopped there.
    refused: DeviceRefused | None = None


def push(
    db: Engine | Connection,
    *,
    device_id: str,
    principal: Principal,
    change_sets: Sequence[m.ChangeSet],
    registry: Registry,
) -> PushResult:
    """Apply ``change_sets`` in order, each in its own transaction; stop at a seq gap.

    ``principal`` is the signed-in user; which branch the device writes to by default comes
    from the device's row (see :func:`device_principal`), which also refuses a device that is
    not the user's (:class:`DeviceRefused`). Given a connection, every transaction runs on it
    (one pool checkout for the request); a transaction the caller left open on it (its
    authentication reads) becomes part of the first change-set's.
    """
    if isinstance(db, Engine):
        with db.connect() as conn:
            return push(
                conn,
                device_id=device_id,
                principal=principal,
                change_sets=change_sets,
                registry=registry,
            )
    conn = db
    outcomes: list[m.Outcome] = []
    versions: dict[str, int] = {}
    gap: SeqGap | None = None
    last_applied: int | None = None
    for change_set in change_sets:
        result: m.Outcome | SeqGap | None = None
        refusal: OpIssue | None = None
        observed: list[int] = []
        for attempt in range(4):
            observed.clear()
            try:
                result = transact(
                    conn,
                    partial(
                        _apply_now,
                        device_id=device_id,
                        principal=principal,
                        change_set=change_set,
                        registry=registry,
                        recheck=attempt > 0,
                        refusal=refusal,
                        observed=observed,
                    ),
                )
                break
            except DeviceRefused as exc:
                if not outcomes:
                    raise  # nothing applied: the request is refused (404/403)
                # Revoked mid-batch: what was applied stays applied and is answered.
                assert last_applied is not None  # set by the change-sets before this one
                return PushResult(outcomes, last_applied, None, versions, refused=exc)
            except ScopeNotLocked as exc:
                if attempt < 2:
                    continue  # a row appeared in another scope meanwhile: step 4 again
                # Every attempt wrote outside the scopes it locked: a planner/engine bug that
                # would fail the same way forever. Reject rather than block the queue.
                log.error("change-set %s writes outside its locked scopes: %s", change_set.id, exc)
                refusal = OpIssue(
                    -1, "server_error", "the server could not process this change-set"
                )
            except (IntegrityError, DataError) as exc:
                if refusal is None and attempt == 0:
                    # Perhaps the change-set id is taken (step 7's insert failed on it), or a
                    # row we saw as new was created meanwhile (step 4): the retry looks for the
                    # id and plans again over the rows as they now are. Checking only then
                    # keeps a query off every push.
                    continue
                # The database itself refuses the writes (a constraint the planner did not
                # foresee). Failing every retry with a 500 would block the device's queue
                # forever: record the change-set as rejected instead, and move on.
                log.warning("change-set %s refused by the database: %s", change_set.id, exc.orig)
                refusal = OpIssue(
                    -1,
                    "constraint_violation",
                    "the database refused the change-set: a value clashes with an existing row",
                )
        if result is None:
            raise RuntimeError("change-set could not be applied after retries")
        # The device's last applied seq after this transaction, without another query: the
        # seq just recorded, or (replay, gap) what step 1 read under the device lock.
        last_applied = (
            result.seq if isinstance(result, m.Outcome) and not result.replayed else observed[-1]
        )
        if isinstance(result, SeqGap):
            gap = result
            break
        outcomes.append(result)
        for scope, version in result.versions.items():
            versions[scope] = max(versions.get(scope, 0), version)
    if last_applied is None:  # an empty batch: say where the device stands
        device = conn.execute(_DEVICE, {"device_id": device_id}).first()
        if device is None:
            raise DeviceRefused(unregistered=True)
        device_principal(principal, device)
        last_applied = int(device.last_applied_seq)
        conn.rollback()
    return PushResult(outcomes, last_applied, gap, versions)
