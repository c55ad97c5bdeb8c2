"""Deleting what the accounts layer no longer needs (for a periodic job to call).

Expired refresh tokens can go: presenting one is refused as expired whether or not its row
exists, and reuse detection only matters while a token could still be valid. Expired or used
biometric challenges and idempotency records past their 24 hours go too. The audit log is never
purged here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, or_
from sqlalchemy.engine import Connection, Engine

from sync_server.account_tables import biometric_challenges, refresh_tokens
from sync_server.db import run_in_transaction
from sync_server.directory import utcnow

from . import idempotency


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
        return {"refresh_tokens": tokens.rowcount, "biometric_challenges": challenges.rowcount}

    counts = run_in_transaction(engine, work)
    counts["idempotency_keys"] = idempotency.purge_expired(engine, cutoff)
    return counts
