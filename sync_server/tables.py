"""Table definitions (SQLAlchemy Core): the schema of the system of record.

These tables are mapped to nothing: the domain works on plain data and the repositories translate.
Migrations under ``migrations/`` build every real database; a test checks that they agree with this
module (``alembic check``).

Identifiers are UUIDs as 36-character strings: clients generate them offline.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

# Deterministic constraint names keep migrations reviewable and identical on SQLite and MySQL.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = String(36)
# Microsecond timestamps everywhere (MySQL's DATETIME defaults to whole seconds). Stored in UTC.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# MEDIUMBLOB on MySQL (16 MB): a row payload is far smaller, but BLOB's 64 KB is too tight for
# a change-set's stored ops.
Blob = LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")

branches = Table(
    "branches",
    metadata,
    Column("id", ID, primary_key=True),
    Column("code", String(32), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", ID, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("username", String(64), nullable=True, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("display_name", String(200), nullable=False),
    # Personal contact data, encrypted at rest (Fernet token, see sync_server.crypto).
    Column("phone_enc", Text, nullable=True),
    Column("is_active", Boolean, nullable=False, default=True),
    Column("biometric_enabled", Boolean, nullable=False, default=False),
    Column("last_password_login_at", Timestamp, nullable=True),
    Column("password_changed_at", Timestamp, nullable=True),
    # Bumped to invalidate every outstanding access token of the user at once (deactivation,
    # role change): tokens carry the value they were minted with.
    Column("token_epoch", Integer, nullable=False, default=0),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

user_branches = Table(
    "user_branches",
    metadata,
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("branch_id", ID, ForeignKey("branches.id", ondelete="CASCADE"), nullable=False),
    PrimaryKeyConstraint("user_id", "branch_id"),
    Index("ix_user_branches_branch_id", "branch_id"),
)

devices = Table(
    "devices",
    metadata,
    Column("id", ID, primary_key=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("branch_id", ID, ForeignKey("branches.id"), nullable=True),
    Column("platform", String(32), nullable=False),
    Column("app_version", String(32), nullable=False),
    # Highest change-set sequence number applied for this device (0 = none yet).
    Column("last_applied_seq", BigInteger, nullable=False, default=0),
    Column("registered_at", Timestamp, nullable=False),
    Column("last_seen_at", Timestamp, nullable=True),
    Column("revoked_at", Timestamp, nullable=True),
    # MessagePack map scope -> [compaction horizon in the snapshot of the device's last successful
    # pull, lowest cursor pulled from under it] (NULL: never pulled). A cursor below the horizon
    # needs a reset only if the horizon moved since (see sync_server.pull): a device paging from 0
    # after a compaction never held the purged rows.
    Column("seen_horizons", LargeBinary, nullable=True),
    # MessagePack map scope -> version: the cursors of the device's latest pull that moved them
    # (what it has read, staged or committed), and when; for operators and support ("where is
    # this phone?"). Idle pulls, which move nothing, write nothing.
    Column("pull_cursors", LargeBinary, nullable=True),
    Column("last_pulled_at", Timestamp, nullable=True),
    # The role the rows of the device's replica were filtered for: a pull under another role
    # must rebuild the replica (reset_required), or a demoted manager would keep staff contacts.
    Column("pulled_role", String(16), nullable=True),
)

# One row per sync scope ("org" or "branch:<id>"): the version counter that orders every committed
# write in the scope. Writers lock this row (SELECT … FOR UPDATE) to allocate the next version and
# hold the lock until commit, so version order equals commit order and a pull cannot skip a write
# that commits late. ``horizon`` is the highest version whose tombstones may have been compacted
# away; ``row_count``/``checksum`` describe the live rows for replica verification.
sync_scopes = Table(
    "sync_scopes",
    metadata,
    Column("scope", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False, default=0),
    Column("horizon", BigInteger, nullable=False, default=0),
    Column("row_count", BigInteger, nullable=False, default=0),
    Column("checksum", BigInteger, nullable=False, default=0),
)

# The replication state: the latest synced image of every row (or its tombstone), keyed by entity
# and id, ordered within its scope by version. Pull is one range scan of (scope, version).
sync_rows = Table(
    "sync_rows",
    metadata,
    Column("entity", String(48), nullable=False),
    Column("row_id", ID, nullable=False),
    Column("scope", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    # MessagePack map of the syncable fields (empty for a tombstone).
    Column("data", Blob, nullable=False),
    # MessagePack map field -> version of the last write of that field (field-level merge).
    Column("field_versions", Blob, nullable=False),
    Column("changed_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("entity", "row_id"),
    Index("ix_sync_rows_scope_version", "scope", "version"),
)

# Every change-set a device pushed, with the outcome returned for it: replays answer from here.
sync_change_sets = Table(
    "sync_change_sets",
    metadata,
    Column("device_id", ID, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("change_set_id", ID, nullable=False, unique=True),
    Column("user_id", ID, nullable=False),
    Column("status", String(32), nullable=False),
    Column("outcome", Blob, nullable=False),
    Column("ops", Blob, nullable=False),
    Column("client_created_at", String(64), nullable=True),
    Column("received_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("device_id", "seq"),
    Index("ix_sync_change_sets_status", "status"),
)

conflicts = Table(
    "conflicts",
    metadata,
    Column("id", ID, primary_key=True),
    Column("scope", String(64), nullable=False),
    Column("entity", String(48), nullable=False),
    Column("row_id", ID, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("device_id", ID, nullable=True),
    Column("user_id", ID, nullable=True),
    Column("change_set_id", ID, nullable=True),
    Column("op_index", Integer, nullable=True),
    Column("base_version", BigInteger, nullable=True),
    Column("server_version", BigInteger, nullable=True),
    Column("proposed", Text, nullable=False),  # JSON
    Column("server_state", Text, nullable=False),  # JSON
    Column("status", String(16), nullable=False, default="open"),
    Column("resolution", String(32), nullable=True),
    Column("resolved_by", ID, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("resolved_at", Timestamp, nullable=True),
    Index("ix_conflicts_scope_status", "scope", "status"),
)

inventory_items = Table(
    "inventory_items",
    metadata,
    Column("id", ID, primary_key=True),
    Column("branch_id", ID, ForeignKey("branches.id"), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("category", String(100), nullable=False),
    Column("unit", String(16), nullable=False),
    Column("cost_cents", Integer, nullable=False),
    Column("supplier", String(200), nullable=True),
    Column("version", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("branch_id", "sku"),
)

menu_items = Table(
    "menu_items",
    metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("price_cents", Integer, nullable=False),
    Column("available", Boolean, nullable=False),
    # The inventory SKU this dish draws on, in whichever branch sells it.
    Column("linked_sku", String(64), nullable=True),
    Column("version", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)
