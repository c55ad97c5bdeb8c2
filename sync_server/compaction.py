"""Purging old tombstones, and moving each scope's compaction horizon past them.

A device whose cursor is below a scope's horizon may have missed a delete whose tombstone is
gone, so pull answers it with ``reset_required`` (docs/protocol.md § Pull, step 2).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection, Engine

from .db import run_in_transaction
from .directory import utcnow
from .tables import sync_rows, sync_scopes


def compact_tombstones(engine: Engine, *, retention_days: int) -> int:
    """Delete tombstones older than ``retention_days``; returns how many went."""
    cutoff = utcnow() - timedelta(days=retention_days)
    with engine.connect() as conn:
        scopes = list(conn.execute(select(sync_scopes.c.scope)).scalars())
        conn.rollback()
    total = 0
    for scope in scopes:

        def work(conn: Connection, scope: str = scope) -> int:
            # Under the scope lock so that a pull's snapshot sees the horizon and the purge
            # together, never one without the other.
            horizon = conn.execute(
                select(sync_scopes.c.horizon).where(sync_scopes.c.scope == scope).with_for_update()
            ).scalar_one()
            newest = conn.execute(
                select(func.max(sync_rows.c.version)).where(
                    sync_rows.c.scope == scope,
                    sync_rows.c.deleted.is_(True),
                    sync_rows.c.changed_at < cutoff,
                )
            ).scalar()
            if newest is None:
                return 0
            purged = conn.execute(
                delete(sync_rows).where(
                    sync_rows.c.scope == scope,
                    sync_rows.c.deleted.is_(True),
                    sync_rows.c.version <= newest,
                )
            ).rowcount
            conn.execute(
                update(sync_scopes)
                .where(sync_scopes.c.scope == scope)
                .values(horizon=max(horizon, newest))
            )
            return int(purged or 0)

        total += run_in_transaction(engine, work)
    return total
