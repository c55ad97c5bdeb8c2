"""Deleting what the accounts layer no longer needs (run hourly by the job queue).

Expired refresh tokens can go: presenting one is refused as expired whether or not its row
exists, and reuse detection only matters while a token could still be valid. Expired or used
biometric challenges and idempotency records past their 24 hours go too. The audit log is never
purged here.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Connection, Engine

from .account_tables import (
    biometric_challenges,
    biometric_credentials,
    idempotency_keys,
    refresh_tokens,
)
from .crypto import FieldCipher
from .db import run_in_transaction
from .directory import utcnow
from .tables import users


def purge_expired(engine: Engine, now: datetime | None = None) -> dict[str, int]:
    """Delete expired sessions, challenges and idempotency records; the counts deleted."""
    cutoff = now or utcnow()

    def work(conn: Connection) -> dict[str, int]:
        tokens = conn.execute(delete(refresh_tokens).where(refresh_tokens.c.expires_at <= cutoff))
        challenges = conn.execute(
            delete(biometric_challenges).where(
                or_(
                    biometric_challenges.c.expires_at <= cutoff,
                    biometric_challenges.c.used_at.is_not(None),
                )
            )
        )
        # Idempotency records live 24 hours (Stripe's semantics): a retry after that is new.
        keys = conn.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= cutoff))
        return {
            "refresh_tokens": tokens.rowcount,
            "biometric_challenges": challenges.rowcount,
            "idempotency_keys": keys.rowcount,
        }

    return run_in_transaction(engine, work)


def reencrypt(engine: Engine, cipher: FieldCipher, *, batch: int = 500) -> int:
    """Re-encrypt every encrypted column under the newest key (after a key rotation, before the
    old key is removed from ``GALLEY_ENCRYPTION_KEYS``); the number of values rewritten."""
    total = 0
    for column in (users.c.phone_enc, biometric_credentials.c.public_key_enc):
        after = ""
        while rows := _page(engine, column, after, batch):
            after = rows[-1][0]
            total += run_in_transaction(
                engine, partial(_rewrite, cipher=cipher, column=column, rows=rows)
            )
    return total


def _page(engine: Engine, column: Any, after: str, batch: int) -> list[tuple[str, str]]:
    key = column.table.c.id
    with engine.connect() as conn:
        rows = conn.execute(
            select(key, column).where(key > after, column.is_not(None)).order_by(key).limit(batch)
        ).all()
        conn.rollback()
    return [(row[0], row[1]) for row in rows]


def _rewrite(
    conn: Connection, cipher: FieldCipher, column: Any, rows: list[tuple[str, str]]
) -> int:
    key = column.table.c.id
    for row_id, value in rows:
        conn.execute(
            update(column.table)
            # Only if unchanged since read: a concurrent edit already used the newest key.
            .where(key == row_id, column == value)
            .values({column.name: cipher.rotate(value)})
        )
    return len(rows)
