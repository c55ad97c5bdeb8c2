"""The reference client against the real server: local writes, push, pull, outcomes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sync_server.resources import Resources
from sync_server.tables import sync_change_sets
from tests.client.harness import FlakyHttp, device, replica_image, server_image
from tests.factories import Factory

INVENTORY = "inventory_items"
MENU = "menu_items"


def flour(sku: str = "FLOUR-1") -> dict[str, str]:
    return {"sku": sku, "name": "Flour", "category": "dry", "unit": "kg"}


def scopes_of(branch_ids: tuple[str, ...]) -> list[str]:
    return ["org", *sorted(f"branch:{b}" for b in branch_ids)]


def applied_count(engine: Engine, device_id: str) -> int:
    with engine.connect() as conn:
        n = conn.execute(
            select(func.count()).where(sync_change_sets.c.device_id == device_id)
        ).scalar_one()
        conn.rollback()
    return int(n)


def test_an_offline_create_shows_at_once_and_reaches_another_device(
    tmp_path: Path, factory: Factory, network: Callable[[], FlakyHttp], resources: Resources
) -> None:
    branch = factory.branch()
    alice = factory.user("staff", [branch])
    bob = factory.user("staff", [branch])
    a = device(str(tmp_path / "a.db"), network(), factory, alice)
    b = device(str(tmp_path / "b.db"), network(), factory, bob)

    item = a.create(INVENTORY, flour(), scope=f"branch:{branch.id}")
    shown = a.get(INVENTORY, item)
    assert shown is not None and shown.pending and shown.version == 0
    assert shown.data["sku"] == "FLOUR-1"

    report = a.sync()
    assert (report.applied, report.rejected) == (1, 0)
    b.sync()
    a.sync()  # b's registration published its device row after a's first pull

    mine, theirs = a.get(INVENTORY, item), b.get(INVENTORY, item)
    assert mine is not None and theirs is not None
    assert not mine.pending and mine.version > 0
    assert mine.data == theirs.data and theirs.data["branch_id"] == branch.id
    assert a.replica.pending() == [] and applied_count(resources.engine, a.device_id) == 1
    expected = server_image(resources.engine, scopes_of(alice.branch_ids), "staff")
    assert replica_image(a) == expected == replica_image(b) == replica_image(a, view=True)
