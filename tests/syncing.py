"""Helpers for sync protocol tests: building ops and change-sets, talking to /sync/v1, and
reading back what the server holds (to prove that nothing was applied, or what was)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from domain.catalog import default_registry
from domain.ops import Principal
from domain.roles import Role
from sync_protocol import messages as m
from sync_server.tables import conflicts, devices, sync_change_sets, sync_rows, sync_scopes
from tests.factories import User

PROTOCOL = m.PROTOCOL_VERSION
REGISTRY = default_registry()
MSGPACK = "application/msgpack"
JSON = "application/json"


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Users of sync tests never sign in with a password: skip argon2's deliberate 100 ms per
    user so the suites stay fast (password hashing has its own tests)."""
    monkeypatch.setattr("sync_server.directory.hash_password", lambda password: "unused")


# --- ops and change-sets (wire shape, as plain dicts) ------------------------------------------


def create(entity: str, row_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"op": "create", "entity": entity, "id": row_id or new_id(), "fields": fields}


def patch(entity: str, row_id: str, base_version: int, **fields: Any) -> dict[str, Any]:
    return {
        "op": "patch",
        "entity": entity,
        "id": row_id,
        "base_version": base_version,
        "fields": fields,
    }


def delete(entity: str, row_id: str, base_version: int) -> dict[str, Any]:
    return {"op": "delete", "entity": entity, "id": row_id, "base_version": base_version}


def intent(name: str, **args: Any) -> dict[str, Any]:
    return {"op": "intent", "name": name, "args": args}


def change_set(seq: int, *ops: dict[str, Any], cs_id: str | None = None) -> dict[str, Any]:
    return {"id": cs_id or new_id(), "seq": seq, "ops": list(ops)}


def item(sku: str | None = None, **fields: Any) -> dict[str, Any]:
    """Fields of a valid inventory item (the branch comes from the device)."""
    values: dict[str, Any] = {
        "sku": sku or f"SKU-{uuid.uuid4().hex[:8]}",
        "name": "Flour",
        "category": "dry goods",
        "unit": "kg",
    }
    values.update(fields)
    return values


def dish(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"name": "Margherita", "price_cents": 1200}
    values.update(fields)
    return values


def to_change_sets(*sets: dict[str, Any]) -> list[m.ChangeSet]:
    """Wire dicts to typed change-sets (for calling the engine directly)."""
    return msgspec.convert(list(sets), list[m.ChangeSet])


def principal(user: User, device_branch: str | None = None) -> Principal:
    branch = device_branch or (user.branch_ids[0] if user.branch_ids else None)
    return Principal(user.id, Role(user.role), frozenset(user.branch_ids), branch)


# --- HTTP ---------------------------------------------------------------------------------------


def encode(body: Any, media_type: str = JSON) -> bytes:
    return msgspec.msgpack.encode(body) if media_type == MSGPACK else msgspec.json.encode(body)


def decode(content: bytes, media_type: str = JSON) -> Any:
    return (
        msgspec.msgpack.decode(content) if media_type == MSGPACK else msgspec.json.decode(content)
    )


def post(
    client: Any,
    path: str,
    body: Any,
    headers: dict[str, str],
    media_type: str = JSON,
) -> tuple[int, Any]:
    """POST ``body`` to /sync/v1/``path``; returns (status, decoded body)."""
    response = client.post(
        f"/sync/v1/{path}",
        content=encode(body, media_type),
        headers={**headers, "Content-Type": media_type, "Accept": media_type},
    )
    return response.status_code, decode(response.content, media_type)


def push_body(device_id: str, *sets: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "device_id": device_id, "change_sets": list(sets)}


def pull_body(
    device_id: str, cursors: dict[str, int] | None = None, **extra: Any
) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "device_id": device_id, "cursors": cursors or {}, **extra}


# --- what the server holds -----------------------------------------------------------------------


def last_applied_seq(engine: Engine, device_id: str) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            select(devices.c.last_applied_seq).where(devices.c.id == device_id)
        ).scalar_one()
        conn.rollback()
    return int(value)


def server_rows(engine: Engine, scope: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(entity, id) -> {version, deleted, data, scope} of every row of the replication log."""
    query = select(sync_rows)
    if scope is not None:
        query = query.where(sync_rows.c.scope == scope)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        conn.rollback()
    return {
        (r.entity, r.row_id): {
            "scope": r.scope,
            "version": r.version,
            "deleted": bool(r.deleted),
            "data": msgspec.msgpack.decode(r.data),
        }
        for r in rows
    }


def version_of(engine: Engine, entity: str, row_id: str) -> int:
    """The current version of a row (what a device that just pulled would send as base)."""
    with engine.connect() as conn:
        value = conn.execute(
            select(sync_rows.c.version).where(
                sync_rows.c.entity == entity, sync_rows.c.row_id == row_id
            )
        ).scalar_one()
        conn.rollback()
    return int(value)


def scope_heads(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(select(sync_scopes)).all()
        conn.rollback()
    return {r.scope: r for r in rows}


def conflict_rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(select(conflicts)).all()
        conn.rollback()
    return {r.id: r for r in rows}


def change_set_records(engine: Engine, device_id: str) -> list[Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(sync_change_sets)
            .where(sync_change_sets.c.device_id == device_id)
            .order_by(sync_change_sets.c.seq)
        ).all()
        conn.rollback()
    return list(rows)


def snapshot(engine: Engine) -> tuple[Any, ...]:
    """Everything a push could change, to compare before and after a refused request."""
    heads = {s: (h.version, h.row_count, h.checksum) for s, h in scope_heads(engine).items()}
    with engine.connect() as conn:
        seqs = dict(conn.execute(select(devices.c.id, devices.c.last_applied_seq)).all())
        n_sets = len(conn.execute(select(sync_change_sets.c.seq)).all())
        conn.rollback()
    return (server_rows(engine), heads, seqs, n_sets, len(conflict_rows(engine)))
