"""Alembic migrations: the only way Galley's databases get their schema."""
