"""The schema is built by the migrations, which round-trip and agree with the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from sync_server import migrate
from sync_server.db import create_db_engine
from sync_server.tables import metadata


def _round_trip(engine: Engine) -> None:
    migrate.upgrade(engine)
    migrate.check(engine)
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(engine)
    migrate.check(engine)
    assert set(metadata.tables) <= set(inspect(engine).get_table_names())


def test_migrations_round_trip_on_sqlite(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        _round_trip(engine)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_migrations_round_trip_on_mariadb(mysql_url: str) -> None:
    engine = create_db_engine(mysql_url)
    try:
        # A scratch database of its own: the shared worker database stays at head.
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        name = f"{make_url(mysql_url).database}_mig"
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        scratch = create_db_engine(
            make_url(mysql_url).set(database=name).render_as_string(hide_password=False)
        )
        try:
            _round_trip(scratch)
        finally:
            scratch.dispose()
            with engine.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        engine.dispose()
