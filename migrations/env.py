"""Alembic environment: runs against a connection handed in by Galley, or the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sync_server import account_tables  # noqa: F401  (registers its tables on metadata)
from sync_server.db import create_db_engine
from sync_server.settings import load_settings
from sync_server.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: batch mode rebuilds tables where needed.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or load_settings().database_url
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():  # pragma: no cover - offline SQL generation is not used
    raise SystemExit("offline migrations are not supported; run `galley migrate`")
run_migrations_online()
