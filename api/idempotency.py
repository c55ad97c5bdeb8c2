"""Idempotency keys with Stripe's semantics, stored in the database.

A client retrying a create after a timeout sends the same ``Idempotency-Key``; it must get the
first answer back instead of a second object. Per (scope, key) — the scope is the signed-in user,
so keys of different users never collide:

* the first request claims the key ("processing", committed at once) and runs; its response is
  stored **in the same transaction as its effects**, so a crash can never leave effects without
  the stored answer (a retry would duplicate them) or an answer without effects;
* a later request with the same key and the same body gets the stored response (``Idempotent-
  Replayed: true``) for 24 hours; with a different body, a 422;
* a request arriving while the first still runs gets a 409; a claim left behind by a crashed
  process is taken over after :data:`STALE_CLAIM`.

Any operation declared ``idempotent=True`` in :mod:`api.contract` gets this behaviour.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from sync_server.account_tables import idempotency_keys
from sync_server.db import run_in_transaction
from sync_server.errors import ApiError

RETENTION = timedelta(hours=24)
STALE_CLAIM = timedelta(minutes=5)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Replay:
    status: int
    body: bytes


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ApiError(
            422,
            "validation_error",
            "The Idempotency-Key header is not valid.",
            {"Idempotency-Key": [f"1 to {MAX_KEY_LENGTH} printable characters"]},
        )


def request_hash(method: str, path: str, body: Any) -> str:
    """A fingerprint of the request: same method, path and (canonical) JSON body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def begin(engine: Engine, scope: str, key: str, fingerprint: str, now: datetime) -> Replay | None:
    """Claim ``key`` for a new request, or return the stored response to replay.

    Raises a 422 when the key was used with a different request, a 409 while it is in flight.
    """

    def claim(conn: Connection) -> Replay | None:
        row = conn.execute(
            select(idempotency_keys)
            .where(idempotency_keys.c.scope == scope, idempotency_keys.c.idem_key == key)
            .with_for_update()
        ).first()
        fresh = {
            "request_hash": fingerprint,
            "state": "processing",
            "response_status": None,
            "response_body": None,
            "created_at": now,
            "locked_at": now,
            "expires_at": now + RETENTION,
        }
        if row is None:
            conn.execute(insert(idempotency_keys).values(scope=scope, idem_key=key, **fresh))
            return None
        where = (idempotency_keys.c.scope == scope, idempotency_keys.c.idem_key == key)
        if row.expires_at <= now:
            conn.execute(update(idempotency_keys).where(*where).values(**fresh))
            return None
        if row.request_hash != fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request.",
                {"Idempotency-Key": ["already used with different parameters"]},
            )
        if row.state == "done":
            return Replay(int(row.response_status), bytes(row.response_body or b""))
        if row.locked_at > now - STALE_CLAIM:
            raise ApiError(
                409,
                "idempotency_in_progress",
                "A request with this Idempotency-Key is still being processed; retry later.",
                headers={"Retry-After": "1"},
            )
        conn.execute(update(idempotency_keys).where(*where).values(locked_at=now))
        return None

    try:
        return run_in_transaction(engine, claim)
    except IntegrityError:
        # Another request inserted the same key between our read and our insert.
        raise ApiError(
            409,
            "idempotency_in_progress",
            "A request with this Idempotency-Key is still being processed; retry later.",
            headers={"Retry-After": "1"},
        ) from None


def complete(conn: Connection, scope: str, key: str, status: int, body: bytes) -> None:
    """Store the response, inside the transaction that carries the request's effects."""
    conn.execute(
        update(idempotency_keys)
        .where(idempotency_keys.c.scope == scope, idempotency_keys.c.idem_key == key)
        .values(state="done", response_status=status, response_body=body)
    )


def complete_alone(engine: Engine, scope: str, key: str, status: int, body: bytes) -> None:
    """Store a refusal (the request had no effects) in a transaction of its own."""
    run_in_transaction(engine, lambda conn: complete(conn, scope, key, status, body))


def abandon(engine: Engine, scope: str, key: str) -> None:
    """Release the claim of a request that failed unexpectedly, so a retry may run."""
    run_in_transaction(
        engine,
        lambda conn: conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.scope == scope,
                idempotency_keys.c.idem_key == key,
                idempotency_keys.c.state == "processing",
            )
        ),
    )
