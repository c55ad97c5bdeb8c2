"""Tables of the accounts and security layer (/api/v1): sessions, permissions, biometric keys,
the audit log and idempotency records. Defined on the shared ``metadata`` of ``tables.py`` so the
migrations, ``alembic check`` and the test fixtures see one schema.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from .tables import ID, Blob, Timestamp, metadata

# One row per refresh token ever issued. Tokens are opaque random strings; only their SHA-256 is
# stored. A login starts a family; every refresh marks the presented row rotated and adds the next
# row to the same family, so presenting a rotated token again is detectable reuse (theft) and
# revokes the whole family. ``access_jti`` is the jti of the access token issued alongside the row:
# it ties an access token to its session (logout and family revocation refuse it at once) and
# tells how the session was authenticated (``method``).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", ID, primary_key=True),
    Column("family_id", ID, nullable=False, index=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("access_jti", String(64), nullable=False, index=True),
    Column("method", String(16), nullable=False),
    Column("device_id", String(36), nullable=True),
    Column("issued_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("rotated_at", Timestamp, nullable=True),
    Column("revoked_at", Timestamp, nullable=True),
    Column("revoked_reason", String(32), nullable=True),
)

permissions = Table(
    "permissions",
    metadata,
    Column("slug", String(64), primary_key=True),
    Column("description", String(200), nullable=False),
)

role_permissions = Table(
    "role_permissions",
    metadata,
    Column("role", String(16), nullable=False),
    Column(
        "permission",
        String(64),
        ForeignKey("permissions.slug", ondelete="CASCADE"),
        nullable=False,
    ),
    PrimaryKeyConstraint("role", "permission"),
)

# A device-bound public key enrolled for biometric login. The key itself is public, but it and
# its metadata identify a person's phone, so they are stored encrypted (``crypto.FieldCipher``).
biometric_credentials = Table(
    "biometric_credentials",
    metadata,
    Column("id", ID, primary_key=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("device_id", String(36), nullable=False, index=True),
    Column("algorithm", String(16), nullable=False),
    Column("public_key_enc", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("last_used_at", Timestamp, nullable=True),
    Column("revoked_at", Timestamp, nullable=True),
)

# Single-use challenges for biometric proof of possession (registration and login).
biometric_challenges = Table(
    "biometric_challenges",
    metadata,
    Column("id", ID, primary_key=True),
    Column("device_id", String(36), nullable=False, index=True),
    Column("challenge", String(64), nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("used_at", Timestamp, nullable=True),
)

# Append-only: the application inserts and reads, never updates or deletes.
audit_log = Table(
    "audit_log",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("occurred_at", Timestamp, nullable=False),
    Column("event", String(48), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("actor_user_id", ID, nullable=True),
    Column("subject_user_id", ID, nullable=True),
    Column("ip", String(64), nullable=True),
    Column("details", Text, nullable=False),  # JSON, never secrets
    Index("ix_audit_log_event_occurred_at", "event", "occurred_at"),
    Index("ix_audit_log_subject_user_id", "subject_user_id"),
)

# Idempotency-Key records (Stripe semantics): the first response for (scope, key) is stored and
# replayed for 24 h. ``state`` is "processing" while the first request runs (a concurrent duplicate
# gets 409) and "done" once its response is stored, in the same transaction as its effects.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(64), nullable=False),
    Column("idem_key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("response_status", Integer, nullable=True),
    Column("response_body", Blob, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("locked_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False, index=True),
    PrimaryKeyConstraint("scope", "idem_key"),
)
