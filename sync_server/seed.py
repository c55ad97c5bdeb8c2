"""The demo organisation: two branches, a manager and three staff each, inventory and a menu.

Idempotent: running it again changes nothing (rows are found by their natural keys).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Connection

from domain.registry import ORG_SCOPE, branch_scope

from .changelog import ChangeLog
from .crypto import FieldCipher
from .directory import create_branch, create_user, utcnow
from .records import save
from .tables import branches, inventory_items, menu_items, users

DEMO_PASSWORD = "galley-demo-password"
_NS = uuid.UUID("6f1c1d1e-0c8a-4d6e-9a55-6a1e0b0c0de0")

BRANCHES = [("CITY", "Galley City Centre"), ("HARBOUR", "Galley Harbour")]
INVENTORY = [
    ("FLOUR-25", "Flour 00", "dry goods", "kg", 95, "Mill & Co"),
    ("TOM-SAN", "San Marzano tomatoes", "canned", "case", 4200, "Napoli Imports"),
    ("MOZZ", "Mozzarella fior di latte", "dairy", "kg", 1150, "Caseificio"),
    ("BASIL", "Basil", "produce", "each", 120, None),
    ("ESPRESSO", "Espresso beans", "coffee", "kg", 2400, "Roastery"),
    ("MILK", "Whole milk", "dairy", "l", 110, "Dairy Farm"),
]
MENU = [
    ("Margherita", 1150, "MOZZ"),
    ("Marinara", 900, "TOM-SAN"),
    ("Espresso", 280, "ESPRESSO"),
    ("Cappuccino", 380, "MILK"),
]


@dataclass(frozen=True)
class DemoLogin:
    email: str
    role: str
    branch: str


def seed_demo(conn: Connection, cipher: FieldCipher) -> list[DemoLogin]:
    """Create the demo organisation if absent; returns the demo logins."""
    now = utcnow()
    logins: list[DemoLogin] = []
    for code, name in BRANCHES:
        branch_id = conn.execute(select(branches.c.id).where(branches.c.code == code)).scalar()
        if branch_id is None:
            branch_id = create_branch(conn, code, name, now=now).id
        people = [("manager", "manager")] + [(f"staff{i}", "staff") for i in (1, 2, 3)]
        for local, role in people:
            email = f"{local}.{code.lower()}@demo.galley.test"
            logins.append(DemoLogin(email, role, code))
            if conn.execute(select(users.c.id).where(users.c.email == email)).first():
                continue
            create_user(
                conn,
                email=email,
                password=DEMO_PASSWORD,
                role=role,
                branch_codes=[code],
                display_name=f"{local.capitalize()} ({code.title()})",
                phone="+44 20 7946 0000",
                cipher=cipher,
                now=now,
            )
        log = ChangeLog(conn, now)
        scope = branch_scope(branch_id)
        log.lock_scopes([scope])
        for sku, item, category, unit, cost, supplier in INVENTORY:
            exists = conn.execute(
                select(inventory_items.c.id).where(
                    inventory_items.c.branch_id == branch_id, inventory_items.c.sku == sku
                )
            ).first()
            if exists:
                continue
            row_id = str(uuid.uuid5(_NS, f"{code}:{sku}"))
            data = {
                "branch_id": branch_id,
                "sku": sku,
                "name": item,
                "category": category,
                "unit": unit,
                "cost_cents": cost,
                "supplier": supplier,
            }
            version = log.write("inventory_items", row_id, scope, data)
            save(conn, "inventory_items", row_id, data, version=version, created=True, now=now)
        log.finish()
    log = ChangeLog(conn, now)
    log.lock_scopes([ORG_SCOPE])
    for name, price, sku in MENU:
        row_id = str(uuid.uuid5(_NS, f"menu:{name}"))
        if conn.execute(select(menu_items.c.id).where(menu_items.c.id == row_id)).first():
            continue
        data = {"name": name, "price_cents": price, "available": True, "linked_sku": sku}
        version = log.write("menu_items", row_id, ORG_SCOPE, data)
        save(conn, "menu_items", row_id, data, version=version, created=True, now=now)
    log.finish()
    admin = "admin@demo.galley.test"
    logins.insert(0, DemoLogin(admin, "admin", "*"))
    if not conn.execute(select(users.c.id).where(users.c.email == admin)).first():
        create_user(
            conn,
            email=admin,
            password=DEMO_PASSWORD,
            role="admin",
            branch_codes=[],
            display_name="Admin",
            cipher=cipher,
            now=now,
        )
    return logins
