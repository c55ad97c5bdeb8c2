"""Task bodies. They take ids and settings, never ORM objects, and are safe to run twice."""

from __future__ import annotations

import logging

from sync_server.compaction import compact_tombstones as _compact
from sync_server.db import create_db_engine
from sync_server.housekeeping import purge_expired
from sync_server.settings import Settings

log = logging.getLogger("galley.jobs")


def compact_tombstones(settings: Settings) -> int:
    """Daily: purge tombstones past the retention period (idempotent)."""
    engine = create_db_engine(settings.database_url)
    try:
        purged = _compact(engine, retention_days=settings.tombstone_retention_days)
    finally:
        engine.dispose()
    log.info("compacted %d tombstones", purged)
    return purged


def purge_expired_sessions(settings: Settings) -> dict[str, int]:
    """Hourly: delete expired refresh tokens, biometric challenges and idempotency records
    (idempotent; the audit log is never purged)."""
    engine = create_db_engine(settings.database_url)
    try:
        counts = purge_expired(engine)
    finally:
        engine.dispose()
    log.info("purged expired account records: %s", counts)
    return counts
