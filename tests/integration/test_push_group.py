"""Group commit: a group of pushes applies exactly what the same pushes applied one by one would.

Two identical databases (the second a row-for-row copy of the first); random pushes of several
devices on two branches (creates, renames, SKU moves and clashes, deletes, stale patches,
intents, invalid ops, replays, seq gaps, a reused change-set id, an unregistered device) go
through :func:`push_group` on one and one :func:`push` at a time on the other. Every answer,
every row of the log and the records, every counter and checksum, every stored outcome and
conflict must be the same. Against SQLite and MariaDB.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection, Engine, make_url

from domain.ops import Principal
from domain.roles import Role
from sync_protocol import messages as m
from sync_server import migrate
from sync_server.db import create_db_engine
from sync_server.push import PushResult, push
from sync_server.push_group import PushUnit, UnitResult, push_alone, push_group
from sync_server.resources import Resources
from sync_server.tables import (
    conflicts,
    devices,
    inventory_items,
    menu_items,
    metadata,
    sync_change_sets,
    sync_rows,
    sync_scopes,
)
from tests.conftest import clean_database
from tests.factories import Factory, User
from tests.syncing import REGISTRY, cheap_passwords, server_rows, to_change_sets

__all__ = ["cheap_passwords"]

_NAMESPACE = uuid.UUID("0b6f1d0e-8a0c-4c57-9a57-5c1b1f1e2d3c")


def uid(name: str) -> str:
    """A row id the same in both worlds and in every run."""
    return str(uuid.uuid5(_NAMESPACE, name))


DISH = uid("dish")
SKUS = ["S-1", "S-2", "S-3", "S-4", "s-1"]  # "s-1" and "S-1" are one value to MariaDB
NAMES = ["Flour", "Sugar", "Salt"]


@pytest.fixture
def twin(db: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A second migrated database of the same kind as ``db``."""
    if db.dialect.name == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('twin') / 'twin.db'}")
        migrate.upgrade(engine)
        yield engine
        engine.dispose()
        return
    url = db.url.set(database=f"{db.url.database}_twin")
    admin = create_db_engine(db.url.set(database=None).render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
        conn.execute(text(f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4"))
    engine = create_db_engine(make_url(url).render_as_string(hide_password=False))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
    admin.dispose()


def _copy(source: Engine, target: Engine) -> None:
    clean_database(target)
    with source.connect() as src, target.begin() as dst:
        for table in metadata.sorted_tables:
            if table.name in ("permissions", "role_permissions"):
                continue
            rows = [dict(r._mapping) for r in src.execute(select(table))]
            if rows:
                dst.execute(insert(table), rows)
        src.rollback()


@contextmanager
def _fallbacks() -> Iterator[list[str]]:
    """The messages of the groups that fell back to one push at a time meanwhile."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "one by one" in record.getMessage():
                seen.append(record.getMessage())

    handler = Catch(logging.INFO)
    logger = logging.getLogger("galley.push")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _identify(conn: Connection, users: Sequence[Any]) -> list[Principal | Exception]:
    return [
        user
        if isinstance(user, Exception)
        else Principal(user.id, Role(user.role), frozenset(user.branch_ids))
        for user in users
    ]


# --- what each world holds, without what differs by nature (times, conflict ids) -------------


def _state(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        state = {
            "rows": sorted(
                (r.entity, r.row_id, r.scope, r.version, bool(r.deleted), r.data, r.field_versions)
                for r in conn.execute(select(sync_rows))
            ),
            "scopes": sorted(tuple(r) for r in conn.execute(select(sync_scopes))),
            "inventory": sorted(
                (r.id, r.branch_id, r.sku, r.name, r.category, r.version)
                for r in conn.execute(select(inventory_items))
            ),
            "menu": sorted(
                (r.id, r.name, r.price_cents, r.available, r.version)
                for r in conn.execute(select(menu_items))
            ),
            "devices": sorted((r.id, r.last_applied_seq) for r in conn.execute(select(devices))),
            "change_sets": sorted(
                (r.device_id, r.seq, r.change_set_id, r.status, _outcome(r.outcome))
                for r in conn.execute(select(sync_change_sets))
            ),
            "conflicts": sorted(
                (r.scope, r.entity, r.row_id, r.kind, r.change_set_id, r.op_index, r.proposed)
                for r in conn.execute(select(conflicts))
            ),
        }
        conn.rollback()
    return state


def _outcome(blob: bytes) -> Any:
    outcome = msgspec.msgpack.decode(blob, type=m.Outcome)
    return (outcome.status, outcome.versions, len(outcome.conflicts), outcome.errors)


def _answer(result: UnitResult) -> Any:
    if isinstance(result, Exception):
        return type(result).__name__, str(result)
    assert isinstance(result, PushResult)
    return (
        [
            (o.seq, o.status, o.versions, len(o.conflicts), o.errors, o.replayed)
            for o in result.outcomes
        ],
        result.last_applied_seq,
        result.gap,
        result.versions,
    )


# --- random pushes ----------------------------------------------------------------------------

DEVICES = 4  # devices 0 and 1: two users of branch A; 2: a user of branch B; 3: unregistered


@st.composite
def _scenario(draw: st.DrawFn, versions: dict[str, int]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Units as (device index, change-sets as wire dicts). Row ids name the seeded items
    (``seed-<branch>-<n>``), items created earlier in the scenario, or new ones."""
    ids = itertools.count()
    next_seq = [1] * DEVICES
    sent: list[list[dict[str, Any]]] = [[] for _ in range(DEVICES)]
    known: list[list[str]] = [
        [uid(f"seed-{b}-{n}") for n in range(2)] for b in ("a", "a", "b", "a")
    ]
    used_ids: list[str] = []
    units = []
    for _ in range(draw(st.integers(2, 6))):
        device = draw(st.integers(0, DEVICES - 1))
        kind = draw(st.sampled_from(["next", "next", "next", "replay", "gap", "reuse_id"]))
        change_sets: list[dict[str, Any]] = []
        if kind == "replay" and sent[device]:
            change_sets.append(draw(st.sampled_from(sent[device])))
        elif kind == "gap":
            ops = [_op(draw, device, known, ids, versions)]
            change_sets.append({"id": str(uuid.uuid4()), "seq": next_seq[device] + 1, "ops": ops})
        else:
            for _ in range(draw(st.integers(1, 2))):
                ops = [
                    _op(draw, device, known, ids, versions) for _ in range(draw(st.integers(1, 3)))
                ]
                cs_id = (
                    draw(st.sampled_from(used_ids))
                    if kind == "reuse_id" and used_ids
                    else str(uuid.uuid4())
                )
                cs = {"id": cs_id, "seq": next_seq[device], "ops": ops}
                used_ids.append(cs_id)
                next_seq[device] += 1
                sent[device].append(cs)
                change_sets.append(cs)
        units.append((device, change_sets))
    return units


def _op(
    draw: st.DrawFn,
    device: int,
    known: list[list[str]],
    ids: Iterator[int],
    versions: dict[str, int],
) -> dict[str, Any]:
    mine = known[device]
    kinds = [*["create", "rename", "resku", "recategorise"] * 3, "delete", "intent", "bad"]
    kind = draw(st.sampled_from(kinds))
    if kind == "create" or not mine:
        row_id = str(uuid.uuid4())
        for k, owner in enumerate(known):
            if (k == device or (k < 2 and device < 2)) and row_id not in owner:
                owner.append(row_id)
        fields = {"sku": draw(st.sampled_from(SKUS)), "name": draw(st.sampled_from(NAMES))}
        fields |= {"category": "dry", "unit": "kg"}
        return {"op": "create", "entity": "inventory_items", "id": row_id, "fields": fields}
    target = draw(st.sampled_from(mine))
    # Mostly the version the device last saw (so most patches apply and the change-sets of a
    # group build on each other); sometimes an older one (a conflict or a refusal).
    seen = versions.get(target, 0)
    base = draw(st.sampled_from([seen, seen, seen, max(seen - 1, 0), seen + 1]))
    if kind == "rename":
        fields = {"name": draw(st.sampled_from(NAMES))}
        return {
            "op": "patch",
            "entity": "inventory_items",
            "id": target,
            "base_version": base,
            "fields": fields,
        }
    if kind == "resku":
        fields = {"sku": draw(st.sampled_from(SKUS))}
        return {
            "op": "patch",
            "entity": "inventory_items",
            "id": target,
            "base_version": base,
            "fields": fields,
        }
    if kind == "delete":
        return {"op": "delete", "entity": "inventory_items", "id": target, "base_version": base}
    if kind == "intent":
        return {"op": "intent", "name": "menu.mark_sold_out", "args": {"menu_item_id": DISH}}
    return {
        "op": "patch",
        "entity": "inventory_items",
        "id": target,
        "base_version": base,
        "fields": {"colour": "red"},
    }


@pytest.mark.usefixtures("cheap_passwords")
def test_a_group_applies_what_its_pushes_apply_one_by_one(
    db: Engine, twin: Engine, resources: Resources
) -> None:
    @settings(
        max_examples=25 if db.dialect.name == "sqlite" else 20,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        clean_database(db)
        factory = Factory(resources)
        branch_a, branch_b = factory.branch(), factory.branch()
        # Managers: they may delete, so fewer change-sets are rejected and more of them
        # interact (staff are refused the same way in both worlds anyway).
        users = [
            factory.user("manager", branches=[branch_a]),
            factory.user("manager", branches=[branch_a]),
            factory.user("manager", branches=[branch_b]),
            factory.user("manager", branches=[branch_a]),
        ]
        device_ids = [factory.device(u) for u in users[:3]] + [str(uuid.uuid4())]
        manager = factory.user("manager", branches=[branch_a])
        _seed(db, [(manager, factory.device(manager)), (users[2], factory.device(users[2]))])
        _copy(db, twin)

        versions = {row_id: state["version"] for (_, row_id), state in server_rows(db).items()}
        scenario = data.draw(_scenario(versions))
        units = [PushUnit(device_ids[d], to_change_sets(*sets), users[d]) for d, sets in scenario]
        with _fallbacks() as fell_back, db.connect() as conn:
            grouped = push_group(conn, units, registry=REGISTRY, identify=_identify)
        with twin.connect() as conn:
            alone = [push_alone(conn, u, registry=REGISTRY, identify=_identify) for u in units]

        assert [_answer(r) for r in grouped] == [_answer(r) for r in alone]
        assert _state(db) == _state(twin)
        # The group itself did the work (a fallback would pass the comparison by construction),
        # unless a reused change-set id made the database refuse it.
        ids = [cs["id"] for _, sets in scenario for cs in sets]
        reused = len(ids) != len(set(ids))
        assert not fell_back or reused, fell_back

    run()


def _seed(db: Engine, seeders: list[tuple[User, str]]) -> None:
    """Two items in each branch and a dish, created by ordinary pushes of devices that take
    no part in the scenario."""
    for (user, device), tag in zip(seeders, ("a", "b")[: len(seeders)], strict=True):
        ops: list[dict[str, Any]] = [
            {
                "op": "create",
                "entity": "inventory_items",
                "id": uid(f"seed-{tag}-{n}"),
                "fields": {"sku": f"S-{n + 1}", "name": "Flour", "category": "dry", "unit": "kg"},
            }
            for n in range(2)
        ]
        if tag == "a":
            fields = {"name": "Pie", "price_cents": 500}
            ops.append({"op": "create", "entity": "menu_items", "id": DISH, "fields": fields})
        result = push(
            db,
            device_id=device,
            principal=Principal(user.id, Role(user.role), frozenset(user.branch_ids)),
            change_sets=to_change_sets({"id": str(uuid.uuid4()), "seq": 1, "ops": ops}),
            registry=REGISTRY,
        )
        assert result.outcomes[0].status == "applied", result.outcomes[0].errors


# --- the interactions the property must cover, spelled out -------------------------------------


@pytest.fixture
def pair(db: Engine, twin: Engine, resources: Resources) -> dict[str, Any]:
    """Two managers' devices on one branch, whose seeded items S-1 and S-2 are in both worlds."""
    factory = Factory(resources)
    branch = factory.branch()
    users = [factory.user("manager", branches=[branch]) for _ in range(3)]
    devices_ = [factory.device(u) for u in users[:2]]
    _seed(db, [(users[2], factory.device(users[2]))])
    _copy(db, twin)
    versions = {row_id: state["version"] for (_, row_id), state in server_rows(db).items()}
    return {"users": users, "devices": devices_, "versions": versions}


def _both(db: Engine, twin: Engine, units: list[PushUnit]) -> list[UnitResult]:
    with db.connect() as conn:
        grouped = push_group(conn, units, registry=REGISTRY, identify=_identify)
    with twin.connect() as conn:
        alone = [push_alone(conn, u, registry=REGISTRY, identify=_identify) for u in units]
    assert [_answer(r) for r in grouped] == [_answer(r) for r in alone]
    assert _state(db) == _state(twin)
    return grouped


def _unit(pair: dict[str, Any], who: int, seq: int, *ops: dict[str, Any]) -> PushUnit:
    sets = to_change_sets({"id": str(uuid.uuid4()), "seq": seq, "ops": list(ops)})
    return PushUnit(pair["devices"][who], sets, pair["users"][who])


def _create(row: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"op": "create", "entity": "inventory_items", "id": uid(row), "fields": fields}


def _statuses(results: list[UnitResult]) -> list[str]:
    return [r.outcomes[0].status for r in results if isinstance(r, PushResult)]


def _item(db: Engine, row: str) -> Any:
    """The ``inventory_items`` record of seeded row ``row``."""
    with db.connect() as conn:
        return conn.execute(select(inventory_items).where(inventory_items.c.id == uid(row))).one()


def _patch(pair: dict[str, Any], row: str, **fields: Any) -> dict[str, Any]:
    row_id = uid(row)
    base = pair["versions"][row_id]
    return {
        "op": "patch",
        "entity": "inventory_items",
        "id": row_id,
        "base_version": base,
        "fields": fields,
    }


@pytest.mark.usefixtures("cheap_passwords")
def test_a_later_change_set_of_the_group_sees_a_rename_before_its_new_sku(
    db: Engine, twin: Engine, pair: dict[str, Any]
) -> None:
    results = _both(
        db,
        twin,
        [
            _unit(pair, 0, 1, _patch(pair, "seed-a-0", name="Rye")),
            _unit(pair, 1, 1, _patch(pair, "seed-a-0", sku="S-9")),
        ],
    )
    assert all(isinstance(r, PushResult) and r.outcomes[0].status == "applied" for r in results)
    row = _item(db, "seed-a-0")
    assert (row.name, row.sku) == ("Rye", "S-9")


@pytest.mark.usefixtures("cheap_passwords")
def test_renamed_then_recategorised_in_one_group_keeps_both(
    db: Engine, twin: Engine, pair: dict[str, Any]
) -> None:
    _both(
        db,
        twin,
        [
            _unit(pair, 0, 1, _patch(pair, "seed-a-1", name="Barley")),
            _unit(pair, 1, 1, _patch(pair, "seed-a-1", category="grain")),
        ],
    )
    row = _item(db, "seed-a-1")
    assert (row.name, row.category) == ("Barley", "grain")


@pytest.mark.usefixtures("cheap_passwords")
def test_a_sku_released_earlier_in_the_group_can_be_taken(
    db: Engine, twin: Engine, pair: dict[str, Any]
) -> None:
    fields = {"sku": "S-1", "name": "Spelt", "category": "dry", "unit": "kg"}
    results = _both(
        db,
        twin,
        [
            _unit(pair, 0, 1, _patch(pair, "seed-a-0", sku="S-7")),
            _unit(pair, 1, 1, _create("new", fields)),
        ],
    )
    assert _statuses(results) == ["applied", "applied"]


@pytest.mark.usefixtures("cheap_passwords")
def test_a_sku_taken_earlier_in_the_group_is_a_conflict(
    db: Engine, twin: Engine, pair: dict[str, Any]
) -> None:
    fields = {"sku": "S-8", "name": "Spelt", "category": "dry", "unit": "kg"}
    results = _both(
        db,
        twin,
        [
            _unit(pair, 0, 1, _create("one", fields)),
            _unit(pair, 1, 1, _create("two", fields)),
        ],
    )
    assert _statuses(results) == ["applied", "applied_with_conflicts"]


@pytest.mark.usefixtures("cheap_passwords")
def test_two_copies_of_a_change_set_in_one_group_apply_once(
    db: Engine, twin: Engine, pair: dict[str, Any]
) -> None:
    unit = _unit(pair, 0, 1, _patch(pair, "seed-a-1", name="Oats"))
    first, second = _both(db, twin, [unit, unit])
    assert isinstance(first, PushResult) and isinstance(second, PushResult)
    assert (first.outcomes[0].replayed, second.outcomes[0].replayed) == (False, True)
    assert first.outcomes[0].versions == second.outcomes[0].versions
