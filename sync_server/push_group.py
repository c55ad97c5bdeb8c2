"""Group commit: the change-sets of several concurrent pushes applied in one transaction.

Devices of a branch push at the same time, and every change-set of the branch queues on the
branch's scope counter (``sync_server.changelog``): applied one transaction at a time, each
pays the whole fixed cost of a transaction (locks, counter, log, outcome, commit: ~13
statements in 7 round trips) for a handful of rows. :func:`push_group` takes the pushes that
are waiting (``PushUnit``, one per request) and applies them in **one** transaction, in order,
as if one after another:

* each change-set is still all-or-nothing together with its device's seq and its stored
  outcome (they commit or roll back with the group), is planned against the rows as the
  change-sets before it in the group left them, and gets a version of its own in each scope it
  writes (so pull pages never split it, and version order is still commit order);
* the statements are shared: one lock statement for all the devices, one for all the rows, one
  per scope counter, one query per entity and scope for unique values, and multi-row writes;
* replays, seq gaps, refused devices and rejected change-sets are answered exactly as by
  :func:`sync_server.push.push` (same outcomes, same errors);
* when the database refuses the group (a constraint, a row created meanwhile by another
  process, a change-set id already used) or anything unexpected happens, the group is rolled
  back whole and every push runs again alone through :func:`sync_server.push.push`, whose
  retries and rejections handle those cases one change-set at a time. Nothing of the failed
  group was committed, so nothing is applied twice.

A group holds only small pushes (see ``sync_server.committer``): a device's backlog goes
through ``push`` as before, one transaction per change-set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import msgspec
from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from conflict.planner import Plan, touched_keys
from domain.ops import Op, Principal, RowState
from domain.registry import Registry, unique_form
from sync_protocol import messages as m

from . import bulk
from .bulk import update_rows
from .changelog import ChangeLog, ScopeNotLocked
from .db import transact
from .directory import DeviceRefused, utcnow
from .push import (
    INSERT_CONFLICT,
    INSERT_RECORD,
    PushResult,
    SeqGap,
    device_principal,
    outcome_for,
    plan_safely,
    push,
    record_row,
    scopes_to_lock,
    stored_outcome,
    to_domain_op,
    unique_candidates,
    unique_index,
    write_plan,
)
from .records import RecordWriter
from .tables import devices

log = logging.getLogger("galley.push")


@dataclass
class PushUnit:
    """One push request waiting to be applied."""

    device_id: str
    change_sets: Sequence[m.ChangeSet]
    #: Who says they are pushing (verified token claims), for ``Identify``.
    credentials: Any


#: A unit's answer: its result, or the exception that refused it (nothing of it applied).
UnitResult = PushResult | Exception
#: Who is pushing, for the credentials of several units, read in the transaction that applies
#: them: the user as the database says now, or the exception refusing that unit (a 401).
Identify = Callable[[Connection, Sequence[Any]], Sequence[Principal | Exception]]

_LOCK_DEVICES = (
    select(
        devices.c.id,
        devices.c.last_applied_seq,
        devices.c.user_id,
        devices.c.branch_id,
        devices.c.revoked_at,
    )
    .where(devices.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(devices.c.id)
    .with_for_update()
)


@dataclass
class _Apply:
    """A change-set of the group to plan and write."""

    device_id: str
    principal: Principal
    change_set: m.ChangeSet
    ops: list[Op]
    outcome: m.Outcome | None = None


@dataclass
class _ReplayOf:
    """A copy of a change-set taken earlier in the group (a retry racing its original)."""

    entry: _Apply


@dataclass
class _UnitPlan:
    """What the group does for one unit, in the unit's order: outcomes (replays answered
    directly, applied change-sets filled in after planning), where it stopped."""

    entries: list[m.Outcome | _Apply | _ReplayOf] = field(default_factory=list)
    gap: SeqGap | None = None
    last_applied: int = 0


def push_group(
    conn: Connection, units: Sequence[PushUnit], *, registry: Registry, identify: Identify
) -> list[UnitResult]:
    """Apply ``units`` in order in one transaction; their results, in the same order.

    Falls back to one :func:`push` per unit when the group as a whole cannot be committed
    (see the module docstring). A lost connection is raised: none of the units was applied.
    """
    try:
        return transact(
            conn, partial(_apply_group_now, units=units, registry=registry, identify=identify)
        )
    except (IntegrityError, DataError) as exc:
        # The database's own message: the statement (a whole batch of the devices' data,
        # see bulk.held) stays out of the log.
        log.info("group of %d pushes refused (%s): applying them one by one", len(units), exc.orig)
    except ScopeNotLocked as exc:
        log.info("group of %d pushes refused (%s): applying them one by one", len(units), exc)
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise  # the connection is gone: nothing was applied, nothing more can be
        # A lock wait that outlasted its retries, say: alone, only the push that waits on the
        # lock fails.
        log.warning(
            "group of %d pushes failed (%s): applying them one by one", len(units), exc.orig
        )
    except Exception:
        # A bug here must not cost the devices their writes: the proven path takes over.
        log.exception("group of %d pushes failed: applying them one by one", len(units))
    return [push_alone(conn, unit, registry=registry, identify=identify) for unit in units]


def push_alone(
    conn: Connection, unit: PushUnit, *, registry: Registry, identify: Identify
) -> UnitResult:
    """``unit`` applied by :func:`push`, one transaction per change-set; what refused it (a
    database error included) is its result, so that the units after it still run."""
    try:
        (principal,) = identify(conn, [unit.credentials])
        if isinstance(principal, Exception):
            raise principal
        return push(
            conn,
            device_id=unit.device_id,
            principal=principal,
            change_sets=unit.change_sets,
            registry=registry,
        )
    except Exception as exc:
        if conn.in_transaction() or conn.invalidated:
            try:
                conn.rollback()
            except Exception:  # the connection died: the pool replaces it on next use
                conn.invalidate()
        return exc


def _apply_group_now(
    conn: Connection, *, units: Sequence[PushUnit], registry: Registry, identify: Identify
) -> Any:
    # utcnow() inside the attempt: a retried transaction records its own time.
    return _apply_group(conn, units, registry, identify, utcnow())


def _apply_group(
    conn: Connection,
    units: Sequence[PushUnit],
    registry: Registry,
    identify: Identify,
    now: datetime,
) -> list[UnitResult]:
    results: list[UnitResult | None] = [None] * len(units)

    # Who is pushing (each unit's own 401s), then step 1 for every device at once: one
    # locking read, in key order like any other writer's.
    users: dict[int, Principal] = {}
    for i, who in enumerate(identify(conn, [u.credentials for u in units])):
        if isinstance(who, Exception):
            results[i] = who
        else:
            users[i] = who
    wanted = sorted({units[i].device_id for i in users})
    found = {r.id: r for r in conn.execute(_LOCK_DEVICES, {"ids": wanted})} if wanted else {}

    # Steps 2 and 3 per unit, in order: the device's seq moves in memory as its change-sets
    # are taken, so a copy of a change-set later in the group is a replay of the first.
    last = {device_id: int(row.last_applied_seq) for device_id, row in found.items()}
    taken: dict[tuple[str, int], _Apply] = {}
    plans: dict[int, _UnitPlan] = {}
    to_apply: list[_Apply] = []
    for i, user in users.items():
        unit = units[i]
        row = found.get(unit.device_id)
        try:
            if row is None:
                raise DeviceRefused(unregistered=True)
            principal = device_principal(user, row)
        except DeviceRefused as exc:
            results[i] = exc
            continue
        plan = plans[i] = _UnitPlan()
        for change_set in unit.change_sets:
            seq = last[unit.device_id]
            if change_set.seq <= seq:
                earlier = taken.get((unit.device_id, change_set.seq))
                plan.entries.append(
                    _ReplayOf(earlier)
                    if earlier is not None
                    else stored_outcome(conn, unit.device_id, change_set.seq)
                )
                continue
            if change_set.seq != seq + 1:
                plan.gap = SeqGap(expected=seq + 1)
                break
            ops = [to_domain_op(op, registry) for op in change_set.ops]
            entry = _Apply(unit.device_id, principal, change_set, ops)
            taken[(unit.device_id, change_set.seq)] = entry
            to_apply.append(entry)
            plan.entries.append(entry)
            last[unit.device_id] = change_set.seq
        plan.last_applied = last[unit.device_id]

    if to_apply:
        _write(conn, to_apply, registry, now, {e.device_id: last[e.device_id] for e in to_apply})

    for i, plan in plans.items():
        outcomes: list[m.Outcome] = []
        versions: dict[str, int] = {}
        for item in plan.entries:
            if isinstance(item, m.Outcome):
                outcome = item
            elif isinstance(item, _ReplayOf):
                assert item.entry.outcome is not None
                outcome = msgspec.structs.replace(item.entry.outcome, replayed=True)
            else:
                assert item.outcome is not None
                outcome = item.outcome
            outcomes.append(outcome)
            # As push() does: replays included (a notification more is harmless).
            for scope, version in outcome.versions.items():
                versions[scope] = max(versions.get(scope, 0), version)
        results[i] = PushResult(outcomes, plan.last_applied, plan.gap, versions)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _write(
    conn: Connection,
    group: Sequence[_Apply],
    registry: Registry,
    now: datetime,
    seqs: Mapping[str, int],
) -> None:
    """Steps 4 to 7 for every change-set of the group, in order; ``seqs``: each device's new
    last applied seq."""
    # Step 4: lock every row the group names, then every scope counter it writes (sorted).
    keys = list(dict.fromkeys(k for e in group for k in touched_keys(e.ops, registry)))
    changelog = ChangeLog(conn, now)
    rows = changelog.load_rows(keys, lock=True)
    known = {k: r.scope for k, r in rows.items() if r is not None}
    scopes: set[str] = set()
    for entry in group:
        scopes |= scopes_to_lock(entry.ops, entry.principal, registry, known)
    changelog.lock_scopes(scopes)
    holders = unique_index(conn, [(e.ops, e.principal) for e in group], rows, registry)

    records = RecordWriter(conn, registry, now)
    outcome_rows: list[dict[str, Any]] = []
    conflict_rows: list[dict[str, Any]] = []
    for entry in group:
        # Step 5, over the rows as the change-sets before this one left them.
        current = changelog.current(touched_keys(entry.ops, registry))
        asked = _holders_of(
            holders,
            unique_candidates(entry.ops, entry.principal, current, registry),
            exact=conn.dialect.name == "sqlite",
        )
        plan = plan_safely(
            entry.ops, entry.principal, current, registry, asked, entry.change_set, entry.device_id
        )
        # Step 6.
        conflict_ids: list[str] = []
        versions: dict[str, int] = {}
        if not plan.rejected:
            conflict_ids, found = write_plan(
                plan, changelog, records, entry.device_id, entry.principal, entry.change_set, now
            )
            conflict_rows.extend(found)
            _move_holders(holders, plan, current, registry)
            versions = changelog.seal()
        entry.outcome = outcome_for(entry.change_set, plan, versions, conflict_ids)
        outcome_rows.append(
            record_row(
                device_id=entry.device_id,
                principal=entry.principal,
                change_set=entry.change_set,
                record_id=entry.change_set.id.lower(),
                outcome=entry.outcome,
                now=now,
            )
        )
    # The writes left, in one round trip: nothing below reads.
    with bulk.held(conn):
        records.flush()
        changelog.finish()
        # Step 7: the outcomes (before the conflicts, which name their change-sets), and the
        # devices' new last applied seqs.
        bulk.write(conn, INSERT_RECORD, outcome_rows)
        if conflict_rows:
            bulk.write(conn, INSERT_CONFLICT, conflict_rows)
        update_rows(
            conn,
            devices,
            "id",
            [{"id": d, "last_applied_seq": seq} for d, seq in sorted(seqs.items())],
            {"last_seen_at": now},
        )


def _holders_of(
    holders: Mapping[Any, str],
    candidates: Sequence[tuple[str, str, tuple[str, ...], tuple[Any, ...]]],
    *,
    exact: bool,
) -> dict[Any, str]:
    """The holders the database would name if asked for ``candidates`` alone, as ``push``
    asks for each change-set: the group's index also holds values other change-sets asked
    about, which the database compares by its collation (case- and accent-insensitive on
    MariaDB, as ``unique_form`` does; exact on SQLite)."""
    if not candidates:
        return {}
    fold = _exact if exact else _folded
    wanted = {(entity, scope, group, fold(values)) for entity, scope, group, values in candidates}
    return {
        key: owner
        for key, owner in holders.items()
        if (key[0], key[1], key[2], fold(key[3])) in wanted
    }


def _exact(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return values


@lru_cache(maxsize=4096)
def _folded(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(unique_form(v) for v in values)


def _move_holders(
    holders: dict[Any, str],
    plan: Plan,
    before: Mapping[tuple[str, str], RowState | None],
    registry: Registry,
) -> None:
    """Keep the unique-value index true for the next change-set of the group: the values a
    write releases leave it, the values it takes join it (as ``unique_holders`` keys them)."""
    for write in plan.writes.values():
        spec = registry.entity(write.entity)
        if spec is None or not spec.unique:
            continue
        old = before.get((write.entity, write.id))
        for group in spec.unique:
            if old is not None and not old.deleted and all(n in old.data for n in group):
                key = (spec.name, write.scope, group, tuple(old.data[n] for n in group))
                if holders.get(key) == write.id:
                    del holders[key]
            if write.data is not None and all(n in write.data for n in group):
                holders[(spec.name, write.scope, group, tuple(write.data[n] for n in group))] = (
                    write.id
                )
