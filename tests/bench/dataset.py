"""The benchmark's database: created from scratch, migrated, and seeded with a large replica.

The 100,000 inventory rows are inserted with raw pymysql (a bulk load through the push endpoint
would take longer than the whole benchmark), but exactly as :class:`sync_server.changelog.ChangeLog`
would have written them had devices created them in change-sets of ``rows_per_version`` creates:
one version per change-set, the MessagePack row image and field versions in ``sync_rows``, the
same row in ``inventory_items``, and the scope's counter, live-row count and checksum advanced to
match. The initial sync then verifies the replica against those figures.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec
import pymysql  # type: ignore[import-untyped]
from sqlalchemy import select
from sqlalchemy.engine import URL, Engine, make_url

from domain.catalog import INVENTORY_UNITS
from domain.registry import branch_scope
from sync_protocol.checksums import MOD, row_checksum
from sync_server import migrate
from sync_server.db import create_db_engine, run_in_transaction
from sync_server.directory import create_branch, create_user, register_device
from sync_server.resources import Resources, build_resources
from sync_server.settings import Settings
from sync_server.tables import users

SECRET = "galley-bench-secret-key-not-for-production-use-0123456789"
ENTITY = "inventory_items"


def connect(url: URL, *, database: bool = True, autocommit: bool = True) -> pymysql.Connection:
    """A raw pymysql connection to the server behind ``url``."""
    return pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=url.database if database else None,
        charset="utf8mb4",
        autocommit=autocommit,
    )


def recreate_database(database_url: str) -> Engine:
    """Drop and create the benchmark database, migrate it, and return an engine on it."""
    url = make_url(database_url)
    if not url.database or not url.database.replace("_", "").isalnum():
        raise SystemExit(f"BENCH_MYSQL_URL must name a plain database, got {url.database!r}")
    conn = connect(url, database=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
            cur.execute(f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    engine = create_db_engine(database_url, pool_size=20)
    migrate.upgrade(engine)
    return engine


def bench_settings(database_url: str, redis_url: str | None) -> Settings:
    return Settings(env="test", database_url=database_url, redis_url=redis_url, secret_key=SECRET)


@dataclass(frozen=True)
class Member:
    """A user with devices, and a way to mint their access tokens."""

    user_id: str
    role: str
    branch_id: str
    device_ids: tuple[str, ...]


def make_member(res: Resources, branch_id: str, code: str, role: str, devices: int) -> Member:
    email = f"{code.lower()}-{role}@bench.test"

    def work(conn: Any) -> str:
        return create_user(
            conn,
            email=email,
            password="bench-password-123",
            role=role,
            branch_codes=[code],
            display_name=f"{role} of {code}",
            cipher=res.cipher,
        )

    user_id = run_in_transaction(res.engine, work)
    device_ids = tuple(str(uuid.uuid4()) for _ in range(devices))
    for device_id in device_ids:
        run_in_transaction(
            res.engine,
            partial(
                register_device,
                device_id=device_id,
                user_id=user_id,
                branch_id=branch_id,
                platform="bench",
                app_version="1.0.0",
            ),
        )
    return Member(user_id, role, branch_id, device_ids)


def token_for(res: Resources, member: Member) -> str:
    with res.engine.connect() as conn:
        epoch = conn.execute(
            select(users.c.token_epoch).where(users.c.id == member.user_id)
        ).scalar_one()
        conn.rollback()
    return res.tokens.mint(
        user_id=member.user_id, role=member.role, branch_ids=[member.branch_id], epoch=epoch
    )


@dataclass
class World:
    engine: Engine
    resources: Resources
    big_branch: str
    reader: Member
    #: layout name -> the staff members (one per branch) whose devices push in that layout.
    pushers: dict[str, list[Member]]
    #: A staff member with one device, in a branch of its own, for the statement counts.
    inspector: Member


def build_world(
    database_url: str, redis_url: str | None, layouts: dict[str, tuple[int, int]]
) -> World:
    """Branches, the initial-sync reader (a manager of the big branch) and, per push layout
    ``name -> (branches, devices per branch)``, staff members with registered devices."""
    engine = recreate_database(database_url)
    res = build_resources(bench_settings(database_url, redis_url), engine=engine)
    big = run_in_transaction(engine, lambda conn: create_branch(conn, "BIG", "Big Branch"))
    reader = make_member(res, big.id, "BIG", "manager", 1)
    pushers: dict[str, list[Member]] = {}
    for name, (branch_count, devices_per_branch) in layouts.items():
        members = []
        for i in range(branch_count):
            code = f"{name}-{i + 1}".upper()
            branch = run_in_transaction(
                engine, partial(create_branch, code=code, name=f"Push branch {code}")
            )
            members.append(make_member(res, branch.id, code, "staff", devices_per_branch))
        pushers[name] = members
    lone = run_in_transaction(engine, lambda conn: create_branch(conn, "LONE", "Lone branch"))
    inspector = make_member(res, lone.id, "LONE", "staff", 1)
    return World(engine, res, big.id, reader, pushers, inspector)


def item_image(branch_id: str, n: int) -> dict[str, Any]:
    return {
        "branch_id": branch_id,
        "sku": f"SKU-{n:07d}",
        "name": f"Ingredient number {n}",
        "category": ("Produce", "Dairy", "Dry goods", "Meat", "Beverages")[n % 5],
        "unit": INVENTORY_UNITS[n % len(INVENTORY_UNITS)],
        "cost_cents": 100 + n % 9_000,
        "supplier": f"Supplier {n % 40}",
    }


@dataclass(frozen=True)
class Seeded:
    rows: int
    seconds: float
    head: int


def seed_inventory(
    database_url: str, branch_id: str, rows: int, rows_per_version: int, chunk: int = 2_000
) -> Seeded:
    """Insert ``rows`` inventory items into ``branch_id``'s scope as the change log would.

    Raw pymysql ``executemany`` in one transaction per chunk; the scope counter row is locked
    first, as every writer of the scope does.
    """
    url = make_url(database_url)
    scope = branch_scope(branch_id)
    encode = msgspec.msgpack.Encoder().encode
    now = datetime.now(UTC).replace(tzinfo=None)
    conn = connect(url, autocommit=False)
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT version, row_count, checksum FROM sync_scopes WHERE scope=%s FOR UPDATE",
                (scope,),
            )
            head, count, checksum = cur.fetchone()
            conn.commit()
        for start in range(0, rows, chunk):
            sync_values = []
            record_values = []
            with conn.cursor() as cur:
                cur.execute("SELECT version FROM sync_scopes WHERE scope=%s FOR UPDATE", (scope,))
                for n in range(start, min(rows, start + chunk)):
                    version = head + 1 + n // rows_per_version
                    row_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"bench-item-{n}"))
                    image = item_image(branch_id, n)
                    sync_values.append(
                        (
                            ENTITY,
                            row_id,
                            scope,
                            version,
                            0,
                            encode(image),
                            encode(dict.fromkeys(image, version)),
                            now,
                        )
                    )
                    record_values.append(
                        (
                            row_id,
                            branch_id,
                            image["sku"],
                            image["name"],
                            image["category"],
                            image["unit"],
                            image["cost_cents"],
                            image["supplier"],
                            version,
                            now,
                            now,
                        )
                    )
                    checksum = (checksum + row_checksum(ENTITY, row_id, version)) % MOD
                cur.executemany(
                    "INSERT INTO sync_rows (entity, row_id, scope, version, deleted, data,"
                    " field_versions, changed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    sync_values,
                )
                cur.executemany(
                    "INSERT INTO inventory_items (id, branch_id, sku, name, category, unit,"
                    " cost_cents, supplier, version, created_at, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    record_values,
                )
                count += len(sync_values)
                new_head = sync_values[-1][3]
                cur.execute(
                    "UPDATE sync_scopes SET version=%s, row_count=%s, checksum=%s WHERE scope=%s",
                    (new_head, count, checksum, scope),
                )
            conn.commit()
    finally:
        conn.close()
    return Seeded(rows, time.perf_counter() - started, new_head)


def create_floor_tables(database_url: str, counters: int, suffix: str = "") -> None:
    """The tables of the raw locked-counter floor: counters and the rows they number."""
    conn = connect(make_url(database_url))
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE bench_counters{suffix} (id INT PRIMARY KEY, n BIGINT NOT NULL)"
                " ENGINE=InnoDB"
            )
            cur.execute(
                f"CREATE TABLE bench_rows{suffix} (counter_id INT NOT NULL, n BIGINT NOT NULL,"
                " payload MEDIUMBLOB NOT NULL, PRIMARY KEY (counter_id, n)) ENGINE=InnoDB"
            )
            cur.executemany(
                f"INSERT INTO bench_counters{suffix} (id, n) VALUES (%s, 0)",
                [(i,) for i in range(counters)],
            )
    finally:
        conn.close()
