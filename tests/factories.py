"""Data factories for tests: branches, users, devices and tokens in a real database."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from sync_server.db import run_in_transaction
from sync_server.directory import Branch, create_branch, create_user, register_device
from sync_server.resources import Resources
from sync_server.tables import users

_counter = itertools.count(1)
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class User:
    id: str
    email: str
    role: str
    branch_ids: tuple[str, ...]
    password: str = PASSWORD


class Factory:
    def __init__(self, resources: Resources) -> None:
        self.res = resources

    def branch(self, code: str | None = None, name: str | None = None) -> Branch:
        code = code or f"B{next(_counter)}"
        return run_in_transaction(
            self.res.engine, lambda conn: create_branch(conn, code, name or f"Branch {code}")
        )

    def user(
        self,
        role: str = "staff",
        branches: list[Branch] | None = None,
        email: str | None = None,
        phone: str | None = "+44 20 7946 0999",
    ) -> User:
        branches = (
            branches if branches is not None else ([] if role == "admin" else [self.branch()])
        )
        email = email or f"user{next(_counter)}@example.test"
        user_id = run_in_transaction(
            self.res.engine,
            lambda conn: create_user(
                conn,
                email=email,
                password=PASSWORD,
                role=role,
                branch_codes=[b.code for b in branches],
                display_name=email.split("@")[0],
                cipher=self.res.cipher,
                phone=phone,
            ),
        )
        return User(user_id, email, role, tuple(b.id for b in branches))

    def device(self, user: User, device_id: str | None = None) -> str:
        device_id = device_id or str(uuid.uuid4())
        home = user.branch_ids[0] if user.branch_ids and user.role != "admin" else None
        run_in_transaction(
            self.res.engine,
            lambda conn: register_device(
                conn,
                device_id=device_id,
                user_id=user.id,
                branch_id=home,
                platform="ios",
                app_version="1.0.0",
            ),
        )
        return device_id

    def token(self, user: User, device_id: str | None = None, **kwargs: object) -> str:
        with self.res.engine.connect() as conn:
            epoch = conn.execute(
                select(users.c.token_epoch).where(users.c.id == user.id)
            ).scalar_one()
            conn.rollback()
        return self.res.tokens.mint(
            user_id=user.id,
            role=user.role,
            branch_ids=list(user.branch_ids),
            epoch=epoch,
            device_id=device_id,
            **kwargs,  # type: ignore[arg-type]
        )

    def auth(self, user: User, device_id: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, device_id)}"}
