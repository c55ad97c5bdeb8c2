"""Purging old tombstones, and moving each scope's compaction horizon past them.

A device whose cursor is below a scope's horizon may have missed a delete whose tombstone is
gone, so pull answers it with ``reset_required`` (docs/protocol.md § Pull, step 2).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.engine import Connection, Engine

from .changelog import ChangeLog
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
            # The engine's lock order is rows, then the scope's counter (sync_server.changelog):
            # the old tombstones are found without locking, locked by key, deleted, and only
            # then the counter is taken. (A range DELETE under the counter would wait on rows
            # a push holds while that push waits for the counter: a deadlock.)
            keys = sorted(  # primary-key order: the order every writer locks rows in
                (r.entity, r.row_id)
                for r in conn.execute(
                    select(sync_rows.c.entity, sync_rows.c.row_id).where(
                        sync_rows.c.scope == scope,
                        sync_rows.c.deleted.is_(True),
                        sync_rows.c.changed_at < cutoff,
                    )
                )
            )
            if not keys:
                return 0
            locked = ChangeLog(conn, utcnow()).load_rows(keys, lock=True)
            # Still old tombstones now that they are locked (a row is never revived in place
            # by anyone but a writer holding it, and "changed_at" only moves forward).
            purge = [
                key
                for key, row in locked.items()
                if row is not None and row.deleted and row.scope == scope
            ]
            if not purge:
                return 0
            newest = max(locked[key].version for key in purge)  # type: ignore[union-attr]
            purged = 0
            for start in range(0, len(purge), 500):
                chunk = purge[start : start + 500]
                purged += conn.execute(
                    delete(sync_rows).where(
                        tuple_(sync_rows.c.entity, sync_rows.c.row_id).in_(chunk),
                        sync_rows.c.deleted.is_(True),
                    )
                ).rowcount
            # The counter last, held only for this: the purge and the new horizon commit
            # together, so a pull's snapshot sees both or neither.
            horizon = conn.execute(
                select(sync_scopes.c.horizon).where(sync_scopes.c.scope == scope).with_for_update()
            ).scalar_one()
            conn.execute(
                update(sync_scopes)
                .where(sync_scopes.c.scope == scope)
                .values(horizon=max(horizon, newest))
            )
            return int(purged or 0)

        total += run_in_transaction(engine, work)
    return total
