"""devices.pull_cursors, last_pulled_at and pulled_role: where each device last pulled from, as whom

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("pull_cursors", sa.LargeBinary(), nullable=True))
        batch.add_column(
            sa.Column(
                "last_pulled_at",
                sa.DateTime()
                .with_variant(mysql.DATETIME(fsp=6), "mariadb")
                .with_variant(mysql.DATETIME(fsp=6), "mysql"),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("pulled_role", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("pulled_role")
        batch.drop_column("last_pulled_at")
        batch.drop_column("pull_cursors")
