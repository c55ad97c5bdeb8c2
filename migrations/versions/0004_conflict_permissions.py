"""conflict permissions: managers and admins read and resolve flagged conflicts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Frozen here, as in 0002: later revisions add or move slugs in revisions of their own.
PERMISSIONS = {
    "conflicts.read": "List and read the sync conflicts of one's branches and the organisation",
    "conflicts.resolve": "Accept or dismiss the sync conflicts of one's branches and the organisation",
}
ROLE_PERMISSIONS = {
    "manager": ["conflicts.read", "conflicts.resolve"],
    "admin": ["conflicts.read", "conflicts.resolve"],
}


def upgrade() -> None:
    permissions = sa.table("permissions", sa.column("slug"), sa.column("description"))
    role_permissions = sa.table("role_permissions", sa.column("role"), sa.column("permission"))
    op.bulk_insert(
        permissions, [{"slug": slug, "description": text} for slug, text in PERMISSIONS.items()]
    )
    op.bulk_insert(
        role_permissions,
        [
            {"role": role, "permission": slug}
            for role, slugs in ROLE_PERMISSIONS.items()
            for slug in slugs
        ],
    )


def downgrade() -> None:
    role_permissions = sa.table("role_permissions", sa.column("role"), sa.column("permission"))
    permissions = sa.table("permissions", sa.column("slug"))
    # Grants first: on SQLite the foreign key's ON DELETE CASCADE is not enforced by default.
    op.execute(
        role_permissions.delete().where(role_permissions.c.permission.in_(list(PERMISSIONS)))
    )
    op.execute(permissions.delete().where(permissions.c.slug.in_(list(PERMISSIONS))))
